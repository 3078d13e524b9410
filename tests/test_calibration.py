"""Task scores on Label Studio's scale: model.calibration (ScoreScale, image_value)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.calibration import MAX_REFERENCE_VALUES, ScoreScale, image_value, squash


def balent_like_values(count: int, seed: int = 0) -> np.ndarray:
    """Heavy-tailed values like BalEntAcq's: mostly negative, some 1 / (tiny BalEnt) giants."""
    rng = np.random.default_rng(seed)
    values = -rng.gamma(2.0, 0.5, count)
    giants = rng.random(count) < 0.2
    values[giants] = 1.0 / rng.uniform(1e-6, 1e-2, giants.sum())
    return values


def test_scale_is_strictly_increasing_and_inside_the_unit_interval():
    sample = balent_like_values(64)
    scale = ScoreScale.fit(sample)
    probe = np.sort(np.concatenate([balent_like_values(2000, seed=1), [-1e9, -50.0, 1e7, 1e9], sample]))
    mapped = scale(probe)
    assert np.all((mapped > 0.0) & (mapped < 1.0))
    assert np.all(np.diff(mapped) >= 0.0)
    # strictly increasing inside the sample and in both tails
    separated = np.concatenate([[-40.0, -20.0, -10.0], np.unique(sample), [sample.max() + 1e3, sample.max() + 1e4]])
    assert np.all(np.diff(scale(separated)) > 0.0)
    assert scale(-1e9) < scale(sample.min()) < scale(np.median(sample)) < scale(sample.max()) < scale(1e9)


def test_scale_spreads_the_pool_uniformly_and_round_trips():
    sample = balent_like_values(200, seed=3)
    scale = ScoreScale.fit(sample)
    mapped = np.sort(scale(sample))
    # the mid-rank CDF of its own sample: evenly spread over (0, 1), readable numbers
    assert np.allclose(mapped, (np.arange(200) + 0.5) / 200, atol=1e-9)
    again = ScoreScale.from_dict(scale.to_dict())
    assert np.allclose(again(sample), scale(sample))


def test_scale_handles_ties_degenerate_and_bad_input():
    tied = ScoreScale.fit([1.0, 1.0, 1.0, 2.0])
    assert tied(1.0) == pytest.approx(3 / 8) and tied(2.0) == pytest.approx(7 / 8)
    single = ScoreScale.fit([5.0])
    assert single(5.0) == pytest.approx(0.5) and single(4.0) < 0.5 < single(6.0)
    assert single(math.nan) == 0.0 and single(-math.inf) == 0.0 and single(math.inf) == 1.0
    with pytest.raises(ValueError, match="finite"):
        ScoreScale.fit([math.nan, math.inf])
    with pytest.raises(ValueError, match="ScoreScale"):
        ScoreScale.from_dict({"values": [1.0]})
    large = ScoreScale.fit(np.arange(10_000, dtype=float))
    assert len(large.values) <= MAX_REFERENCE_VALUES and large.samples == MAX_REFERENCE_VALUES
    assert large(5000.0) == pytest.approx(0.5, abs=0.01)


def test_image_value_is_the_median_of_the_best_unlabeled_pixels_and_ignores_one_outlier():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(40, 50, generator=generator, dtype=torch.float64)
    best = torch.sort(scores.reshape(-1), descending=True).values[:5]
    assert image_value(scores, None) == pytest.approx(float(best.median()))
    # one extreme pixel moves the value only to the next order statistic
    spiked = scores.clone()
    spiked[3, 4] = 1e9
    assert image_value(spiked, None) == pytest.approx(float(best[1]))
    # labeled pixels are not counted
    exclude = spiked == 1e9
    assert image_value(spiked, exclude) == pytest.approx(float(best.median()))
    assert math.isnan(image_value(scores, torch.ones(40, 50, dtype=torch.bool)))


def test_squash_orders_every_magnitude():
    values = [-1e6, -3.0, -0.1, 0.0, 0.1, 3.0, 1e3, 1e6]
    mapped = [squash(v) for v in values]
    assert mapped == sorted(mapped) and len(set(mapped)) == len(mapped)
    assert all(0.0 < m < 1.0 for m in mapped) and squash(math.nan) == 0.0
