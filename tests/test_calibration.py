"""Task scores on Label Studio's scale: model.calibration (ScoreScale, image_value)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.acquisition import score_moments
from model.balent import LOWEST_SCORE, balent_from_moments
from model.calibration import MAX_REFERENCE_VALUES, TASK_VALUE, ScoreScale, StaleScoreScale, image_value, squash
from model.moments import moments_from_samples


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
        ScoreScale.from_dict({"task_value": TASK_VALUE, "values": [1.0]})
    large = ScoreScale.fit(np.arange(10_000, dtype=float))
    assert len(large.values) <= MAX_REFERENCE_VALUES and large.samples == MAX_REFERENCE_VALUES
    assert large(5000.0) == pytest.approx(0.5, abs=0.01)


def test_image_value_is_the_mean_balent_of_the_unlabeled_pixels():
    """BalEntAcq (eq. 4) ranks BalEnt just above 0 first; the image's value averages BalEnt
    itself, read back from the scores, over the pixels not yet labeled."""
    generator = torch.Generator().manual_seed(0)
    # real moments of 20 softmax samples over 4 classes, some pixels near-certain
    logits = torch.randn(20, 4, 30, 40, generator=generator, dtype=torch.float64)
    logits[:, 0, :10] += 12.0
    moments = moments_from_samples(logits.softmax(dim=1))
    acq = balent_from_moments(moments.mean, moments.second, 20)  # [30, 40]
    balent = balent_from_moments(moments.mean, moments.second, 20, acquisition=False)
    assert (balent >= 0).any() and (balent < 0).any()  # both branches of eq. 4
    assert image_value(acq) == pytest.approx(float(balent.mean()), rel=1e-12)
    labeled = torch.zeros(30, 40, dtype=torch.bool)
    labeled[:10] = True  # the near-certain rows are labeled: the rest is worth more
    assert image_value(acq, labeled) == pytest.approx(float(balent[~labeled].mean()), rel=1e-12)
    assert image_value(acq, labeled) > image_value(acq)
    # a degenerate pixel (NaN moments score LOWEST_SCORE) is left out, not averaged as -1.8e308
    broken = acq.clone()
    broken[20, 5] = LOWEST_SCORE
    keep = torch.ones(30, 40, dtype=torch.bool)
    keep[20, 5] = False
    assert image_value(broken) == pytest.approx(float(balent[keep].mean()), rel=1e-12)
    assert math.isnan(image_value(acq, torch.ones(30, 40, dtype=torch.bool)))


def test_image_value_of_other_acquisitions_is_their_mean_uncertainty():
    generator = torch.Generator().manual_seed(1)
    moments = moments_from_samples(torch.rand(10, 5, 20, 30, generator=generator).softmax(dim=1))
    entropy_scores = score_moments("entropy", moments)
    assert image_value(entropy_scores, acquisition="entropy") == pytest.approx(float(entropy_scores.mean()))
    # pMargin's random pool (scores 2 - margin) is taken back out: the value is the mean -margin
    margin_scores = score_moments("margin", moments, generator=generator)
    top2 = moments.mean.topk(2, dim=0).values
    assert (margin_scores >= 1.0).sum() == 50
    assert image_value(margin_scores, acquisition="margin") == pytest.approx(float(-(top2[0] - top2[1]).mean()))


def test_a_scale_fitted_on_other_task_values_is_refused_by_name():
    saved = ScoreScale.fit([1.0, 2.0, 3.0]).to_dict()
    assert ScoreScale.from_dict(saved)(2.0) == pytest.approx(0.5)
    older = {name: value for name, value in saved.items() if name != "task_value"}  # saved before 2026-12-07
    with pytest.raises(StaleScoreScale, match="median of the 5 best"):
        ScoreScale.from_dict(older)
    with pytest.raises(StaleScoreScale, match="another task value"):
        ScoreScale.from_dict({**saved, "task_value": "something else"})


def test_squash_orders_every_magnitude():
    values = [-1e6, -3.0, -0.1, 0.0, 0.1, 3.0, 1e3, 1e6]
    mapped = [squash(v) for v in values]
    assert mapped == sorted(mapped) and len(set(mapped)) == len(mapped)
    assert all(0.0 < m < 1.0 for m in mapped) and squash(math.nan) == 0.0
