"""Pixel queries on the decoder's grid (model.grid): which pixel a node stands for, and that
its scores and choices are the acquisition's on the decoder-resolution moments."""

import pytest
import torch

from model.acquisition import score_moments, select_pixels
from model.balent import LOWEST_SCORE
from model.calibration import image_value
from model.data import load_image
from model.grid import grid_scores, node_pixels, pixel_scores, upsampled_pixel_scores
from model.mc_dropout import mc_moments
from model.network import ModelConfig, build_model


def test_each_node_stands_for_the_image_pixel_nearest_to_it():
    # stride 4: node i sits at image coordinate 4i + 1.5 (align_corners=False) -> pixel 4i + 2
    rows, cols = node_pixels((10, 13), (16, 16), (4, 4))
    assert rows.tolist() == [2, 6]  # node 2's pixel (10) and node 3's (14) lie in the padding
    assert cols.tolist() == [2, 6, 10]
    with pytest.raises(ValueError, match="not a multiple"):
        node_pixels((10, 10), (18, 16), (4, 4))


@pytest.fixture(scope="module")
def frame_moments(camvid_dir):
    """A real CamVid frame at half size and its decoder-resolution MC moments (m = 8)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=11, encoder_weights="packaged")).eval()
    image = load_image(next((camvid_dir / "val").glob("*.png")), scale=0.5)  # [3, 180, 240]
    size = tuple(image.shape[-2:])
    coarse = mc_moments(model, image, 8, generator=torch.Generator().manual_seed(1), image_resolution=False)[0]
    return coarse, size, model.padded_size(size)


@pytest.mark.parametrize("name", ["balent", "entropy", "bald"])
def test_grid_scores_are_the_acquisition_on_the_nodes_inside_the_image(frame_moments, name):
    coarse, size, padded = frame_moments
    assert padded != size  # 180 pads to 192: the last decoder rows cover only padding
    scores = grid_scores(name, coarse, size, padded)
    rows, cols = scores.rows, scores.cols
    assert rows[-1] < size[0] <= rows[-1] + 4 and cols[-1] < size[1] <= cols[-1] + 4
    inside = coarse.map_spatial(lambda t: t[..., : len(rows), : len(cols)])
    assert torch.equal(scores.scores, score_moments(name, inside))
    nodes, pixels = scores.select(5)
    assert torch.equal(nodes, select_pixels(scores.scores, 5))
    assert torch.equal(pixels, torch.stack([4 * nodes[:, 0] + 2, 4 * nodes[:, 1] + 2], dim=1))
    assert scores.value() == image_value(scores.scores, acquisition=name)


def test_a_node_on_a_labeled_pixel_is_not_asked_again(frame_moments):
    coarse, size, padded = frame_moments
    first = grid_scores("balent", coarse, size, padded)
    _, asked = first.select(5)
    labeled = torch.zeros(size, dtype=torch.bool)
    labeled[asked[:, 0], asked[:, 1]] = True  # the annotator answered those five pixels
    labeled[asked[0, 0] + 1, asked[0, 1] + 1] = True  # and one pixel beside a node, not on it
    second = grid_scores("balent", coarse, size, padded, exclude=labeled)
    assert int(second.exclude.sum()) == 5
    _, next_asked = second.select(5)
    assert not set(map(tuple, next_asked.tolist())) & set(map(tuple, asked.tolist()))
    # the next five best nodes, in order
    assert torch.equal(second.select(5)[0], select_pixels(first.scores, 10)[5:])
    assert second.value() < first.value()  # its most uncertain nodes are answered: less is left to learn
    with pytest.raises(ValueError, match="exclude has shape"):
        grid_scores("balent", coarse, size, padded, exclude=labeled[:-1])


def _upsampled(coarse, size, padded):
    """The image-resolution moments as ``BayesianSegmenter.upsample`` makes them."""
    height, width = size

    def upsample(maps):
        return torch.nn.functional.interpolate(maps[None], size=padded, mode="bilinear", align_corners=False)[
            0, :, :height, :width
        ]

    return coarse.map_spatial(upsample)


@pytest.mark.parametrize("name", ["balent", "entropy"])
def test_every_pixel_scores_are_the_acquisition_of_the_upsampled_moments(frame_moments, name):
    """BalEnt straight from the decoder-resolution moments equals BalEnt of the upsampled
    moments (float64 rounding), and so do the chosen pixels and the mean proposed at each."""
    coarse, size, padded = frame_moments
    full = _upsampled(coarse, size, padded)
    labeled = torch.zeros(size, dtype=torch.bool)
    labeled[40:60, 100:140] = True
    expected = pixel_scores(name, full, exclude=labeled)
    scores = upsampled_pixel_scores(name, coarse, size, padded, exclude=labeled)
    assert scores.scores.shape == size
    torch.testing.assert_close(scores.scores, expected.scores, rtol=1e-9, atol=1e-12)
    nodes, pixels = scores.select(5)
    assert torch.equal(nodes, expected.select(5)[0]) and torch.equal(nodes, pixels)
    assert not labeled[pixels[:, 0], pixels[:, 1]].any()
    for row, col in pixels.tolist():
        torch.testing.assert_close(scores.mean_at(row, col), full.mean[:, row, col], rtol=1e-12, atol=1e-14)
    assert scores.value() == pytest.approx(expected.value(), rel=1e-9)
    with pytest.raises(ValueError, match="exclude has shape"):
        upsampled_pixel_scores("balent", coarse, size, padded, exclude=labeled[:-1])


def test_upsampled_balent_keeps_a_broken_pixel_last(frame_moments):
    """A NaN moment at one decoder cell makes the pixels it reaches score lowest, not the map."""
    coarse, size, padded = frame_moments
    broken = coarse.map_spatial(lambda t: t.clone())
    broken.mean[:, 10, 20] = float("nan")
    scores = upsampled_pixel_scores("balent", broken, size, padded).scores
    lowest = scores == LOWEST_SCORE
    assert lowest[40:44, 80:84].all()  # the pixels around cell (10, 20) (stride 4)
    assert 0 < int(lowest.sum()) <= 8 * 8
    assert torch.isfinite(scores).all()
