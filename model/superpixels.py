"""SEEDS superpixels and region ranking (paper 004, section 3.3; eq. 6 for the score).

A region is a superpixel; its informativeness is the sum of a per-pixel score over its
pixels (paper 004 uses the pixel entropy; any acquisition score works). This module gives
the plain ranking, top-k by summed score; the contrastive issue adds diversity (UMAP +
KMeans over region features) on top of the same superpixels.

SEEDS (opencv-contrib) is deterministic for a given image and parameters, so superpixels
are computed once per image and cached by the caller's key.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import cv2
import numpy as np
import torch

REFERENCE_AREA = 480 * 360  # the `num_superpixels` setting is meant for an image of this size
# OpenCV's SEEDS crashes (segfault, division by zero) or loops forever when its block grid
# does not fit the image: thin strips, tiny images. Images are stretched to at least this
# side, and at most this aspect ratio, before SEEDS; the labels are mapped back.
SEEDS_MIN_SIDE = 64
SEEDS_MAX_ASPECT = 8


def seeds_superpixels(
    image: np.ndarray,
    num_superpixels: int = 300,
    *,
    num_levels: int = 4,
    prior: int = 2,
    histogram_bins: int = 5,
    iterations: int = 4,
) -> np.ndarray:
    """SEEDS segments ``[H, W]`` int32 (0..K-1) of an RGB uint8 image ``[H, W, 3]``.

    `num_superpixels` is scaled with the image area relative to 480x360, so a setting keeps
    the same superpixel size on larger or smaller images. SEEDS returns fewer superpixels than
    requested (about 3/4), so it is asked for 4/3 of the target. It runs in Lab space, where
    color distances follow perception. Any size works: a thin or tiny image is stretched
    (`seeds_size`) for SEEDS and its labels shrunk back; where no SEEDS grid fits even then,
    the segments are a regular grid.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise ValueError(f"Expected an RGB uint8 image [H, W, 3], got {image.shape} {image.dtype}.")
    height, width = image.shape[:2]
    target = max(4, round(num_superpixels * height * width / REFERENCE_AREA))
    requested = max(4, round(target * 4 / 3))
    run_height, run_width = seeds_size(height, width)
    # nearest-neighbour stretch: every pixel of the stretched image is a copy of an original one
    work = image if (run_height, run_width) == (height, width) else cv2.resize(
        image, (run_width, run_height), interpolation=cv2.INTER_NEAREST
    )
    parameters = _seeds_parameters(run_width, run_height, requested, num_levels)
    if parameters is None:
        return _grid_segments(height, width, target)
    requested, levels = parameters
    lab = cv2.cvtColor(work, cv2.COLOR_RGB2LAB)
    seeds = cv2.ximgproc.createSuperpixelSEEDS(run_width, run_height, 3, requested, levels, prior, histogram_bins, False)
    seeds.iterate(lab, iterations)
    labels = seeds.getLabels().astype(np.int32)
    if (run_height, run_width) != (height, width):
        labels = cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)
    # SEEDS labels are not always consecutive (and the shrink drops some); make them 0..K-1
    _, compact = np.unique(labels, return_inverse=True)
    return compact.reshape(height, width).astype(np.int32)


def seeds_size(height: int, width: int) -> tuple[int, int]:
    """The (height, width) SEEDS runs at: each side at least SEEDS_MIN_SIDE and the aspect
    ratio at most SEEDS_MAX_ASPECT, by stretching the short side (never shrinking)."""
    run_height, run_width = max(height, SEEDS_MIN_SIDE), max(width, SEEDS_MIN_SIDE)
    if run_width > SEEDS_MAX_ASPECT * run_height:
        run_height = -(-run_width // SEEDS_MAX_ASPECT)
    elif run_height > SEEDS_MAX_ASPECT * run_width:
        run_width = -(-run_height // SEEDS_MAX_ASPECT)
    return run_height, run_width


def _seeds_parameters(width: int, height: int, requested: int, num_levels: int) -> tuple[int, int] | None:
    """(superpixels, levels) closest to the asked ones whose SEEDS grid fits, or None: fewer
    levels first, then more (smaller) superpixels, never seeds under 4x4 pixels."""
    most = width * height // 16
    requested = min(requested, most)
    while requested >= 1:
        for levels in range(num_levels, 1, -1):
            if _seeds_grid_fits(width, height, requested, levels):
                return requested, levels
        if requested >= most:
            return None
        requested = min(most, requested * 2)
    return None


def _seeds_grid_fits(width: int, height: int, num_superpixels: int, num_levels: int) -> bool:
    """Whether OpenCV's SEEDS block grid fits: its ``initialize`` (seeds.cpp) replayed.

    It needs at least one seed row and column, a level count >= 2 with seeds of >= 1 pixel,
    and, after halving the grid once per level, at least 2x2 blocks on the top level.
    """
    num_superpixels = max(num_superpixels, 10)
    num_levels = max(num_levels, 2)
    rows = int(np.sqrt(num_superpixels * height / width))
    columns = rows * width // height
    if rows < 1 or columns < 1:
        return False
    levels = num_levels
    while levels >= 2 and (width / columns / (1 << (levels - 1)) < 1 or height / rows / (1 << (levels - 1)) < 1):
        levels -= 1
    if levels < 2:
        return False
    seed_width = int(np.ceil(width / columns / (1 << (levels - 1))))
    seed_height = int(np.ceil(height / rows / (1 << (levels - 1))))
    top_columns, top_rows = (width // seed_width) >> (levels - 1), (height // seed_height) >> (levels - 1)
    return top_columns >= 2 and top_rows >= 2


def _grid_segments(height: int, width: int, count: int) -> np.ndarray:
    """A regular grid of about `count` blocks: the fallback where SEEDS cannot run."""
    rows = max(1, min(height, round(np.sqrt(count * height / width))))
    columns = max(1, min(width, round(count / rows)))
    row_ids = np.arange(height) * rows // height
    column_ids = np.arange(width) * columns // width
    return (row_ids[:, None] * columns + column_ids[None, :]).astype(np.int32)


def to_uint8_rgb(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` float in [0, 1] -> ``[H, W, 3]`` uint8."""
    return (image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()).copy()


class SuperpixelCache:
    """A thread-safe LRU of superpixel maps by key (e.g. image URL + size + parameters)."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()  # outside the lock: SEEDS takes tens of ms
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value


def region_sums(pixel_scores: torch.Tensor | np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Sum of a per-pixel score ``[H, W]`` over each region -> ``[K]`` float64 (eq. 6)."""
    scores = pixel_scores.detach().cpu().numpy() if isinstance(pixel_scores, torch.Tensor) else pixel_scores
    if scores.shape != segments.shape:
        raise ValueError(f"Scores {scores.shape} and segments {segments.shape} differ in shape.")
    # a degenerate pixel (non-finite, or the acquisitions' LOWEST_SCORE marker) adds nothing:
    # two LOWEST_SCOREs would already sum to -inf
    scores = np.where(np.isfinite(scores) & (scores != np.finfo(np.float64).min), scores, 0.0).astype(np.float64)
    return np.bincount(segments.ravel(), weights=scores.ravel(), minlength=int(segments.max()) + 1)


def labeled_fraction(segments: np.ndarray, labeled: np.ndarray) -> np.ndarray:
    """Fraction ``[K]`` of each region's pixels that are already labeled."""
    count = segments.max() + 1
    sizes = np.bincount(segments.ravel(), minlength=count)
    hits = np.bincount(segments.ravel(), weights=labeled.ravel().astype(np.float64), minlength=count)
    return hits / np.maximum(sizes, 1)


def top_regions(
    region_scores: np.ndarray,
    k: int,
    segments: np.ndarray,
    labeled: np.ndarray | None = None,
    max_labeled_fraction: float = 0.5,
) -> list[int]:
    """Ids of the k best regions, best first, skipping regions mostly labeled already.

    A region counts as labeled when more than `max_labeled_fraction` of its pixels are: a
    brushed or polygon-labeled superpixel is skipped, one holding a single click is not.
    """
    order = np.argsort(-region_scores, kind="stable")
    if labeled is not None:
        done = labeled_fraction(segments, labeled) > max_labeled_fraction
        order = order[~done[order]]
    return order[:k].tolist()


def majority_labels(prediction: np.ndarray, segments: np.ndarray, num_classes: int) -> np.ndarray:
    """Most frequent predicted class ``[K]`` in each region of ``segments``."""
    count = int(segments.max()) + 1
    pairs = segments.ravel().astype(np.int64) * num_classes + prediction.ravel()  # np.add.at took 5x longer
    votes = np.bincount(pairs, minlength=count * num_classes).reshape(count, num_classes)
    return votes.argmax(1)
