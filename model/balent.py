"""BalEnt / BalEntAcq (paper 000, eqs. 1-4) as one fused per-pixel kernel.

For every pixel and class i, the MC mean and unbiased variance of P_i give Beta(alpha, beta)
by the method of moments; the conjugate posterior after observing the label is
P_i+ ~ Beta(alpha + 1, beta), whose differential entropy is closed form:

    h(a, b) = ln B(a, b) - (a - 1) psi(a) - (b - 1) psi(b) + (a + b - 2) psi(a + b)

    MJEnt   = sum_i E[P_i] h(P_i+) + H          (H = entropy of the mean, counted once)
    BalEnt  = MJEnt / (H + ln 2)
    BalEntAcq = 1 / BalEnt if BalEnt >= 0 else BalEnt

Computed with torch's lgamma/digamma this costs about 11x a plain entropy (six special
functions per class and pixel, each a pass over memory). Here lnGamma and psi share one
logarithm per argument: arguments below 6 are shifted up by the recurrences
(lnGamma(x) = lnGamma(x+k) - ln prod, psi(x) = psi(x+k) - sum 1/(x+j), the sum kept as
prod'/prod so it costs one division), then the Stirling / de Moivre asymptotic series
(truncation error below 1e-11 for x >= 6) finish the job; one numba loop does it all.

Numerical edge cases, chosen on purpose:
- mean clamped to [MEAN_EPS, 1 - MEAN_EPS]: float32 softmax gives exact 0 and 1.
- variance clamped to [VAR_FLOOR, mean (1 - mean) (1 - 1e-6)]: zero variance (all samples
  equal) would make alpha, beta infinite; the unbiased variance of samples that are all
  0 or 1 can exceed mean (1 - mean), which no Beta has. Both limits give a very negative
  posterior entropy, so such pixels land at the bottom of the ranking, as confident
  pixels should.
- BalEnt in [0, BALENT_FLOOR) is raised to BALENT_FLOOR, so BalEntAcq is at most
  1 / BALENT_FLOOR and never +inf.
- a pixel with any NaN or inf moment scores LOWEST_SCORE (the most negative float64): it
  is ranked after every real pixel and stays JSON-serializable.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

MEAN_EPS = 1e-7
VAR_FLOOR = 1e-14
VAR_CEILING_FACTOR = 1.0 - 1e-6
BALENT_FLOOR = 1e-12
LOWEST_SCORE = float(np.finfo(np.float64).min)
_LOG2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_SHIFT_TO = 6.0


@numba.njit(cache=True, inline="always")
def _lgamma_digamma(x: float) -> tuple[float, float]:
    """(ln Gamma(x), psi(x)) for x > 0 with one log for both (two when x < 6)."""
    prod = 1.0  # prod_j (x + j) over the shift
    dprod = 0.0  # its derivative: sum_j 1/(x+j) = dprod / prod
    while x < _SHIFT_TO:
        dprod = dprod * x + prod
        prod *= x
        x += 1.0
    log_x = math.log(x)
    inv = 1.0 / x
    inv2 = inv * inv
    lgamma = (x - 0.5) * log_x - x + _HALF_LOG_2PI + inv * (
        1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 * (1.0 / 1260.0 - inv2 * (1.0 / 1680.0 - inv2 / 1188.0)))
    )
    digamma = log_x - 0.5 * inv - inv2 * (
        1.0 / 12.0 - inv2 * (1.0 / 120.0 - inv2 * (1.0 / 252.0 - inv2 * (1.0 / 240.0 - inv2 / 132.0)))
    )
    if prod != 1.0:
        lgamma -= math.log(prod)
        digamma -= dprod / prod
    return lgamma, digamma


@numba.njit(cache=True, inline="always")
def _beta_entropy(a: float, b: float) -> float:
    lg_a, psi_a = _lgamma_digamma(a)
    lg_b, psi_b = _lgamma_digamma(b)
    lg_ab, psi_ab = _lgamma_digamma(a + b)
    return lg_a + lg_b - lg_ab - (a - 1.0) * psi_a - (b - 1.0) * psi_b + (a + b - 2.0) * psi_ab


@numba.njit(cache=True, parallel=True)
def _balent_kernel(mean, second, num_samples, acquisition, out):  # pragma: no cover - numba
    """mean, second: [C, N] float64; out: [N] float64 (BalEnt or BalEntAcq)."""
    num_classes, num_pixels = mean.shape
    unbias = num_samples / (num_samples - 1.0) if num_samples > 1 else 0.0
    for n in numba.prange(num_pixels):
        shannon = 0.0
        posterior = 0.0
        finite = True
        for c in range(num_classes):
            m = mean[c, n]
            s = second[c, n]
            if not (math.isfinite(m) and math.isfinite(s)):
                finite = False
                break
            mu = min(max(m, MEAN_EPS), 1.0 - MEAN_EPS)
            shannon -= mu * math.log(mu)
            bound = mu * (1.0 - mu)
            var = min(max((s - m * m) * unbias, VAR_FLOOR), bound * VAR_CEILING_FACTOR)
            common = bound / var - 1.0
            posterior += mu * _beta_entropy(mu * common + 1.0, (1.0 - mu) * common)
        if not finite:
            out[n] = LOWEST_SCORE
            continue
        balent = (posterior + shannon) / (shannon + _LOG2)
        if acquisition:
            out[n] = 1.0 / max(balent, BALENT_FLOOR) if balent >= 0.0 else balent
        else:
            out[n] = balent


@numba.njit(cache=True)
def _beta_entropy_array(a, b, out):  # pragma: no cover - numba
    for i in range(a.shape[0]):
        out[i] = _beta_entropy(a[i], b[i])


def beta_entropy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Differential entropy (nats) of Beta(a, b), elementwise; the kernel's own formula."""
    a64 = np.ascontiguousarray(np.broadcast_to(a, np.broadcast(a, b).shape), dtype=np.float64).ravel()
    b64 = np.ascontiguousarray(np.broadcast_to(b, np.broadcast(a, b).shape), dtype=np.float64).ravel()
    out = np.empty_like(a64)
    _beta_entropy_array(a64, b64, out)
    return out.reshape(np.broadcast(a, b).shape)


def balent_from_moments(
    mean: torch.Tensor, second: torch.Tensor, num_samples: int, acquisition: bool = True
) -> torch.Tensor:
    """BalEntAcq (or plain BalEnt) per pixel: ``[C, *spatial]`` moments -> ``[*spatial]`` float64."""
    spatial = mean.shape[1:]
    mean_np = np.ascontiguousarray(mean.detach().to("cpu", torch.float64).reshape(mean.shape[0], -1).numpy())
    second_np = np.ascontiguousarray(second.detach().to("cpu", torch.float64).reshape(mean.shape[0], -1).numpy())
    out = np.empty(mean_np.shape[1], dtype=np.float64)
    _balent_kernel(mean_np, second_np, float(num_samples), acquisition, out)
    return torch.from_numpy(out).reshape(spatial).to(mean.device)
