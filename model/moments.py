"""Per-pixel moments of MC-dropout softmax samples, accumulated while streaming.

Every acquisition function in ``model.acquisition`` needs only these three per-pixel
statistics of the m samples, so inference never has to hold ``[m, C, H, W]``:

- ``mean``: E_s[p_c]            ``[C, *spatial]`` float64
- ``second``: E_s[p_c^2]        ``[C, *spatial]`` float64 (gives the variance)
- ``mean_entropy``: E_s[H(p_s)] ``[*spatial]`` float64 (the aleatoric term of BALD); only
  BALD-type acquisitions read it, and it costs about as much as the other two together (one
  float64 log per sample, class and pixel), so it is accumulated only when asked for

All three are linear in the samples, so they can be summed chunk by chunk and, being
linear, interpolated to another resolution consistently (``MCMoments.map_spatial``).

On the CPU, ``MomentAccumulator.update_logits`` takes a chunk as logits and does softmax
and sums in one numba pass (``_softmax_moment_kernel``): in torch, softmax, the float64 copy,
the square and the two sums are five passes over a 10-20 MB chunk (7 ms for a 480x360 image,
against 5.7 ms for the pass, beside the 12 ms matrix product that made the logits).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import torch

from .vector_math import EXP_INPUT_MIN, FASTMATH_NO_REASSOC, exp_nonpositive, log_positive


def entropy(probs: torch.Tensor, dim: int) -> torch.Tensor:
    """Shannon entropy in nats along `dim`, with 0 log 0 = 0 (float32 softmax gives exact zeros)."""
    return -torch.special.xlogy(probs, probs).sum(dim)


@dataclass
class MCMoments:
    mean: torch.Tensor  # [C, *spatial] float64
    second: torch.Tensor  # [C, *spatial] float64
    mean_entropy: torch.Tensor | None  # [*spatial] float64; None when not accumulated
    num_samples: int

    @property
    def num_classes(self) -> int:
        return self.mean.shape[0]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[1:])

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased per-class variance ``[C, *spatial]`` (0 when m == 1); never negative."""
        m = self.num_samples
        if m < 2:
            return torch.zeros_like(self.mean)
        return ((self.second - self.mean.square()) * (m / (m - 1))).clamp_min(0.0)

    def map_spatial(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> MCMoments:
        """Apply a linear spatial map (interpolation, crop) to all three moments.

        `fn` takes and returns ``[K, *spatial]`` tensors.
        """
        mean_entropy = None if self.mean_entropy is None else fn(self.mean_entropy.unsqueeze(0)).squeeze(0)
        return MCMoments(fn(self.mean), fn(self.second), mean_entropy, self.num_samples)


class MomentAccumulator:
    """Sums per-pixel moments over chunks of MC samples in float64 (the per-sample entropies
    only with ``mean_entropy=True``)."""

    def __init__(self, mean_entropy: bool = True) -> None:
        self.with_mean_entropy = mean_entropy
        self._sum_p: torch.Tensor | None = None  # [C, *spatial]
        self._sum_p2: torch.Tensor | None = None  # [C, *spatial]
        self._sum_entropy: torch.Tensor | None = None  # [*spatial]
        self.num_samples = 0

    def update(self, probs: torch.Tensor) -> None:
        """Add a chunk of softmax samples ``[k, C, *spatial]`` (k = samples in the chunk).

        Everything is computed in float64, the per-sample entropies included: BALD is the
        small difference of two entropies, and float32 noise (~1e-7) would swamp it.
        """
        if probs.ndim < 2:
            raise ValueError(f"Expected samples [k, C, ...], got shape {tuple(probs.shape)}.")
        probs = probs.to(torch.float64)
        sum_p = probs.sum(0)
        sum_p2 = probs.square().sum(0)
        sum_entropy = entropy(probs, dim=1).sum(0) if self.with_mean_entropy else None
        if self._sum_p is None:
            self._sum_p, self._sum_p2, self._sum_entropy = sum_p, sum_p2, sum_entropy
        else:
            if sum_p.shape != self._sum_p.shape:
                raise ValueError(f"Chunk shape {tuple(sum_p.shape)} differs from {tuple(self._sum_p.shape)}.")
            self._sum_p += sum_p
            self._sum_p2 += sum_p2
            if sum_entropy is not None:
                self._sum_entropy += sum_entropy
        self.num_samples += probs.shape[0]

    def update_logits(self, logits: torch.Tensor, base: torch.Tensor | None = None) -> None:
        """Add a chunk of k samples given as logits ``[k, C, *spatial]``: softmax over C, then the sums.

        With `base` ``[C, *spatial]`` (float32), sample s's logits are ``base + logits[s]``:
        `logits` then holds each sample's deviation from the shared deterministic logits, in
        any float dtype (``model.mc_dropout`` computes those in bf16, where they are small).
        On the CPU one numba pass takes the softmax in float64 and adds the sums; elsewhere
        (CUDA) torch's float32 softmax feeds ``update``. The two agree to the float32
        rounding of the softmax (1e-7).
        """
        if logits.ndim < 2:
            raise ValueError(f"Expected logits [k, C, ...], got shape {tuple(logits.shape)}.")
        if base is not None and base.shape != logits.shape[1:]:
            raise ValueError(f"base {tuple(base.shape)} must be one sample's shape {tuple(logits.shape[1:])}.")
        if logits.device.type != "cpu":
            if base is not None:
                logits = logits.float() + base.float().unsqueeze(0)
            self.update(logits.softmax(dim=1))
            return
        samples, classes, *spatial = logits.shape
        if self._sum_p is None:
            self._sum_p = torch.zeros(classes, *spatial, dtype=torch.float64)
            self._sum_p2 = torch.zeros(classes, *spatial, dtype=torch.float64)
            self._sum_entropy = torch.zeros(spatial, dtype=torch.float64) if self.with_mean_entropy else None
        elif self._sum_p.shape != logits.shape[1:]:
            raise ValueError(f"Chunk shape {tuple(logits.shape[1:])} differs from {tuple(self._sum_p.shape)}.")
        with_entropy = self._sum_entropy is not None
        base_rows = np.zeros((0, 0), dtype=np.float32)
        if base is not None:
            base_rows = base.detach().to(torch.float32).reshape(classes, -1).contiguous().numpy()  # [C, n]
        _softmax_moment_kernel(
            logits.detach().to(torch.float32).reshape(samples, classes, -1).numpy(),  # a view when it can be
            base_rows, base is not None,
            self._sum_p.view(classes, -1).numpy(), self._sum_p2.view(classes, -1).numpy(),
            self._sum_entropy.view(-1).numpy() if with_entropy else np.zeros(0), with_entropy,
        )  # fmt: skip
        self.num_samples += samples

    def result(self) -> MCMoments:
        if self._sum_p is None:
            raise ValueError("No samples were accumulated.")
        m = self.num_samples
        mean_entropy = None if self._sum_entropy is None else self._sum_entropy / m
        return MCMoments(self._sum_p / m, self._sum_p2 / m, mean_entropy, m)


_KERNEL_BLOCK = 256  # pixels per block: a block's [C, block] float64 scratch stays in the L1/L2 cache


@numba.njit(cache=True, parallel=True, fastmath=FASTMATH_NO_REASSOC)
def _softmax_moment_kernel(logits, base, with_base, sum_p, sum_p2, sum_entropy, with_entropy):  # pragma: no cover
    """logits: [k, C, n] float32, any strides (contiguous pixels are fastest), plus base
    [C, n] float32 (the same for every sample) with `with_base`. Adds sum_s p_s
    to sum_p [C, n], sum_s p_s^2 to sum_p2 [C, n] (float64) and, with `with_entropy`,
    sum_s H(p_s) to sum_entropy [n], where p_s = softmax over C of sample s's logits, taken
    in float64.

    Blocks of pixels run in parallel; inside one, the sample's logits are copied class-major
    into [C, block] float64 scratch, where every loop runs along pixels and vectorizes
    (``exp_nonpositive`` needs no calls). ln p_s = x - ln(sum exp x) with x the max-shifted
    logits, so the entropy costs one logarithm per pixel and sample, not per class. A NaN or
    inf logit makes the pixel's sums NaN.
    """
    samples, classes, pixels = logits.shape
    for block in numba.prange((pixels + _KERNEL_BLOCK - 1) // _KERNEL_BLOCK):
        start = block * _KERNEL_BLOCK
        size = min(_KERNEL_BLOCK, pixels - start)
        shifted = np.empty((classes, size))
        exps = np.empty((classes, size))
        scratch = np.empty(classes * size)
        peak = np.empty(size)
        total = np.empty(size)
        log_total = np.empty(size)
        block_p = np.zeros((classes, size))
        block_p2 = np.zeros((classes, size))
        block_entropy = np.zeros(size)
        finite = np.ones(size, dtype=np.bool_)
        block_base = np.zeros((classes, size) if with_base else (0, 0))  # the block's base, once
        if with_base:
            for c in range(classes):
                for i in range(size):
                    value = base[c, start + i]
                    finite[i] &= math.isfinite(value)
                    block_base[c, i] = value
        for s in range(samples):
            if with_base:  # added in float64, where the deviation stays exact
                for c in range(classes):
                    for i in range(size):
                        value = logits[s, c, start + i]
                        finite[i] &= math.isfinite(value)
                        shifted[c, i] = value + block_base[c, i]
            else:
                for c in range(classes):
                    for i in range(size):
                        value = logits[s, c, start + i]
                        finite[i] &= math.isfinite(value)
                        shifted[c, i] = value
            peak[:] = shifted[0]
            for c in range(1, classes):
                for i in range(size):
                    peak[i] = max(peak[i], shifted[c, i])
            for c in range(classes):
                for i in range(size):
                    shifted[c, i] = max(shifted[c, i] - peak[i], EXP_INPUT_MIN)
            exp_nonpositive(shifted.reshape(-1), scratch, exps.reshape(-1))
            total[:] = 0.0
            for c in range(classes):
                for i in range(size):
                    total[i] += exps[c, i]
            for i in range(size):
                total[i] = 1.0 / total[i]  # now its reciprocal
            for c in range(classes):
                for i in range(size):
                    p = exps[c, i] * total[i]
                    block_p[c, i] += p
                    block_p2[c, i] += p * p
            if with_entropy:
                log_positive(total, scratch[:size], log_total)  # -ln(sum exp x): 1 / total in [1 / C, 1]
                for c in range(classes):
                    for i in range(size):
                        block_entropy[i] -= exps[c, i] * total[i] * (shifted[c, i] + log_total[i])
        for i in range(size):  # a pixel with a NaN or inf logit: NaN sums, as torch's softmax would give
            if not finite[i]:
                block_entropy[i] = math.nan
                for c in range(classes):
                    block_p[c, i] = math.nan
                    block_p2[c, i] = math.nan
        for c in range(classes):
            for i in range(size):
                sum_p[c, start + i] += block_p[c, i]
                sum_p2[c, start + i] += block_p2[c, i]
        if with_entropy:
            for i in range(size):
                sum_entropy[start + i] += block_entropy[i]


def moments_from_samples(probs: torch.Tensor) -> MCMoments:
    """Moments of stored samples ``[m, C, *spatial]`` (one chunk of the streaming path)."""
    accumulator = MomentAccumulator()
    accumulator.update(probs)
    return accumulator.result()
