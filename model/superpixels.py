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
    color distances follow perception.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"Expected an RGB uint8 image [H, W, 3], got {image.shape} {image.dtype}.")
    height, width = image.shape[:2]
    target = max(4, round(num_superpixels * height * width / REFERENCE_AREA))
    requested = max(4, round(target * 4 / 3))
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    seeds = cv2.ximgproc.createSuperpixelSEEDS(width, height, 3, requested, num_levels, prior, histogram_bins, False)
    seeds.iterate(lab, iterations)
    labels = seeds.getLabels().astype(np.int32)
    # SEEDS labels are not always consecutive; make them 0..K-1 so bincount sizes are exact
    _, compact = np.unique(labels, return_inverse=True)
    return compact.reshape(height, width).astype(np.int32)


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
    count = segments.max() + 1
    votes = np.zeros((count, num_classes), dtype=np.int64)
    np.add.at(votes, (segments.ravel(), prediction.ravel()), 1)
    return votes.argmax(1)
