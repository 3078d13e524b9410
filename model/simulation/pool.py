"""The pool of training images and the simulated oracle: dense ground truth, revealed on request.

Paper 000 (section 3.4) and paper 004 (section 4.1) simulate annotation the same way: the
dense labels exist, but the learner sees only what it asked for. ``LabelPool`` keeps, per
image, one small map ``revealed_at [H, W]`` (int16): 0 for a pixel never asked for, k for a
pixel revealed to train cycle k. That one map gives everything the loop and the state file
need: the training labels of any cycle (``0 < revealed_at <= k``), the pixels queried for a
cycle (``revealed_at == k``), and the exclusion mask for the next query.

Void pixels are known to the oracle as "no class". They never count as labeled, and pixel
queries exclude them up front, so every query reveals exactly n real labels (while an image
has n unlabeled non-void pixels left). A revealed region labels all its non-void pixels;
its void pixels stay ignored. Regions with no non-void pixel are never offered: asking for
one would spend budget on nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import IGNORE_INDEX


class LabelPool:
    """Training images, their truth, optional superpixels, and who was revealed when.

    images: ``[3, H, W]`` float32 each. truth: ``[H, W]`` int64 with void already
    ``IGNORE_INDEX``. segments: ``[H, W]`` int32 region ids 0..K-1 per image (region mode).
    """

    def __init__(
        self,
        images: list[torch.Tensor],
        truth: list[torch.Tensor],
        names: list[str],
        segments: list[np.ndarray] | None = None,
    ):
        if not (len(images) == len(truth) == len(names)) or not images:
            raise ValueError("The pool needs one truth map and one name per image, and at least one image.")
        self.images = images
        self.truth = [t.to(torch.uint8).numpy() if t.dtype != torch.uint8 else t.numpy() for t in truth]  # [H, W]
        self.names = names
        self.segments = segments
        self.revealed_at = [np.zeros(t.shape, dtype=np.int16) for t in self.truth]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def total_pixels(self) -> int:
        return sum(t.size for t in self.truth)

    def void(self, index: int) -> np.ndarray:
        return self.truth[index] == IGNORE_INDEX

    def revealed(self, index: int, cycle: int) -> np.ndarray:
        """``[H, W]`` bool: revealed to train cycle `cycle` or earlier."""
        at = self.revealed_at[index]
        return (at > 0) & (at <= cycle)

    def labeled(self, index: int, cycle: int) -> np.ndarray:
        """``[H, W]`` bool: pixels carrying a label at `cycle` (revealed and not void)."""
        return self.revealed(index, cycle) & ~self.void(index)

    def labeled_count(self, cycle: int) -> int:
        return int(sum(self.labeled(i, cycle).sum() for i in range(len(self))))

    def exclude(self, index: int) -> np.ndarray:
        """``[H, W]`` bool: never query these pixels again (revealed at any cycle, or void)."""
        return (self.revealed_at[index] > 0) | self.void(index)

    def sparse_labels(self, index: int, cycle: int) -> torch.Tensor:
        """Training labels ``[H, W]`` int64 of `cycle`: the truth where labeled, IGNORE_INDEX elsewhere."""
        labels = np.where(self.labeled(index, cycle), self.truth[index], IGNORE_INDEX)
        return torch.from_numpy(labels.astype(np.int64))

    def dense_labels(self, index: int) -> torch.Tensor:
        """The full truth ``[H, W]`` int64 (for the supervised reference)."""
        return torch.from_numpy(self.truth[index].astype(np.int64))

    def reveal_pixels(self, index: int, coords: np.ndarray, cycle: int) -> None:
        """Reveal ``coords [k, 2]`` (row, col) of image `index` for training cycle `cycle`."""
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        at = self.revealed_at[index]
        if (at[coords[:, 0], coords[:, 1]] > 0).any():
            raise ValueError(f"Image {self.names[index]}: a queried pixel was already revealed (a bug in the query).")
        at[coords[:, 0], coords[:, 1]] = cycle

    def region_candidates(self, index: int) -> np.ndarray:
        """``[K]`` bool: regions not revealed yet that hold at least one non-void pixel."""
        segments = self._segments(index)
        count = int(segments.max()) + 1
        revealed = np.bincount(segments.ravel(), weights=(self.revealed_at[index] > 0).ravel(), minlength=count) > 0
        real = np.bincount(segments.ravel(), weights=(~self.void(index)).ravel(), minlength=count) > 0
        return real & ~revealed

    def reveal_regions(self, index: int, region_ids: list[int], cycle: int) -> None:
        """Reveal every pixel of the given superpixels for training cycle `cycle`."""
        if not len(region_ids):
            return
        candidates = self.region_candidates(index)
        if not candidates[np.asarray(region_ids)].all():
            raise ValueError(f"Image {self.names[index]}: a queried region was revealed already or is all void.")
        inside = np.isin(self._segments(index), np.asarray(region_ids))
        self.revealed_at[index][inside] = cycle

    def queries(self, cycle: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image, what was queried for `cycle`: ``(points [k, 2], revealed truth [j])``.

        Pixel mode: the queried pixels and their labels. Region mode: the centroids of the
        queried regions (the points of the pair distance), and the labels of all their pixels.
        """
        result = []
        for index in range(len(self)):
            queried = self.revealed_at[index] == cycle
            labels = self.truth[index][queried]
            if self.segments is None:
                result.append((np.argwhere(queried).astype(np.float64), labels))
                continue
            segments = self.segments[index]
            ids = np.unique(segments[queried])
            centroids = [np.argwhere(segments == region).mean(0) for region in ids]
            result.append((np.asarray(centroids, dtype=np.float64).reshape(-1, 2), labels))
        return result

    def _segments(self, index: int) -> np.ndarray:
        if self.segments is None:
            raise ValueError("This pool has no superpixels: region queries need region mode.")
        return self.segments[index]


def random_choice(eligible: np.ndarray, k: int, generator: torch.Generator) -> np.ndarray:
    """k distinct random flat indices where ``eligible`` (bool, any shape) holds; all of them if fewer."""
    candidates = np.flatnonzero(eligible.reshape(-1))
    order = torch.randperm(len(candidates), generator=generator)[:k].numpy()
    return candidates[order]
