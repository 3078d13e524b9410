"""Pixel queries scored on the decoder's grid, the resolution the network predicts at.

The MC moments are computed at the decoder's resolution (1/4 of the image per side for
DeepLabV3+) and bilinearly interpolated to every image pixel (``model.mc_dropout``). Scoring
the interpolated moments (``upsampled_pixel_scores``, BalEnt on 16x as many pixels, the
interpolation inside its kernel) costs 5-9 ms of a 480x360 task on an AVX-512 CPU and about
20 ms on an AVX2 one, against under 1 ms on the decoder grid. The two choose differently:
interpolating the second moment inflates the variance wherever two nodes' means differ
(Jensen), so BalEnt between four confident nodes (-0.5 each) reached +0.02 in a CamVid frame,
and the image-resolution maxima sit on those in-between pixels, which no node shows. In the
medium simulation (3 seeds) those pixels taught the model more: BalEnt on the grid ended at
0.409 mIoU against 0.435 at every pixel, so the backend scores every pixel unless
SEGAL_POINT_GRID=decoder asks for the cheaper grid.

``grid_scores`` scores each decoder node that falls inside the image and ties it to the image
pixel nearest to it: node i sits at image coordinate (i + 0.5) * stride - 0.5
(``align_corners=False``), which rounds to pixel ``stride * i + stride // 2``. Picking the best
nodes then asks for at most one pixel per ``stride x stride`` block, at the network's own
prediction. A node whose pixel is labeled is not asked again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .acquisition import DEFAULT_BUDGET, score_moments, select_pixels
from .balent import balent_from_coarse_moments
from .calibration import image_value
from .moments import MCMoments
from .network import bilinear_taps, upsample_to_image

GRIDS = ("image", "decoder")  # where pixel queries are scored: every image pixel, or the decoder's nodes


def node_pixels(size: tuple[int, int], padded_size: tuple[int, int], nodes: tuple[int, int]):
    """The image row of each node row ``[h']`` and column of each node column ``[w']``, for
    the decoder nodes whose pixel lies inside the image ``size`` (the padding's do not)."""
    result = []
    for pixels, padded, count in zip(size, padded_size, nodes):
        stride, remainder = divmod(padded, count)
        if remainder:
            raise ValueError(f"padded size {padded_size} is not a multiple of the decoder grid {nodes}.")
        positions = torch.arange(count) * stride + stride // 2
        result.append(positions[positions < pixels])
    return tuple(result)


@dataclass
class GridScores:
    """One image's acquisition scores on its decoder nodes inside the image (or at every pixel)."""

    scores: torch.Tensor  # [h', w'] float64, higher = ask first
    exclude: torch.Tensor  # [h', w'] bool, nodes whose pixel is labeled
    rows: torch.Tensor  # [h'] long, image row of each node row
    cols: torch.Tensor  # [w'] long, image column of each node column
    # [C, h', w'] float64, the MC mean at each node (the label to propose there); or a function
    # (node row, node column) -> [C] when the mean exists only at the decoder's resolution
    mean: torch.Tensor | Callable[[int, int], torch.Tensor]
    acquisition: str = "balent"  # whose scores these are (the task's value reads its uncertainty)

    def mean_at(self, row: int, col: int) -> torch.Tensor:
        """The MC mean ``[C]`` at node (row, col)."""
        return self.mean(row, col) if callable(self.mean) else self.mean[:, row, col]

    def select(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The n best nodes outside `exclude`, best first: (nodes [k, 2], image pixels [k, 2])."""
        nodes = select_pixels(self.scores, n, self.exclude)  # [k, 2]
        pixels = torch.stack([self.rows[nodes[:, 0]], self.cols[nodes[:, 1]]], dim=1)
        return nodes, pixels

    def value(self) -> float:
        """``image_value`` on the nodes: the mean uncertainty of the open ones."""
        return image_value(self.scores, self.exclude, self.acquisition)


def grid_scores(
    name: str,
    coarse: MCMoments,
    size: tuple[int, int],
    padded_size: tuple[int, int],
    exclude: torch.Tensor | None = None,
    budget: int = DEFAULT_BUDGET,
    generator: torch.Generator | None = None,
) -> GridScores:
    """Score acquisition `name` on the decoder-resolution moments `coarse` ``[C, h, w]``.

    coarse covers the padded image grid `padded_size` (``BayesianSegmenter.padded_size(size)``,
    ``mc_moments(..., image_resolution=False)``); size: the image ``(H, W)``; exclude:
    ``[H, W]`` bool, labeled pixels (a node on one is not asked again).
    """
    rows, cols = node_pixels(size, padded_size, coarse.spatial_shape)
    inside = coarse.map_spatial(lambda t: t[..., : len(rows), : len(cols)].cpu())  # [C, h', w']
    if exclude is None:
        node_exclude = torch.zeros(len(rows), len(cols), dtype=torch.bool)
    else:
        if tuple(exclude.shape) != tuple(size):
            raise ValueError(f"exclude has shape {tuple(exclude.shape)}, the image {tuple(size)}.")
        node_exclude = exclude.cpu()[rows][:, cols]
    scores = score_moments(name, inside, budget=budget, candidates=~node_exclude, generator=generator)
    return GridScores(scores.cpu(), node_exclude, rows, cols, inside.mean, name)


def pixel_scores(
    name: str,
    moments: MCMoments,
    exclude: torch.Tensor | None = None,
    budget: int = DEFAULT_BUDGET,
    generator: torch.Generator | None = None,
) -> GridScores:
    """The same, scoring every image pixel: `moments` ``[C, H, W]`` at the image resolution
    (the interpolated moments); every pixel is a node."""
    height, width = moments.spatial_shape
    moments = moments.map_spatial(lambda t: t.cpu())
    exclude = torch.zeros(height, width, dtype=torch.bool) if exclude is None else exclude.cpu()
    candidates = ~exclude
    scores = score_moments(name, moments, budget=budget, candidates=candidates, generator=generator)
    return GridScores(scores.cpu(), exclude, torch.arange(height), torch.arange(width), moments.mean, name)


def upsampled_pixel_scores(
    name: str,
    coarse: MCMoments,
    size: tuple[int, int],
    padded_size: tuple[int, int],
    exclude: torch.Tensor | None = None,
    budget: int = DEFAULT_BUDGET,
    generator: torch.Generator | None = None,
) -> GridScores:
    """``pixel_scores`` of the decoder-resolution moments `coarse` ``[C, h, w]`` bilinearly
    upsampled to the image ``size`` (as ``BayesianSegmenter.upsample``: over the padded grid
    `padded_size`, then cropped). BalEnt is scored straight from `coarse`
    (``model.balent.balent_from_coarse_moments``), and the mean is interpolated only at the
    pixels asked for: the image-resolution moments are never built. Other acquisitions
    upsample the moments first."""
    height, width = size
    coarse = coarse.map_spatial(lambda t: t.cpu())
    if name != "balent":
        upsampled = coarse.map_spatial(lambda maps: upsample_to_image(maps[None], size, padded_size)[0])
        return pixel_scores(name, upsampled, exclude, budget, generator)
    cells_h, cells_w = coarse.spatial_shape
    row_taps = bilinear_taps(torch.arange(height), padded_size[0], cells_h)  # [H] each
    col_taps = bilinear_taps(torch.arange(width), padded_size[1], cells_w)  # [W] each
    exclude = torch.zeros(height, width, dtype=torch.bool) if exclude is None else exclude.cpu()
    if tuple(exclude.shape) != (height, width):
        raise ValueError(f"exclude has shape {tuple(exclude.shape)}, the image {tuple(size)}.")
    scores = balent_from_coarse_moments(coarse.mean, coarse.second, coarse.num_samples, row_taps, col_taps)
    mean = coarse.mean  # [C, h, w]

    def mean_at(row: int, col: int) -> torch.Tensor:  # bilinear, as the upsampling: [C]
        (top, bottom, down), (left, right, across) = (t[row] for t in row_taps), (t[col] for t in col_taps)
        upper = torch.lerp(mean[:, top, left], mean[:, top, right], across)
        lower = torch.lerp(mean[:, bottom, left], mean[:, bottom, right], across)
        return torch.lerp(upper, lower, down)

    return GridScores(scores, exclude, torch.arange(height), torch.arange(width), mean_at, name)
