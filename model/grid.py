"""Pixel queries scored on the decoder's grid, the resolution the network predicts at.

The MC moments are computed at the decoder's resolution (1/4 of the image per side for
DeepLabV3+) and bilinearly interpolated to every image pixel (``model.mc_dropout``). Scoring
the interpolated moments costs about 12 ms of a 480x360 task (the upsampling, then BalEnt on
16x as many pixels), against under 1 ms on the decoder grid. The two choose differently:
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

from dataclasses import dataclass

import torch

from .acquisition import DEFAULT_BUDGET, score_moments, select_pixels
from .calibration import TOP_PIXELS, image_value
from .moments import MCMoments

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
    """One image's acquisition scores on its decoder nodes inside the image."""

    scores: torch.Tensor  # [h', w'] float64, higher = ask first
    exclude: torch.Tensor  # [h', w'] bool, nodes whose pixel is labeled
    rows: torch.Tensor  # [h'] long, image row of each node row
    cols: torch.Tensor  # [w'] long, image column of each node column
    mean: torch.Tensor  # [C, h', w'] float64, the MC mean at each node: the label to propose there

    def select(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The n best nodes outside `exclude`, best first: (nodes [k, 2], image pixels [k, 2])."""
        nodes = select_pixels(self.scores, n, self.exclude)
        pixels = torch.stack([self.rows[nodes[:, 0]], self.cols[nodes[:, 1]]], dim=1)
        return nodes, pixels

    def value(self, top: int = TOP_PIXELS) -> float:
        """``image_value`` on the nodes: the median score of the `top` best open ones."""
        return image_value(self.scores, self.exclude, top)


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
    return GridScores(scores.cpu(), node_exclude, rows, cols, inside.mean)


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
    return GridScores(scores.cpu(), exclude, torch.arange(height), torch.arange(width), moments.mean)
