"""What the simulated annotator is asked for: the cold start, then pixels or regions by acquisition.

Pixel mode (paper 000, Algorithm 1): the cold start is n uniformly random non-void pixels per
image (step 3); after each training, the acquisition's top n pixels per image among those
neither labeled nor void (steps 7-9, ``model.acquisition.acquire_pixels``).

With ``tasks_per_cycle`` (the product's loop, pixel mode) only that many images are labeled
per cycle, each once: the cold start's are random, later ones the first by ``task_order``
(``task_value``), as an annotator working down Label Studio's task list sorted by score.

Region mode (paper 004): the cold start is R random superpixels per image; afterwards each
superpixel scores the sum of the acquisition's pixel score over its pixels (eq. 6; entropy in
paper 004). Two selections (``SimulationConfig.selection``):

- ``rank`` (``query_regions``): the top R not yet revealed. ``random`` picks regions
  uniformly instead: a sum of uniform pixel scores would favour large superpixels, which is
  not what random means.
- ``umap-kmeans`` (``query_clustered_regions``, Algorithm 1 steps 2-5): the teacher's mean
  embedding per superpixel, mapped by the UMAP fitted on the memory bank, clustered by
  KMeans into R clusters; from each, the candidate with the largest sum
  (``model.regions.acquire_regions``).

Both only ever choose the pool's candidates (``LabelPool.region_candidates``: not revealed
yet, not all void), so a region is never asked for twice.
"""

from __future__ import annotations

import numpy as np
import torch

from ..acquisition import acquire_pixels, score_moments, select_pixels
from ..calibration import image_value
from ..grid import grid_scores
from ..moments import MCMoments, entropy
from ..regions import RegionProjector, acquire_regions
from ..superpixels import region_sums, top_regions
from .pool import LabelPool, random_choice

BEST_PIXELS = 5  # task order "best-pixels": the median of this many best pixel scores


def cold_start(
    pool: LabelPool, mode: str, budget: int, generator: torch.Generator, cycle: int = 1, tasks: int | None = None
) -> None:
    """Reveal `budget` random pixels (pixel mode) or superpixels (region mode) per image; with
    `tasks`, in that many random images only (the product's loop: the first tasks an annotator
    opens, before any model ranks them)."""
    images = (
        range(len(pool)) if tasks is None else sorted(torch.randperm(len(pool), generator=generator)[:tasks].tolist())
    )
    for index in images:
        if mode == "pixel":
            flat = random_choice(~pool.exclude(index), budget, generator)
            coords = np.stack(np.unravel_index(flat, pool.truth[index].shape), axis=1)  # [n, 2]
            pool.reveal_pixels(index, coords, cycle)
        else:
            pool.reveal_regions(index, random_choice(pool.region_candidates(index), budget, generator).tolist(), cycle)


def query_pixels(name: str, moments: MCMoments, n: int, exclude: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """The acquisition's top n pixels ``[k, 2]`` (row, col) outside ``exclude [H, W]``."""
    mask = torch.from_numpy(exclude).to(moments.mean.device)
    coords, _ = acquire_pixels(name, moments, n, exclude=mask, generator=generator)
    return coords.cpu().numpy()


def query_grid_pixels(
    name: str, coarse: MCMoments, padded_size: tuple[int, int], n: int, exclude: np.ndarray, generator: torch.Generator
) -> np.ndarray:
    """The acquisition's top n decoder nodes as image pixels ``[k, 2]`` (row, col), nodes on a
    pixel of ``exclude [H, W]`` left out; `coarse` ``[C, h, w]`` covers `padded_size`."""
    scores = grid_scores(name, coarse, exclude.shape, padded_size, torch.from_numpy(exclude), n, generator)
    return scores.select(n)[1].numpy()


def query_regions(
    name: str,
    moments: MCMoments,
    k: int,
    segments: np.ndarray,
    candidates: np.ndarray,
    generator: torch.Generator,
) -> list[int]:
    """The k candidate superpixels with the largest summed pixel score (random: uniform)."""
    if name == "random":
        return random_choice(candidates, k, generator).tolist()
    scores = score_moments(name, moments, budget=k, generator=generator)  # [H, W] float64
    sums = np.where(candidates, region_sums(scores, segments), -np.inf)  # [K]
    return [region for region in top_regions(sums, k, segments) if candidates[region]]


def query_clustered_regions(
    name: str,
    moments: MCMoments,
    embeddings: torch.Tensor,
    grid_size: tuple[int, int],
    projector: RegionProjector,
    k: int,
    segments: np.ndarray,
    candidates: np.ndarray,
    generator: torch.Generator,
    seed: int,
) -> list[int]:
    """Paper 004's choice: one candidate superpixel per KMeans cluster of the projected region
    features, the one with the largest summed pixel score; best first.

    `embeddings` ``[P, h, w]`` are the teacher's (``mc_moments_and_embeddings``), covering the
    padded image grid `grid_size` (``model.padded_size``); `segments` ``[H, W]``; `candidates`
    ``[K]`` bool from ``LabelPool.region_candidates``. `seed` seeds KMeans (< 2**32).

    ``acquire_regions`` decides candidates from a labeled mask (a region more than half
    labeled is out). The mask given to it is therefore "every pixel of a non-candidate region"
    rather than the labeled pixels: a revealed region that is mostly void would otherwise look
    unlabeled and be offered again, and an all-void region would be offered at all. A region
    is then out exactly when it is not a pool candidate.
    """
    if name == "random":
        raise ValueError("The clustered selection needs a pixel score; 'random' has none (use selection 'rank').")
    scores = score_moments(name, moments, budget=k, generator=generator)  # [H, W] float64
    excluded = ~candidates[segments]  # [H, W]: labeled fraction 1 outside the candidates, 0 inside
    chosen, _ = acquire_regions(
        projector, embeddings, scores, segments, k, labeled=excluded, seed=seed, grid_size=grid_size
    )
    return [region for region in chosen if candidates[region]]  # all of them; kept as a guard


def task_value(order: str, name: str, moments: MCMoments, scores: torch.Tensor, exclude: torch.Tensor) -> float:
    """How informative one image is under task order `order` (``config.TASK_ORDERS`` but random):
    `scores` ``[H, W]`` are acquisition `name`'s on `moments` ``[C, H, W]``, `exclude` ``[H, W]``
    bool the pixels that are labeled or void."""
    if order == "value":  # the backend's (``model.calibration.image_value``)
        return image_value(scores, exclude, name)
    if order == "best-pixels":  # the backend's before 2026-12-07: its 5 best pixels, whatever n is
        top = select_pixels(scores, BEST_PIXELS, exclude)  # [k, 2]
        return float(np.median(scores[top[:, 0], top[:, 1]].cpu().numpy())) if len(top) else float("nan")
    if order == "mean-entropy":
        return image_value(entropy(moments.mean, dim=0), exclude, "entropy")
    raise ValueError(f"task order {order!r} has no value.")
