"""What the simulated annotator is asked for: the cold start, then pixels or regions by acquisition.

Pixel mode (paper 000, Algorithm 1): the cold start is n uniformly random non-void pixels per
image (step 3); after each training, the acquisition's top n pixels per image among those
neither labeled nor void (steps 7-9, ``model.acquisition.acquire_pixels``).

Region mode (paper 004, Algorithm 1, with its eq. 6 ranking and without its contrastive
clustering): the cold start is R random superpixels per image; afterwards each superpixel
scores the sum of the acquisition's pixel score over its pixels (entropy in paper 004) and
the top R not yet revealed are asked for. ``random`` picks regions uniformly instead: a sum
of uniform pixel scores would favour large superpixels, which is not what random means.
"""

from __future__ import annotations

import numpy as np
import torch

from ..acquisition import acquire_pixels, score_moments
from ..moments import MCMoments
from ..superpixels import region_sums, top_regions
from .pool import LabelPool, random_choice


def cold_start(pool: LabelPool, mode: str, budget: int, generator: torch.Generator, cycle: int = 1) -> None:
    """Reveal `budget` random pixels (pixel mode) or superpixels (region mode) per image."""
    for index in range(len(pool)):
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
