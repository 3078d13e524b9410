"""SparseAugment: sparse labels survive scaling, follow the image, and runs are seeded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.augment import SparseAugment, scale_sparse_labels
from model.data import IGNORE_INDEX, SegmentationFolder

GEOMETRY_ONLY = dict(jitter=0.0, blur_prob=0.0)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _isolated_points(height: int, width: int, count: int, num_classes: int, seed: int) -> torch.Tensor:
    """Sparse labels: `count` random pixels, no two of them 8-neighbours."""
    generator = _generator(seed)
    labels = torch.full((height, width), IGNORE_INDEX, dtype=torch.int64)
    taken = torch.zeros(height + 2, width + 2, dtype=torch.bool)
    placed = 0
    while placed < count:
        y = int(torch.randint(0, height, (1,), generator=generator))
        x = int(torch.randint(0, width, (1,), generator=generator))
        if taken[y : y + 3, x : x + 3].any():
            continue
        taken[y + 1, x + 1] = True
        labels[y, x] = int(torch.randint(0, num_classes, (1,), generator=generator))
        placed += 1
    return labels


def test_isolated_pixels_survive_half_scale_where_nearest_resize_drops_them():
    labels = torch.full((64, 64), IGNORE_INDEX, dtype=torch.int64)
    points = [(1 + 6 * i, 3 + 5 * i, i) for i in range(10)]  # odd coordinates, classes 0..9
    for y, x, cls in points:
        labels[y, x] = cls
    # The trap this module exists for: plain nearest keeps only even rows/columns at 0.5.
    nearest = F.interpolate(labels[None, None].float(), scale_factor=0.5, mode="nearest")[0, 0].long()
    assert (nearest != IGNORE_INDEX).sum() == 0

    augment = SparseAugment(crop_size=(32, 32), scale_range=(0.5, 0.5), flip=False, **GEOMETRY_ONLY)
    image = torch.rand(3, 64, 64)
    _, out = augment(image, labels, _generator(0))
    assert out.shape == (32, 32)
    assert int((out != IGNORE_INDEX).sum()) == len(points)
    for y, x, cls in points:  # the new pixel holding the old pixel's center
        assert out[y // 2, x // 2] == cls


@pytest.mark.parametrize("seed", range(5))
def test_sparse_labels_on_camvid_keep_count_and_classes_when_downscaled(camvid_dir, seed):
    image, _ = SegmentationFolder(camvid_dir, "train")[seed]
    height, width = image.shape[-2:]
    labels = _isolated_points(height, width, count=300, num_classes=11, seed=seed)
    augment = SparseAugment(crop_size=(height, width), scale_range=(0.5, 1.0))  # no crop loss: it all fits
    _, out = augment(image, labels, _generator(seed))
    before = torch.bincount(labels[labels != IGNORE_INDEX], minlength=11)
    after = torch.bincount(out[out != IGNORE_INDEX], minlength=11)
    assert torch.equal(before, after)


def test_upscaled_labeled_pixel_stays_one_pixel():
    labels = _isolated_points(30, 40, count=25, num_classes=5, seed=3)
    out = scale_sparse_labels(labels, (60, 80))
    assert torch.equal(
        torch.bincount(out[out != IGNORE_INDEX], minlength=5),
        torch.bincount(labels[labels != IGNORE_INDEX], minlength=5),
    )
    ys, xs = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
    # The old center (y + 0.5) * 2 = 2y + 1 is the top-left corner of new pixel 2y + 1.
    assert torch.equal(out[2 * ys + 1, 2 * xs + 1], labels[ys, xs])


def test_collision_keeps_closest_label():
    labels = torch.full((4, 4), IGNORE_INDEX, dtype=torch.int64)
    labels[0, 0] = 1  # center (0.25, 0.25) after halving: 0.25 from the new center in x and y
    labels[1, 1] = 2  # center (0.75, 0.75): the same distance, later in raster order
    labels[0, 2], labels[1, 2] = 3, 4  # both land in new pixel (0, 1); (1, 2) is no closer
    out = scale_sparse_labels(labels, (2, 2))
    assert out[0, 0] == 1 and out[0, 1] == 3


@pytest.mark.parametrize("seed", range(12))
def test_labels_stay_on_their_image_content(seed):
    """White 4x4 blocks, one labeled pixel inside each: after scale/flip/crop, every label is on white."""
    image = torch.zeros(3, 80, 96)
    labels = torch.full((80, 96), IGNORE_INDEX, dtype=torch.int64)
    for top in range(4, 76, 12):
        for left in range(2, 90, 10):
            image[:, top : top + 4, left : left + 4] = 1.0
            labels[top + 1, left + 2] = (top + left) % 7
    augment = SparseAugment(crop_size=(64, 64), **GEOMETRY_ONLY)
    out_image, out_labels = augment(image, labels, _generator(seed))
    labeled = out_labels != IGNORE_INDEX
    assert labeled.any()
    assert (out_image[:, labeled] > 0.5).all()


def test_flip_moves_labels_with_the_image():
    image = torch.zeros(3, 20, 30)
    labels = torch.full((20, 30), IGNORE_INDEX, dtype=torch.int64)
    image[:, 5, 3] = 1.0
    labels[5, 3] = 4
    augment = SparseAugment(crop_size=(20, 30), scale_range=(1.0, 1.0), **GEOMETRY_ONLY)
    positions = set()
    for seed in range(16):
        out_image, out_labels = augment(image, labels, _generator(seed))
        (y,), (x,) = torch.nonzero(out_labels != IGNORE_INDEX, as_tuple=True)
        assert out_labels[y, x] == 4 and out_image[0, y, x] == 1.0 and out_image.sum() == 3.0
        positions.add((int(y), int(x)))
    assert positions == {(5, 3), (5, 26)}  # both outcomes occur; flipped column is 30 - 1 - 3


def test_same_seed_same_output_and_other_seed_differs():
    image = torch.rand(3, 50, 70, generator=_generator(1))
    labels = _isolated_points(50, 70, count=40, num_classes=6, seed=2)
    augment = SparseAugment(crop_size=(48, 48))
    first = augment(image, labels, _generator(7))
    second = augment(image, labels, _generator(7))
    other = augment(image, labels, _generator(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("shape", [(37, 53), (120, 90), (360, 480)])
def test_output_has_crop_size_and_padding_is_ignored(shape):
    augment = SparseAugment(crop_size=(64, 80))
    for seed in range(4):
        image, labels = augment(torch.rand(3, *shape), torch.zeros(shape, dtype=torch.int64), _generator(seed))
        assert image.shape == (3, 64, 80) and labels.shape == (64, 80)
        assert image.dtype == torch.float32 and labels.dtype == torch.int64
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_padding_is_zero_image_and_ignore_labels():
    augment = SparseAugment(crop_size=(50, 50), scale_range=(0.5, 0.5), flip=False, **GEOMETRY_ONLY)
    image, labels = augment(torch.ones(3, 40, 60), torch.zeros(40, 60, dtype=torch.int64), _generator(0))
    content = labels != IGNORE_INDEX  # the 20 x 30 downscaled image, somewhere in the crop
    assert int(content.sum()) == 20 * 30
    assert torch.equal(image[0] > 0.5, content)
    assert float(image[:, ~content].abs().max()) == 0.0


def test_jitter_and_blur_change_only_the_image():
    image = torch.rand(3, 60, 80, generator=_generator(0))
    labels = _isolated_points(60, 80, count=30, num_classes=4, seed=0)
    plain = SparseAugment(crop_size=(70, 90), scale_range=(0.5, 1.0), **GEOMETRY_ONLY)  # always some padding
    photometric = SparseAugment(crop_size=(70, 90), scale_range=(0.5, 1.0), jitter=0.4, blur_prob=1.0)
    plain_image, plain_labels = plain(image, labels, _generator(5))
    photo_image, photo_labels = photometric(image, labels, _generator(5))
    assert torch.equal(plain_labels, photo_labels)
    assert not torch.allclose(plain_image, photo_image, atol=1e-3)
    padding = plain_image.sum(0) == 0
    assert padding.any() and float(photo_image[:, padding].abs().max()) == 0.0


def test_bad_inputs_raise_clear_errors():
    augment = SparseAugment(crop_size=(8, 8))
    with pytest.raises(ValueError, match="int64 labels"):
        augment(torch.rand(3, 8, 8), torch.zeros(8, 8, dtype=torch.int32), _generator(0))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        augment(torch.rand(8, 8), torch.zeros(8, 8, dtype=torch.int64), _generator(0))
    with pytest.raises(ValueError, match="scale_range"):
        SparseAugment(crop_size=(8, 8), scale_range=(2.0, 0.5))
