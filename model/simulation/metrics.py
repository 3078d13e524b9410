"""The figures a simulated cycle records: IoU from a confusion matrix, and query diversity.

IoU is accumulated as a confusion matrix over the whole evaluation split (the usual
dataset-level mIoU, not a mean of per-image scores): per-image averaging would let a frame
with three pixels of a class weigh as much as one where it fills the view. Pixels whose
truth is ``IGNORE_INDEX`` (void) are left out. A class that appears in neither the truth nor
the predictions has no IoU (NaN) and does not count in the mean.

Diversity follows paper 000, section 4.3 (Fig. 6): within each image, the mean pairwise
Euclidean distance between the queried points, and the number of distinct ground-truth
labels among them; both are then averaged over the images. An image with fewer than two
queried points has no pair distance and is left out of that mean.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data import IGNORE_INDEX


def confusion_matrix(truth: torch.Tensor, prediction: torch.Tensor, num_classes: int) -> np.ndarray:
    """``[C, C]`` int64 counts, rows = truth, columns = prediction; ``IGNORE_INDEX`` truth skipped.

    ``truth`` and ``prediction`` are class maps of the same shape (any, e.g. ``[B, H, W]``).
    """
    if truth.shape != prediction.shape:
        raise ValueError(f"truth {tuple(truth.shape)} and prediction {tuple(prediction.shape)} differ in shape.")
    truth = truth.reshape(-1).to(torch.int64).cpu()
    prediction = prediction.reshape(-1).to(torch.int64).cpu()
    keep = truth != IGNORE_INDEX
    truth, prediction = truth[keep], prediction[keep]
    if truth.numel() and (int(truth.min()) < 0 or int(truth.max()) >= num_classes):
        raise ValueError(
            f"Ground truth holds labels outside 0..{num_classes - 1} (besides IGNORE_INDEX): set "
            "--num-classes and --void-index to the dataset's convention."
        )
    counts = torch.bincount(truth * num_classes + prediction, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).numpy()


def class_iou(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU ``[C]`` = TP / (TP + FP + FN); NaN for a class absent from truth and prediction."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / union, np.nan)


def mean_iou(confusion: np.ndarray) -> float:
    """Mean of the defined per-class IoUs (NaN when none is defined)."""
    iou = class_iou(confusion)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan


def mean_pair_distance(points: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of ``points [k, 2]``; NaN for k < 2."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    count = len(points)
    if count < 2:
        return math.nan
    gaps = points[:, None, :] - points[None, :, :]  # [k, k, 2]
    distances = np.sqrt((gaps**2).sum(-1))
    return float(distances[np.triu_indices(count, 1)].mean())


def unique_label_count(labels: np.ndarray) -> int:
    """Distinct labels among queried pixels' ground truth, void (IGNORE_INDEX) not counted."""
    labels = np.asarray(labels).reshape(-1)
    return int(np.unique(labels[labels != IGNORE_INDEX]).size)


def diversity(per_image: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """(mean pair distance, mean unique labels) over images of ``(points [k, 2], labels [j])``.

    ``labels`` are the ground-truth labels the queries revealed (in region mode every pixel
    of the queried regions). Images with no query at all are skipped.
    """
    distances = [mean_pair_distance(points) for points, _ in per_image if len(points)]
    uniques = [unique_label_count(labels) for points, labels in per_image if len(points)]
    finite = [d for d in distances if not math.isnan(d)]
    return (float(np.mean(finite)) if finite else math.nan, float(np.mean(uniques)) if uniques else math.nan)
