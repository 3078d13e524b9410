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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


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

    def result(self) -> MCMoments:
        if self._sum_p is None:
            raise ValueError("No samples were accumulated.")
        m = self.num_samples
        mean_entropy = None if self._sum_entropy is None else self._sum_entropy / m
        return MCMoments(self._sum_p / m, self._sum_p2 / m, mean_entropy, m)


def moments_from_samples(probs: torch.Tensor) -> MCMoments:
    """Moments of stored samples ``[m, C, *spatial]`` (one chunk of the streaming path)."""
    accumulator = MomentAccumulator()
    accumulator.update(probs)
    return accumulator.result()
