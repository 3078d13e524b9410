"""From acquisition values to task scores in [0, 1] that compare across the tasks of a pool.

A task is summarised by one value, the mean uncertainty of its unlabeled pixels
(``image_value``). Such values share no scale across acquisitions (a mean BalEnt of -3 beside
one of 0.2, entropy in [0, log C], -margin in [-1, 0]) and spread differently from one model
version to the next; only their order means something. So the value is mapped through
``ScoreScale``, a monotone map fitted on a reference sample of such values (drawn by one
model version from its project's pool): the sample's empirical CDF, with rational tails
beyond the sample's range so that the map is strictly increasing everywhere and a value
outside the sample still ranks above (or below) every value in it.

A scale is fitted once per model version and kept with it, so every task that version scores
(in a pool job or in a single /predict) is placed on the same scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .acquisition import get_acquisition

MAX_REFERENCE_VALUES = 512  # a fitted scale keeps at most this many sample values
# what a scale's values are (``image_value``); a scale saved for another definition is not used
TASK_VALUE = "mean pixel uncertainty"
_OLD_TASK_VALUE = "median of the 5 best pixel scores"  # scales saved before 2026-12-07 do not say


class StaleScoreScale(ValueError):
    """A saved scale was fitted on another definition of a task's value."""


def image_value(pixel_scores: torch.Tensor, exclude: torch.Tensor | None = None, acquisition: str = "balent") -> float:
    """One image's informativeness: the mean pixel uncertainty of its unlabeled pixels.

    pixel_scores: ``[H, W]`` scores of acquisition `acquisition` (higher = ask first); exclude:
    ``[H, W]`` bool, pixels already labeled. The image's uncertainty is the mean of its pixels'
    (survey 002: Suggestive Annotation ranks images so), with the pixel uncertainty behind the
    scores (``Acquisition.uncertainty``: BalEnt, not BalEntAcq's 1 / BalEnt). It summarises the
    whole image, so another draw of the MC masks leaves the order of a project's tasks as it
    is; the median of the 5 best BalEntAcq pixels, the value before, was reordered by any
    draw (rank correlation 0.05 between two draws over 48 CamVid frames, README). NaN when
    every pixel is labeled or degenerate.
    """
    # [H, W], NaN where a pixel is degenerate
    uncertainty = get_acquisition(acquisition).uncertainty(pixel_scores.to(torch.float64))
    counted = ~uncertainty.isnan()
    if exclude is not None:
        counted &= ~exclude.to(counted.device)
    count = int(counted.sum())
    # a sum over a mask: indexing the counted pixels out first cost 3x as much at 480x360
    return float(torch.where(counted, uncertainty, 0.0).sum()) / count if count else math.nan


@dataclass(frozen=True)
class ScoreScale:
    """A strictly increasing map from acquisition values to (0, 1): 1 = most informative.

    values: the sample's distinct values, ascending; quantiles: the mid-rank empirical CDF at
    each (in (0, 1), ascending); low_width / high_width: the lengths over which the tails below
    and above the sample halve.
    """

    values: tuple[float, ...]
    quantiles: tuple[float, ...]
    low_width: float
    high_width: float
    samples: int

    @classmethod
    def fit(cls, sample) -> ScoreScale:
        """Fit on acquisition values (one per task); non-finite ones are dropped."""
        values = np.asarray(sample, dtype=np.float64).reshape(-1)
        values = np.sort(values[np.isfinite(values)])
        if values.size == 0:
            raise ValueError("ScoreScale.fit needs at least one finite acquisition value.")
        if values.size > MAX_REFERENCE_VALUES:  # evenly spaced order statistics keep the shape
            values = values[np.linspace(0, values.size - 1, MAX_REFERENCE_VALUES).round().astype(int)]
        distinct, counts = np.unique(values, return_counts=True)
        below = np.concatenate([[0], np.cumsum(counts)[:-1]])
        quantiles = (below + counts / 2.0) / values.size  # mid-rank: ties share one quantile
        # tails decay over the typical gap between sample values (or the value's own size)
        span = float(distinct[-1] - distinct[0])
        typical_gap = span / max(len(distinct) - 1, 1)
        fallback = max(abs(float(distinct[0])), abs(float(distinct[-1])), 1e-12)
        width = typical_gap if typical_gap > 0 else fallback
        return cls(tuple(map(float, distinct)), tuple(map(float, quantiles)), width, width, int(values.size))

    def __call__(self, value) -> np.ndarray | float:
        """The informativeness in (0, 1) of `value` (scalar or array); NaN and -inf map to 0, +inf to 1."""
        t = np.asarray(value, dtype=np.float64)
        xs, ps = np.asarray(self.values), np.asarray(self.quantiles)
        out = np.interp(t, xs, ps)
        with np.errstate(over="ignore", invalid="ignore"):
            # rational tails: they never round to exactly 0 or 1 for a finite value, unlike exp
            low = ps[0] / (1.0 + np.maximum(xs[0] - t, 0.0) / self.low_width)
            high = 1.0 - (1.0 - ps[-1]) / (1.0 + np.maximum(t - xs[-1], 0.0) / self.high_width)
        out = np.where(t < xs[0], low, np.where(t > xs[-1], high, out))
        out = np.where(np.isnan(t), 0.0, out)
        return float(out) if out.ndim == 0 else out

    def to_dict(self) -> dict:
        return {
            "task_value": TASK_VALUE,
            "values": list(self.values),
            "quantiles": list(self.quantiles),
            "low_width": self.low_width,
            "high_width": self.high_width,
            "samples": self.samples,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ScoreScale:
        """The scale `to_dict` saved; StaleScoreScale when it was fitted on other task values
        (before 2026-12-07 a task's value was the median of its 5 best BalEntAcq pixels)."""
        definition = data.get("task_value", _OLD_TASK_VALUE) if isinstance(data, dict) else TASK_VALUE
        if definition != TASK_VALUE:
            raise StaleScoreScale(f"it was fitted on another task value ({str(definition)[:80]!r}, now {TASK_VALUE!r})")
        try:
            scale = cls(
                tuple(float(v) for v in data["values"]),
                tuple(float(q) for q in data["quantiles"]),
                float(data["low_width"]),
                float(data["high_width"]),
                int(data["samples"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"Not a ScoreScale: {error}") from error
        if not scale.values or len(scale.values) != len(scale.quantiles) or scale.low_width <= 0 or scale.high_width <= 0:
            raise ValueError("Not a ScoreScale: empty, mismatched or with non-positive tail widths.")
        return scale


def squash(value: float) -> float:
    """A fixed increasing map to (0, 1), for values with no fitted scale (a model saved before
    scales existed): the logistic of asinh, so 1e6 and 1e3 still differ."""
    if math.isnan(value):
        return 0.0
    return 1.0 / (1.0 + math.exp(-math.asinh(value)))
