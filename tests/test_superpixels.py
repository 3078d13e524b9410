"""SEEDS superpixels and the plain region ranking, on real CamVid frames."""

import numpy as np
import torch

from model.data import load_image
from model.superpixels import (
    SuperpixelCache,
    labeled_fraction,
    majority_labels,
    region_sums,
    seeds_superpixels,
    to_uint8_rgb,
    top_regions,
)


def frame(camvid_dir, scale=1.0):
    path = sorted((camvid_dir / "train").glob("*.png"))[0]
    return to_uint8_rgb(load_image(path, scale))


def test_seeds_gives_about_the_requested_count_deterministically(camvid_dir):
    image = frame(camvid_dir)
    segments = seeds_superpixels(image, 300)
    count = segments.max() + 1
    assert 200 <= count <= 330, count
    assert set(np.unique(segments)) == set(range(count))  # consecutive ids
    assert np.array_equal(segments, seeds_superpixels(image, 300))
    # the setting is per 480x360 image: superpixels keep their size, so a half-size image
    # (a quarter of the area) gets about a quarter as many
    half = seeds_superpixels(frame(camvid_dir, 0.5), 300)
    assert 0.15 * count <= half.max() + 1 <= 0.35 * count


def test_region_sums_and_top_regions_skip_mostly_labeled_ones():
    segments = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]], dtype=np.int32)
    scores = torch.tensor([[1.0, 1, 5, 5], [1, 1, 5, 5], [2, 2, 3, 3], [2, 2, float("nan"), 3]])
    sums = region_sums(scores, segments)
    assert sums.tolist() == [4.0, 20.0, 8.0, 9.0]  # NaN counts as 0
    labeled = np.zeros((4, 4), dtype=bool)
    labeled[0:2, 2:4] = True  # region 1 fully labeled
    labeled[2, 3] = True  # region 3: one pixel of four
    assert labeled_fraction(segments, labeled).tolist() == [0.0, 1.0, 0.0, 0.25]
    assert top_regions(sums, 2, segments, labeled) == [3, 2]
    assert top_regions(sums, 10, segments) == [1, 3, 2, 0]


def test_majority_labels_and_cache():
    segments = np.array([[0, 0, 1], [0, 1, 1]], dtype=np.int32)
    prediction = np.array([[2, 2, 0], [1, 0, 1]])
    assert majority_labels(prediction, segments, 3).tolist() == [2, 0]
    cache, calls = SuperpixelCache(capacity=1), []
    compute = lambda: calls.append(1) or segments  # noqa: E731
    cache.get("a", compute), cache.get("a", compute), cache.get("b", compute), cache.get("a", compute)
    assert len(calls) == 3  # "a" was evicted by "b"
