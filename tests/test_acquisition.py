"""Acquisition functions: the public contract and each heuristic's defining property."""

import math

import pytest
import torch

from model import acquisition
from model.acquisition import acquire_pixels, score, score_moments, select_pixels
from model.balent import LOWEST_SCORE
from model.moments import MomentAccumulator, entropy, moments_from_samples


def mc_probs(num_samples=20, classes=4, height=12, width=16, seed=0, spread=2.0):
    """Softmax samples [m, C, H, W] with per-pixel confidence varying across the image."""
    generator = torch.Generator().manual_seed(seed)
    base = spread * torch.randn(1, classes, height, width, generator=generator)
    noise = torch.randn(num_samples, classes, height, width, generator=generator)
    return (base + noise).softmax(1)


def seeded(seed=7):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", acquisition.names())
def test_score_contract_every_name(name):
    probs = mc_probs()
    scores = score(name, probs, generator=seeded())
    assert scores.shape == probs.shape[-2:]
    assert scores.dtype.is_floating_point
    assert torch.isfinite(scores).all()


def test_names_are_the_documented_ones():
    assert set(acquisition.names()) == {
        "balent", "bald", "powerbald", "margin", "entropy", "random", "least_confidence",
    }


def test_unknown_name_and_bad_shape_say_what_to_do():
    with pytest.raises(ValueError, match="balent"):
        score("variance_ratio", mc_probs())
    with pytest.raises(ValueError, match=r"\[m, C, H, W\]"):
        score("entropy", mc_probs()[0])


def test_streamed_moments_equal_stored_sample_statistics():
    probs = mc_probs(num_samples=13).to(torch.float64)
    accumulator = MomentAccumulator()
    for chunk in probs.split(4):  # chunks of 4, 4, 4, 1
        accumulator.update(chunk)
    moments = accumulator.result()
    assert moments.num_samples == 13
    torch.testing.assert_close(moments.mean, probs.mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(moments.variance, probs.var(0, unbiased=True), rtol=1e-9, atol=1e-14)
    stored_entropy = -(probs * probs.log()).sum(1).mean(0)
    torch.testing.assert_close(moments.mean_entropy, stored_entropy, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", acquisition.names())
def test_streaming_path_gives_the_same_scores(name):
    probs = mc_probs()
    stored = score(name, probs, generator=seeded())
    accumulator = MomentAccumulator()
    for chunk in probs.split(3):
        accumulator.update(chunk)
    streamed = score_moments(name, accumulator.result(), generator=seeded())
    torch.testing.assert_close(streamed, stored, rtol=1e-9, atol=1e-9)


def test_entropy_and_least_confidence_follow_the_mean():
    probs = mc_probs().to(torch.float64)
    mean = probs.mean(0)
    torch.testing.assert_close(score("entropy", probs), -(mean * mean.log()).sum(0))
    torch.testing.assert_close(score("least_confidence", probs), 1 - mean.max(0).values)


def test_bald_is_mutual_information_and_vanishes_without_dropout_noise():
    probs = mc_probs().to(torch.float64)
    expected = entropy(probs.mean(0), dim=0) - entropy(probs, dim=1).mean(0)
    torch.testing.assert_close(score("bald", probs), expected.clamp_min(0))
    identical = probs[:1].expand(20, -1, -1, -1)
    assert score("bald", identical).abs().max() < 1e-12


def test_random_ignores_the_model():
    first = score("random", mc_probs(seed=1), generator=seeded(3))
    second = score("random", mc_probs(seed=2, spread=9.0), generator=seeded(3))
    torch.testing.assert_close(first, second)
    assert not torch.equal(first, score("random", mc_probs(seed=1), generator=seeded(4)))
    assert 0 <= first.min() and first.max() < 1


def test_powerbald_samples_pixels_in_proportion_to_bald():
    # Gumbel-max: argmax(log BALD + Gumbel) picks pixel i with probability BALD_i / sum BALD
    probs = mc_probs(num_samples=20, classes=3, height=1, width=3, seed=5, spread=1.0)
    bald = score("bald", probs)[0]
    generator = seeded(11)
    draws = 6000
    wins = torch.zeros(3)
    for _ in range(draws):
        wins[score("powerbald", probs, generator=generator)[0].argmax()] += 1
    expected = bald / bald.sum()
    assert torch.allclose(wins / draws, expected.float(), atol=0.025), (wins / draws, expected)


def test_margin_picks_smallest_margins_inside_a_pool_of_ten_times_the_budget():
    probs = mc_probs(height=30, width=40).to(torch.float64)
    mean = probs.mean(0)
    top2 = mean.topk(2, dim=0).values
    margin = top2[0] - top2[1]
    exclude = torch.zeros(30, 40, dtype=torch.bool)
    exclude[:, :20] = True  # half the image is already labeled
    budget = 5
    coords, _ = acquire_pixels("margin", moments_from_samples(probs), budget, exclude, generator=seeded())
    scores = score("margin", probs, budget=budget, candidates=~exclude, generator=seeded())
    pool = scores >= 1.0
    assert pool.sum() == 10 * budget
    assert not (pool & exclude).any(), "the pool is drawn from candidates only"
    pool_margins = margin[pool].sort().values[:budget]
    torch.testing.assert_close(margin[coords[:, 0], coords[:, 1]], pool_margins)
    # the pool is random: the globally smallest margins are (almost surely) not all picked
    global_best = margin[~exclude].sort().values[:budget]
    assert not torch.allclose(pool_margins, global_best)


def test_select_pixels_excludes_labeled_and_ignored_and_ranks_best_first():
    scores = torch.arange(20, dtype=torch.float64).reshape(4, 5)
    scores[0, 0] = float("nan")
    exclude = torch.zeros(4, 5, dtype=torch.bool)
    exclude[3, 4] = True  # the best pixel is labeled already
    coords = select_pixels(scores, 3, exclude)
    assert coords.tolist() == [[3, 3], [3, 2], [3, 1]]
    assert len(select_pixels(scores, 100, exclude)) == 19


def test_degenerate_scores_become_lowest_priority():
    probs = mc_probs(height=2, width=3).to(torch.float64)
    moments = moments_from_samples(probs)
    moments.mean[:, 0, 0] = float("nan")
    scores = score_moments("entropy", moments)
    assert scores[0, 0] == LOWEST_SCORE
    coords = select_pixels(scores, 6)
    assert coords[-1].tolist() == [0, 0]
    assert math.isfinite(float(scores.min()))


@pytest.mark.parametrize("seed", range(6))
def test_select_pixels_matches_a_full_stable_sort(seed):
    """The topk shortcut picks exactly what sorting every eligible pixel would: ties to the
    lower flat index, non-finite scores after finite ones, excluded pixels never."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (30, 40), generator=generator).double()  # many ties
    scores[torch.rand(30, 40, generator=generator) < 0.05] = float("nan")
    scores[torch.rand(30, 40, generator=generator) < 0.02] = float("inf")
    exclude = torch.rand(30, 40, generator=generator) < 0.3
    for n in (0, 1, 5, 37, 30 * 40):
        flat = scores.reshape(-1)
        eligible = torch.nonzero(~exclude.reshape(-1), as_tuple=True)[0]
        values = torch.where(torch.isfinite(flat[eligible]), flat[eligible], torch.full_like(flat[eligible], -1e308))
        reference = eligible[torch.sort(values, descending=True, stable=True).indices[:n]]
        chosen = select_pixels(scores, n, exclude)
        assert chosen.tolist() == torch.stack([reference // 40, reference % 40], dim=1).tolist()
