"""Pixel acquisition functions (paper 000, sections 3.3 and 3.5; survey 002).

Each heuristic is a small class that turns per-pixel MC moments into a ``[*spatial]``
score where higher means "ask this pixel first". They are registered by name:

    balent, bald, powerbald, margin, entropy, random, least_confidence

Public contract:

- ``score(name, probs)``: ``probs`` are stored MC softmax samples ``[m, C, H, W]``;
  returns ``[H, W]`` float64 scores.
- ``score_moments(name, moments)``: the streaming path; given the moments of the same
  samples it returns the same scores (``score`` is a thin wrapper around it).
- ``select_pixels(scores, n, exclude)``: the top-n pixels outside ``exclude``.
- ``Acquisition.uncertainty(scores)``: the per-pixel uncertainty behind a heuristic's scores
  (BalEnt behind BalEntAcq, -margin behind pMargin), whose mean over an image is the image's
  value (``model.calibration.image_value``).

Non-finite scores become ``LOWEST_SCORE``: a degenerate pixel is ranked last, never first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .balent import LOWEST_SCORE, balent_from_moments
from .moments import MCMoments, entropy, moments_from_samples

DEFAULT_BUDGET = 5  # n pixels per image per cycle (paper 000)


@dataclass
class AcquisitionContext:
    """What some heuristics need beyond the moments.

    budget: pixels to be picked from this image (pMargin's pool is ``pool_factor * budget``).
    candidates: ``[*spatial]`` bool, pixels that may be picked (pMargin draws its pool there).
    generator: randomness for random, powerbald and margin; seed it for reproducible runs.
    """

    budget: int = DEFAULT_BUDGET
    candidates: torch.Tensor | None = None
    generator: torch.Generator | None = None


class Acquisition:
    name: str = ""
    # reads MCMoments.mean_entropy (E_s[H(p_s)]): inference accumulates it only for these
    needs_mean_entropy: bool = False

    def __call__(self, moments: MCMoments, context: AcquisitionContext) -> torch.Tensor:
        raise NotImplementedError

    def uncertainty(self, scores: torch.Tensor) -> torch.Tensor:
        """The pixel uncertainty ``[*spatial]`` behind this heuristic's `scores`, on a scale whose
        mean over an image means something (NaN where a score is not a real pixel's): the
        scores themselves, unless a heuristic reorders its uncertainty for picking pixels."""
        return torch.where(scores > LOWEST_SCORE, scores, torch.nan)


_REGISTRY: dict[str, Callable[[], Acquisition]] = {}


def register(cls: type[Acquisition]) -> type[Acquisition]:
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    return list(_REGISTRY)


def get_acquisition(name: str) -> Acquisition:
    try:
        return _REGISTRY[name.lower()]()
    except KeyError:
        raise ValueError(f"Unknown acquisition {name!r}; choose one of {names()}.") from None


def needs_mean_entropy(name: str) -> bool:
    """Whether acquisition `name` reads ``MCMoments.mean_entropy`` (pass it to ``mc_moments``)."""
    return get_acquisition(name).needs_mean_entropy


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64)


@register
class BalEntAcq(Acquisition):
    """Eq. 4: 1 / BalEnt for BalEnt >= 0, else BalEnt (see ``model.balent``)."""

    name = "balent"

    def __call__(self, moments, context):
        return balent_from_moments(moments.mean, moments.second, moments.num_samples)

    def uncertainty(self, scores):
        """BalEnt itself, eq. 4 inverted (exact but for BalEnt in [0, BALENT_FLOOR), which
        comes back as BALENT_FLOOR): eq. 4 puts BalEnt just above 0 first, which is right for
        choosing pixels and meaningless as an average."""
        balent = torch.where(scores > 0.0, scores.reciprocal(), scores)
        return torch.where(scores > LOWEST_SCORE, balent, torch.nan)


@register
class Entropy(Acquisition):
    """Shannon entropy of the MC mean, H[x] = -sum_i E[P_i] log E[P_i]."""

    name = "entropy"

    def __call__(self, moments, context):
        return entropy(moments.mean, dim=0)


def _bald(moments: MCMoments) -> torch.Tensor:
    if moments.mean_entropy is None:
        raise ValueError(
            "BALD needs the mean per-sample entropy: run mc_moments(..., mean_entropy=True) "
            "(or needs_mean_entropy(name)) for this acquisition."
        )
    # mutual information = H(mean) - E_s[H(p_s)]; >= 0 in exact arithmetic
    return (entropy(moments.mean, dim=0) - moments.mean_entropy).clamp_min(0.0)


@register
class BALD(Acquisition):
    name = "bald"
    needs_mean_entropy = True

    def __call__(self, moments, context):
        return _bald(moments)


@register
class PowerBALD(Acquisition):
    """log BALD + Gumbel(0, 1) / gamma (gamma = 1): sampling proportional to BALD^gamma."""

    name = "powerbald"
    needs_mean_entropy = True
    gamma = 1.0

    def __call__(self, moments, context):
        bald = _bald(moments)
        uniform = _uniform(bald.shape, context.generator).clamp(1e-300, 1.0 - 1e-16).to(bald.device)
        gumbel = -torch.log(-torch.log(uniform))
        # BALD exactly 0 (no dropout effect): the smallest positive double instead of log 0
        return torch.log(bald.clamp_min(torch.finfo(torch.float64).tiny)) + gumbel / self.gamma


@register
class PoolMargin(Acquisition):
    """pMargin: a random pool of ``pool_factor * budget`` candidates, then the smallest margins.

    Pool pixels score 2 - margin (in [1, 2]); the rest score -margin (in [-1, 0]), so the
    pool always comes first and inside it the smallest margin is asked first.
    """

    name = "margin"
    pool_factor = 10

    def __call__(self, moments, context):
        top2 = moments.mean.topk(2, dim=0).values
        margin = top2[0] - top2[1]
        shape = margin.shape
        candidates = context.candidates if context.candidates is not None else torch.ones(shape, dtype=torch.bool)
        candidate_index = torch.nonzero(candidates.reshape(-1).cpu(), as_tuple=True)[0]
        pool_size = min(self.pool_factor * context.budget, candidate_index.numel())
        order = torch.randperm(candidate_index.numel(), generator=context.generator)[:pool_size]
        in_pool = torch.zeros(margin.numel(), dtype=torch.bool)
        in_pool[candidate_index[order]] = True
        in_pool = in_pool.reshape(shape).to(margin.device)
        return torch.where(in_pool, 2.0 - margin, -margin)

    def uncertainty(self, scores):
        """-margin at every pixel: the pool's random draw (its scores in [1, 2]) taken back out."""
        return super().uncertainty(torch.where(scores >= 1.0, scores - 2.0, scores))


@register
class LeastConfidence(Acquisition):
    name = "least_confidence"

    def __call__(self, moments, context):
        return 1.0 - moments.mean.amax(dim=0)


@register
class Random(Acquisition):
    """Uniform scores that ignore the model (paper 000, Rand[x] = U)."""

    name = "random"

    def __call__(self, moments, context):
        return _uniform(moments.spatial_shape, context.generator).to(moments.mean.device)


def _finite_or_lowest(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.to(torch.float64)
    return torch.where(torch.isfinite(scores), scores, torch.full_like(scores, LOWEST_SCORE))


def score_moments(
    name: str,
    moments: MCMoments,
    *,
    budget: int = DEFAULT_BUDGET,
    candidates: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Scores ``[*spatial]`` float64 from streamed moments; higher = ask first."""
    acquisition = get_acquisition(name)
    return _finite_or_lowest(acquisition(moments, AcquisitionContext(budget, candidates, generator)))


def score(
    name: str,
    probs: torch.Tensor,
    *,
    budget: int = DEFAULT_BUDGET,
    candidates: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Scores ``[H, W]`` from stored MC softmax samples ``probs [m, C, H, W]``."""
    if probs.ndim != 4:
        raise ValueError(f"Expected MC samples [m, C, H, W], got shape {tuple(probs.shape)}.")
    return score_moments(
        name, moments_from_samples(probs), budget=budget, candidates=candidates, generator=generator
    )


def select_pixels(scores: torch.Tensor, n: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The n highest-scoring pixels ``[k, 2]`` as (row, col), best first, k = min(n, eligible).

    ``exclude`` ``[H, W]`` bool marks pixels never to pick (already labeled, ignore mask).
    Non-finite scores (NaN, +-inf) rank after every finite one. Ties go to the lower flat
    index, so the choice is deterministic.
    """
    if scores.ndim != 2:
        raise ValueError(f"Expected scores [H, W], got shape {tuple(scores.shape)}.")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    flat = _finite_or_lowest(scores.reshape(-1))
    if exclude is not None:
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude has shape {tuple(exclude.shape)}, scores {tuple(scores.shape)}.")
        # below LOWEST_SCORE, so an excluded pixel never wins over an eligible degenerate one
        flat = flat.masked_fill(exclude.reshape(-1).to(flat.device), -math.inf)
        eligible = int((~exclude).sum())
    else:
        eligible = flat.numel()
    k = min(n, eligible)
    if k == 0:
        return torch.zeros((0, 2), dtype=torch.long, device=flat.device)
    # topk finds the k-th best value in one pass (a full sort of every pixel cost ~100 ms at
    # 480x360); the pixels above it and the lowest-index ties at it are then ordered exactly
    threshold = torch.topk(flat, k, sorted=False).values.min()
    above = torch.nonzero(flat > threshold, as_tuple=True)[0]
    tied = torch.nonzero(flat == threshold, as_tuple=True)[0][: k - above.numel()]
    candidates = torch.cat([above, tied]).sort().values  # ascending index
    order = torch.sort(flat[candidates], descending=True, stable=True).indices  # ties: lower index first
    chosen = candidates[order]
    width = scores.shape[1]
    return torch.stack([chosen // width, chosen % width], dim=1)


def acquire_pixels(
    name: str,
    moments: MCMoments,
    n: int = DEFAULT_BUDGET,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score one image's moments ``[C, H, W]`` and pick n pixels; returns (coords [k, 2], scores [k])."""
    candidates = None if exclude is None else ~exclude
    scores = score_moments(name, moments, budget=n, candidates=candidates, generator=generator)
    coords = select_pixels(scores, n, exclude)
    return coords, scores[coords[:, 0], coords[:, 1]]
