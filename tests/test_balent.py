"""BalEnt closed form (paper 000, eqs. 1-4) against independent computations."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from model.acquisition import score_moments
from model.balent import BALENT_FLOOR, LOWEST_SCORE, balent_from_moments, beta_entropy
from model.moments import MCMoments


def numerical_beta_entropy(a: float, b: float) -> float:
    """-integral of f log f over (0, 1) for Beta(a, b), by adaptive quadrature."""
    dist = stats.beta(a, b)

    def integrand(x):
        log_pdf = dist.logpdf(x)
        return -math.exp(log_pdf) * log_pdf

    value, _ = integrate.quad(integrand, 0.0, 1.0, limit=400, points=[dist.mean()])
    return value


def test_beta_entropy_matches_numerical_integration_on_random_parameters():
    rng = np.random.default_rng(0)
    # log-uniform over [0.5, 300]: below 1 the density is unbounded at an edge,
    # above ~6 the kernel uses the asymptotic series, in between the recurrence
    a = np.exp(rng.uniform(np.log(0.5), np.log(300.0), size=40))
    b = np.exp(rng.uniform(np.log(0.5), np.log(300.0), size=40))
    closed = beta_entropy(a, b)
    numeric = np.array([numerical_beta_entropy(x, y) for x, y in zip(a, b)])
    np.testing.assert_allclose(closed, numeric, rtol=1e-6, atol=1e-7)


def test_beta_entropy_matches_scipy_special_functions_far_out():
    a = np.array([1e-3, 0.05, 1.0, 5.999, 6.0, 1e3, 1e6])
    b = np.array([2.0, 1e5, 1.0, 6.001, 0.5, 1e3, 3.0])
    reference = special.betaln(a, b) - (a - 1) * special.digamma(a) - (b - 1) * special.digamma(b) + (
        a + b - 2
    ) * special.digamma(a + b)
    np.testing.assert_allclose(beta_entropy(a, b), reference, rtol=1e-9, atol=1e-9)


def reference_balent(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Eqs. 1-3 straight from the paper with scipy, for well-posed moments [C, N]."""
    common = mean * (1 - mean) / var - 1
    alpha, beta = mean * common, (1 - mean) * common
    posterior = stats.beta(alpha + 1, beta).entropy()  # h(P_i+)
    shannon = -(mean * np.log(mean)).sum(0)
    mjent = (mean * posterior).sum(0) + shannon
    return mjent / (shannon + np.log(2))


def random_samples(num_samples=20, classes=5, pixels=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_samples, classes, pixels, generator=generator, dtype=torch.float64)
    logits += 3 * torch.randn(1, classes, pixels, generator=generator, dtype=torch.float64)
    return logits.softmax(1)  # [m, C, N]


def test_balent_matches_paper_equations_and_acquisition_rule():
    probs = random_samples()
    mean, var = probs.mean(0), probs.var(0, unbiased=True)
    second = probs.square().mean(0)
    expected = reference_balent(mean.numpy(), var.numpy())
    balent = balent_from_moments(mean, second, probs.shape[0], acquisition=False).numpy()
    np.testing.assert_allclose(balent, expected, rtol=1e-8, atol=1e-10)
    acquisition = balent_from_moments(mean, second, probs.shape[0]).numpy()
    expected_acq = np.where(expected >= 0, 1 / np.maximum(expected, BALENT_FLOOR), expected)
    np.testing.assert_allclose(acquisition, expected_acq, rtol=1e-7)
    assert (expected >= 0).any() and (expected < 0).any(), "test data should cover both branches of eq. 4"


def moments_of(mean: torch.Tensor, var: torch.Tensor, num_samples: int = 20) -> MCMoments:
    second = var * (num_samples - 1) / num_samples + mean.square()
    return MCMoments(mean, second, torch.zeros(mean.shape[1:], dtype=torch.float64), num_samples)


def test_degenerate_pixels_rank_last_and_nothing_is_infinite():
    # columns: normal, zero variance, one-hot mean (0 and 1), variance above mean(1-mean), NaN, inf
    mean = torch.tensor(
        [[0.5, 0.5, 1.0, 0.5, float("nan"), 0.5], [0.3, 0.3, 0.0, 0.3, 0.3, 0.3], [0.2, 0.2, 0.0, 0.2, 0.2, 0.2]],
        dtype=torch.float64,
    )
    var = torch.tensor(
        [[0.02, 0.0, 0.0, 0.3, 0.02, float("inf")], [0.01, 0.0, 0.0, 0.3, 0.01, 0.01], [0.01, 0.0, 0.0, 0.2, 0.01, 0.01]],
        dtype=torch.float64,
    )
    scores = score_moments("balent", moments_of(mean, var))
    assert torch.isfinite(scores).all()
    assert scores[4] == LOWEST_SCORE and scores[5] == LOWEST_SCORE
    # certain pixels (no variance, one-hot) get negative BalEnt: asked after the normal pixel
    assert scores[1] < scores[0] and scores[2] < scores[0]
    assert scores[:4].min() > LOWEST_SCORE


def test_balent_zero_is_capped_not_infinite():
    # a pixel whose BalEnt is exactly 0 would give 1/0; it must stay finite and on top
    probs = random_samples(seed=3)
    mean, second = probs.mean(0), probs.square().mean(0)
    balent = balent_from_moments(mean, second, 20, acquisition=False)
    acquisition = balent_from_moments(mean, second, 20)
    assert torch.isfinite(acquisition).all()
    assert acquisition.max() <= 1 / BALENT_FLOOR
    positive = balent >= 0
    assert torch.allclose(acquisition[positive], 1 / balent[positive])


@pytest.mark.parametrize("num_samples", [1, 2])
def test_few_samples_do_not_break_balent(num_samples):
    probs = random_samples(num_samples=num_samples)
    mean, second = probs.mean(0), probs.square().mean(0)
    assert torch.isfinite(balent_from_moments(mean, second, num_samples)).all()
