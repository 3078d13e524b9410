"""BalEnt / BalEntAcq (paper 000, eqs. 1-4) as one fused numba kernel.

For every pixel and class i, the MC mean and unbiased variance of P_i give Beta(alpha, beta)
by the method of moments; the conjugate posterior after observing the label is
P_i+ ~ Beta(alpha + 1, beta), whose differential entropy is closed form:

    h(a, b) = ln B(a, b) - (a - 1) psi(a) - (b - 1) psi(b) + (a + b - 2) psi(a + b)

    MJEnt   = sum_i E[P_i] h(P_i+) + H          (H = entropy of the mean, counted once)
    BalEnt  = MJEnt / (H + ln 2)
    BalEntAcq = 1 / BalEnt if BalEnt >= 0 else BalEnt

Computed with torch's lgamma/digamma this costs 11-16x a plain entropy (six special
functions per class and pixel, each a pass over memory), and ln B(a, b) cancels
catastrophically when a or b is large (confident pixels: alpha, beta ~ 1e8 and more).
Both are fixed by rewriting with g(x) = ln Gamma(x) - (x - 1) psi(x) + x:

    h(a, b) = g(a) + g(b) - g(a + b) - psi(a + b)

(the +x terms cancel exactly). g(x) = ln(x)/2 + ln(2 pi)/2 + 1/2 - 1/(3x) - ... grows
like a logarithm, so nothing large is subtracted. Arguments below 6 are shifted up by
the recurrences (ln Gamma(x) = ln Gamma(x+k) - ln prod, psi(x) = psi(x+k) - sum 1/(x+j),
the sum kept as prod'/prod so it costs one division); then the asymptotic series, whose
truncation error is below 1e-11 for x >= 6, share one logarithm per argument. When both
a and b are >= 6 (most classes of most pixels), the logarithms of g(a), g(b), g(a+b) and
psi(a+b) merge into one, ln(a b / (a+b)^3): two logarithms per class and pixel in all,
against one for the entropy. See ``_balent_kernel`` for how the loops are laid out.

Those logarithms are taken by ``_log_positive``, not libm: numba's LLVM has no vector math
library (SVML) on this install, so ``math.log`` is a scalar call per element, and the two
calls were 5.5 of the kernel's 9.3 ms on a 480x360 image. ``_log_positive`` splits the
float64 bits into exponent and mantissa and sums an atanh series, all plain arithmetic that
LLVM vectorizes (within 1e-15 of libm): the kernel takes about a third of the time, and its
BalEnt is within 1e-13 (relative) of the libm build's.

Numerical edge cases, chosen on purpose:
- mean clamped to [MEAN_MIN, MEAN_MAX] = [1e-30, 1 - 1e-15]: float32 softmax gives exact
  0 and 1, and 1 - 1e-30 would round back to 1 in float64.
- variance clamped to mean (1 - mean) [1e-15, 1 - 1e-6] (so alpha + beta <= 1e15): zero
  variance (all samples equal) would make alpha, beta infinite; the unbiased variance of
  samples that are all 0 or 1 can exceed mean (1 - mean), which no Beta has. Both limits give a very negative
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

from .vector_math import FASTMATH as _FASTMATH
from .vector_math import log_positive as _log_positive

MEAN_MIN = 1e-30
MEAN_MAX = 1.0 - 1e-15
VAR_FLOOR_FACTOR = 1e-15
VAR_CEILING_FACTOR = 1.0 - 1e-6
BALENT_FLOOR = 1e-12
LOWEST_SCORE = float(np.finfo(np.float64).min)
_LOG2 = math.log(2.0)
_G_CONSTANT = 0.5 * (math.log(2.0 * math.pi) + 1.0)
_SHIFT_TO = 6.0


@numba.njit(cache=True, inline="always")
def _g_tail(inv: float) -> float:
    """g(x) - ln(x)/2 - (ln(2 pi) + 1)/2 as a series in inv = 1/x (x >= 6)."""
    return -inv * (
        1.0 / 3.0
        + inv * (1.0 / 12.0 + inv * (1.0 / 90.0 - inv * (1.0 / 120.0 + inv * (1.0 / 210.0 - inv * (
            1.0 / 252.0 + inv * (1.0 / 210.0 - inv * (1.0 / 240.0 + inv * (5.0 / 594.0 - inv / 132.0))))))))
    )


@numba.njit(cache=True, inline="always")
def _digamma_tail(inv: float) -> float:
    """psi(x) - ln(x) as a series in inv = 1/x (x >= 6)."""
    inv2 = inv * inv
    return -0.5 * inv - inv2 * (
        1.0 / 12.0 - inv2 * (1.0 / 120.0 - inv2 * (1.0 / 252.0 - inv2 * (1.0 / 240.0 - inv2 / 132.0)))
    )


@numba.njit(cache=True, inline="always")
def _g_digamma(x: float) -> tuple[float, float]:
    """(g(x), psi(x)) for x > 0, g(x) = ln Gamma(x) - (x - 1) psi(x) + x."""
    shift = 0.0
    prod = 1.0  # prod_j (x + j) over the shift
    dprod = 0.0  # its derivative, so that sum_j 1/(x + j) = dprod / prod
    x0 = x
    while x < _SHIFT_TO:
        dprod = dprod * x + prod
        prod *= x
        x += 1.0
        shift += 1.0
    log_x = math.log(x)
    inv = 1.0 / x
    digamma = log_x + _digamma_tail(inv)
    g = 0.5 * log_x + _G_CONSTANT + _g_tail(inv)
    if shift > 0.0:
        harmonic = dprod / prod  # sum_j 1/(x0 + j)
        # g(x0) = g(x) - k + k psi(x) - ln prod + (x0 - 1) sum_j 1/(x0 + j), x = x0 + k
        g += shift * (digamma - 1.0) - math.log(prod) + (x0 - 1.0) * harmonic
        digamma -= harmonic
    return g, digamma


@numba.njit(cache=True, inline="always")
def _beta_entropy_large_parts(a: float, b: float) -> tuple[float, float]:
    """h(a, b) = parts[1] + ln(parts[0]) / 2 for a, b >= 6, with no logarithm taken here.

    The four logarithms of g(a), g(b), g(a+b) and psi(a+b) merge into ln(a b / (a+b)^3);
    one division gives 1/a, 1/b and 1/(a+b).
    """
    total = a + b
    reciprocal = 1.0 / (a * b * total)
    inv_total = a * b * reciprocal
    series = (
        _G_CONSTANT
        + _g_tail(b * total * reciprocal)
        + _g_tail(a * total * reciprocal)
        - _g_tail(inv_total)
        - _digamma_tail(inv_total)
    )
    return a * b / (total * total * total), series


@numba.njit(cache=True, inline="always")
def _beta_entropy_any(a: float, b: float) -> float:
    g_a, _ = _g_digamma(a)
    g_b, _ = _g_digamma(b)
    g_ab, psi_ab = _g_digamma(a + b)
    return g_a + g_b - g_ab - psi_ab


@numba.njit(cache=True, inline="always")
def _beta_entropy(a: float, b: float) -> float:
    if a >= _SHIFT_TO and b >= _SHIFT_TO:
        ratio, series = _beta_entropy_large_parts(a, b)
        return series + 0.5 * math.log(ratio)
    return _beta_entropy_any(a, b)


@numba.njit(cache=True, inline="always")
def _posterior_parameters(m: float, s: float, unbias: float) -> tuple[float, float, float]:
    """(clamped mean, alpha + 1, beta) of the conjugate posterior from E[p] and E[p^2]."""
    mu = min(max(m, MEAN_MIN), MEAN_MAX)
    bound = mu * (1.0 - mu)
    var = min(max((s - m * m) * unbias, bound * VAR_FLOOR_FACTOR), bound * VAR_CEILING_FACTOR)
    common = bound / var - 1.0  # alpha + beta, method of moments
    return mu, mu * common + 1.0, (1.0 - mu) * common


@numba.njit(cache=True, parallel=True, fastmath=_FASTMATH)
def _balent_kernel(mean, second, rows, cols, num_samples, acquisition, out):  # pragma: no cover - numba
    """mean, second: [C, r, w] float64, any strides; out: [R, W] float64 (BalEnt or BalEntAcq).

    rows = (rows0, rows1, row_weight) ([R] each) and cols = (cols0, cols1, col_weight) ([W]
    each): output pixel (k, j) reads the moments bilinearly interpolated between rows rows0[k]
    and rows1[k] (weight row_weight[k] on the second) and columns cols0[j] and cols1[j]. The
    identity taps (k, k, 0) read moments at the image resolution as they are; the taps of a
    bilinear upsampling read coarse moments, which then never exist at the image resolution.

    Image rows run in parallel, so a cropped (strided) view needs no copy. Inside a row,
    [C, W] scratch arrays keep the loops apart: the arithmetic (no calls, so LLVM
    vectorizes it), the two logarithms per element (``_log_positive``: mu >= MEAN_MIN and
    the ratio are positive normal numbers; a NaN pixel's garbage is overwritten below), and
    the per-pixel sums. Elements with alpha + 1 or beta below 6 (rare: tiny variance
    relative to a tiny mean) take the general formula in one more loop.
    """
    num_classes = mean.shape[0]
    num_rows, size = out.shape
    rows0, rows1, row_weight = rows
    cols0, cols1, col_weight = cols
    unbias = num_samples / (num_samples - 1.0) if num_samples > 1 else 0.0
    for row in numba.prange(num_rows):
        # the row into contiguous scratch: loops over C-ordered arrays vectorize, strided ones do not
        row_mean = np.empty((num_classes, size))
        row_second = np.empty((num_classes, size))
        top, bottom, down = rows0[row], rows1[row], row_weight[row]
        for c in range(num_classes):  # identity taps (weight 0, same cell) copy exactly
            for i in range(size):
                left, right, across = cols0[i], cols1[i], col_weight[i]
                upper = (1.0 - across) * mean[c, top, left] + across * mean[c, top, right]
                lower = (1.0 - across) * mean[c, bottom, left] + across * mean[c, bottom, right]
                row_mean[c, i] = (1.0 - down) * upper + down * lower
                upper = (1.0 - across) * second[c, top, left] + across * second[c, top, right]
                lower = (1.0 - across) * second[c, bottom, left] + across * second[c, bottom, right]
                row_second[c, i] = (1.0 - down) * upper + down * lower
        mu = np.empty((num_classes, size))  # clamped E[P_i]
        ratio = np.empty((num_classes, size))  # a b / (a + b)^3, 1 where small
        rest = np.empty((num_classes, size))  # E[P_i] (h(P_i+) - ln(ratio) / 2), 0 where small
        small = np.empty((num_classes, size), dtype=np.bool_)
        finite = np.ones(size, dtype=np.bool_)  # every moment of the pixel is finite
        any_small = False
        for c in range(num_classes):
            for i in range(size):
                m = row_mean[c, i]
                s = row_second[c, i]
                finite[i] &= math.isfinite(m) & math.isfinite(s)
                mu_ci, a, b = _posterior_parameters(m, s, unbias)
                large_ratio, series = _beta_entropy_large_parts(a, b)
                is_small = a < _SHIFT_TO or b < _SHIFT_TO
                mu[c, i] = mu_ci
                small[c, i] = is_small
                any_small |= is_small
                ratio[c, i] = 1.0 if is_small else large_ratio
                rest[c, i] = 0.0 if is_small else mu_ci * series
        scratch = np.empty(num_classes * size)
        log_mu = np.empty((num_classes, size))
        log_ratio = np.empty((num_classes, size))
        _log_positive(mu.reshape(-1), scratch, log_mu.reshape(-1))
        _log_positive(ratio.reshape(-1), scratch, log_ratio.reshape(-1))
        shannon = np.zeros(size)  # H[x]
        posterior = np.zeros(size)  # sum_i E[P_i] h(P_i+)
        for c in range(num_classes):
            for i in range(size):
                shannon[i] -= mu[c, i] * log_mu[c, i]
                posterior[i] += rest[c, i] + 0.5 * mu[c, i] * log_ratio[c, i]
        for c in range(num_classes if any_small else 0):
            for i in range(size):
                if small[c, i]:
                    mu_ci, a, b = _posterior_parameters(row_mean[c, i], row_second[c, i], unbias)
                    posterior[i] += mu_ci * _beta_entropy_any(a, b)
        for i in range(size):
            balent = (posterior[i] + shannon[i]) / (shannon[i] + _LOG2)
            if not (finite[i] and math.isfinite(balent)):
                out[row, i] = LOWEST_SCORE
            elif not acquisition:
                out[row, i] = balent
            else:
                out[row, i] = 1.0 / max(balent, BALENT_FLOOR) if balent >= 0.0 else balent


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


def _as_rows(moment: torch.Tensor) -> np.ndarray:
    """``[C, *spatial]`` -> a float64 numpy view ``[C, rows, width]`` (copies only when it must)."""
    moment = moment.detach().to("cpu", torch.float64)
    if moment.ndim == 3:
        return moment.numpy()  # any strides: a cropped view stays a view
    return moment.reshape(moment.shape[0], 1, -1).numpy()


def balent_from_moments(
    mean: torch.Tensor, second: torch.Tensor, num_samples: int, acquisition: bool = True
) -> torch.Tensor:
    """BalEntAcq (or plain BalEnt) per pixel: ``[C, *spatial]`` moments -> ``[*spatial]`` float64."""
    if mean.shape != second.shape or mean.ndim < 2:
        raise ValueError(f"mean and second must both be [C, *spatial], got {tuple(mean.shape)}, {tuple(second.shape)}.")
    mean_rows, second_rows = _as_rows(mean), _as_rows(second)
    out = np.empty(mean_rows.shape[1:], dtype=np.float64)
    rows, cols = (_identity_taps(count) for count in out.shape)
    _balent_kernel(mean_rows, second_rows, rows, cols, float(num_samples), acquisition, out)
    return torch.from_numpy(out).reshape(mean.shape[1:]).to(mean.device)


Taps = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (first cell, second cell, weight of the second), per pixel


def _identity_taps(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cells = np.arange(count, dtype=np.int64)
    return cells, cells, np.zeros(count)


def _kernel_taps(taps: Taps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    first, second, weight = (t.detach().cpu().numpy() for t in taps)
    return (np.ascontiguousarray(first, dtype=np.int64), np.ascontiguousarray(second, dtype=np.int64),
            np.ascontiguousarray(weight, dtype=np.float64))  # fmt: skip


def balent_from_coarse_moments(
    mean: torch.Tensor, second: torch.Tensor, num_samples: int, rows: Taps, cols: Taps, acquisition: bool = True
) -> torch.Tensor:
    """BalEnt(Acq) ``[H, W]`` of the bilinearly upsampled moments, from decoder-resolution
    moments ``[C, h, w]``, without upsampling them to ``[C, H, W]``.

    `rows` and `cols` are ``model.network.bilinear_taps`` of the image's rows ``[H]`` and
    columns ``[W]`` (what ``BayesianSegmenter.upsample`` interpolates with). The kernel
    interpolates each image row from the coarse moments as it scores it, so two float64
    ``[C, H, W]`` maps (33 MB for a 480x360 image and 11 classes) are never written and read
    back. Equal to ``balent_from_moments`` of the upsampled moments to float64 rounding."""
    if mean.shape != second.shape or mean.ndim != 3:
        raise ValueError(f"mean and second must both be [C, h, w], got {tuple(mean.shape)}, {tuple(second.shape)}.")
    row_taps, col_taps = _kernel_taps(rows), _kernel_taps(cols)
    out = np.empty((len(row_taps[0]), len(col_taps[0])), dtype=np.float64)
    _balent_kernel(_as_rows(mean), _as_rows(second), row_taps, col_taps, float(num_samples), acquisition, out)
    return torch.from_numpy(out).to(mean.device)
