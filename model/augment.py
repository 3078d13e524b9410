"""Joint image / sparse-label augmentation for training (paper 000, section 4.2).

Random scale in [0.5, 2.0], random horizontal flip, color jitter and Gaussian blur, then a
random crop (or pad) to a fixed size so that a batch stacks. Written with plain torch ops:
torchvision's compiled ops are not available everywhere this runs.

Sparse labels are the reason this is not a stock transform. A label map here is mostly
``IGNORE_INDEX`` with a few annotated pixels, and nearest-neighbour resizing samples the
label grid: at scale 0.5 it keeps one pixel in four, so most clicks would silently vanish.
Instead every labeled pixel is moved explicitly: its center ``(y + 0.5, x + 0.5)`` is scaled
and it lands in the new pixel that contains it, the same geometry as the image's
``align_corners=False`` interpolation. When several labeled pixels land in one new pixel
(only when downscaling, and only for pixels closer than about 1/scale), the one whose
center lands closest to that pixel's center wins, ties to the first in raster order.

When upscaling, a labeled pixel stays a single pixel (it does not grow into a block). Eq. 5
averages over annotated pixels; keeping each annotation one pixel keeps every click's weight
in the loss the same whatever scale its image drew. A dense label map therefore becomes a
lattice when upscaled: every original label still appears exactly once.

All randomness comes from the caller's ``torch.Generator``. Geometry is drawn first
(scale, flip, crop), then the photometric parameters, so turning jitter or blur on or off
never changes where the labels go for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, the usual RGB -> gray


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator))


def _randint(high_inclusive: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, high_inclusive + 1, (1,), generator=generator))


def scale_sparse_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a sparse label map ``[H, W]`` to `size` without losing isolated labels.

    Each labeled pixel (value != IGNORE_INDEX) goes to the new pixel containing its scaled
    center; collisions keep the label whose scaled center is closest (see module docstring).
    """
    height, width = labels.shape
    new_height, new_width = size
    if (new_height, new_width) == (height, width):
        return labels.clone()
    out = torch.full((new_height, new_width), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    ys, xs = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)  # [N], [N], raster order
    if ys.numel() == 0:
        return out
    center_y = (ys.to(torch.float64) + 0.5) * (new_height / height)  # [N] in new pixel units
    center_x = (xs.to(torch.float64) + 0.5) * (new_width / width)
    new_y = center_y.floor().long().clamp_(0, new_height - 1)
    new_x = center_x.floor().long().clamp_(0, new_width - 1)
    distance = (center_y - new_y - 0.5).square() + (center_x - new_x - 0.5).square()  # [N]
    target = new_y * new_width + new_x  # [N] flat index in the new grid
    # Closest first within each target: stable sort by distance, then stably by target.
    order = torch.sort(distance, stable=True).indices
    order = order[torch.sort(target[order], stable=True).indices]
    target = target[order]
    first = torch.ones_like(target, dtype=torch.bool)
    first[1:] = target[1:] != target[:-1]  # one winner per target: no duplicate writes
    out.view(-1)[target[first]] = labels[ys, xs][order][first]
    return out


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[3, H, W]``, borders replicated."""
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (offsets / sigma).square())
    kernel = kernel / kernel.sum()  # [k]
    channels = image.shape[0]
    padded = F.pad(image.unsqueeze(0), (radius, radius, radius, radius), mode="replicate")  # [1, 3, H+2r, W+2r]
    out = F.conv2d(padded, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return out.squeeze(0)


def color_jitter(image: torch.Tensor, factors: tuple[float, float, float]) -> torch.Tensor:
    """Brightness, contrast, saturation (in that order) of ``[3, H, W]`` in [0, 1]."""
    brightness, contrast, saturation = factors
    luma = torch.tensor(_LUMA, dtype=image.dtype, device=image.device).view(3, 1, 1)
    image = (image * brightness).clamp(0.0, 1.0)
    mean_gray = (image * luma).sum(0).mean()
    image = ((image - mean_gray) * contrast + mean_gray).clamp(0.0, 1.0)
    gray = (image * luma).sum(0, keepdim=True)  # [1, H, W]
    return ((image - gray) * saturation + gray).clamp(0.0, 1.0)


def _crop_window(size: int, crop: int, generator: torch.Generator) -> tuple[int, int, int]:
    """(source start, destination start, length) along one axis: crop if larger, pad if smaller."""
    if size >= crop:
        return _randint(size - crop, generator), 0, crop
    return 0, _randint(crop - size, generator), size


@dataclass(frozen=True)
class SparseAugment:
    """Random scale, flip, crop/pad to `crop_size`, color jitter, blur.

    ``crop_size``: output ``(H, W)``. ``jitter``: brightness, contrast and saturation factors
    are drawn from ``[1 - jitter, 1 + jitter]`` (0 turns jitter off). ``blur_prob``: chance of
    a Gaussian blur with sigma drawn from ``blur_sigma`` (in output pixels). Padding is 0 in
    the image and IGNORE_INDEX in the labels; jitter and blur touch only the image content,
    never the padding or the labels.
    """

    crop_size: tuple[int, int]
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    jitter: float = 0.4
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be (H, W) with both >= 1, got {self.crop_size}.")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}.")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}.")
        if not 0.0 <= self.blur_prob <= 1.0:
            raise ValueError(f"blur_prob must be in [0, 1], got {self.blur_prob}.")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be (low, high) with 0 < low <= high, got {self.blur_sigma}.")

    def __call__(
        self, image: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image [3, H, W]`` float in [0, 1], ``labels [H, W]`` int64 -> the same at `crop_size`."""
        out_image, out_labels, _ = self.with_valid(image, labels, generator)
        return out_image, out_labels

    def with_valid(
        self, image: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``__call__`` and the mask of the output pixels that hold image content, ``valid
        [H, W]`` bool (False on the padding): the semi-supervised loss must not learn the
        teacher's guess on padding. Draws the same random numbers as ``__call__``."""
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"Expected a float image [3, H, W], got {tuple(image.shape)} {image.dtype}.")
        if labels.shape != image.shape[-2:] or labels.dtype != torch.int64:
            raise ValueError(
                f"Expected int64 labels [H, W] = {tuple(image.shape[-2:])}, got {tuple(labels.shape)} {labels.dtype}."
            )
        height, width = labels.shape
        crop_height, crop_width = self.crop_size

        # Geometry: scale, flip, crop window (all drawn before any photometric parameter).
        scale = _uniform(*self.scale_range, generator)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        flipped = self.flip and bool(torch.rand(1, generator=generator) < 0.5)
        src_y, dst_y, length_y = _crop_window(size[0], crop_height, generator)
        src_x, dst_x, length_x = _crop_window(size[1], crop_width, generator)

        if size != (height, width):
            shrinking = size[0] < height or size[1] < width
            image = F.interpolate(
                image.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=shrinking
            ).squeeze(0)  # [3, h, w]
            labels = scale_sparse_labels(labels, size)  # [h, w]
        if flipped:
            image = image.flip(-1)
            labels = labels.flip(-1)
        image = image[:, src_y : src_y + length_y, src_x : src_x + length_x]
        labels = labels[src_y : src_y + length_y, src_x : src_x + length_x]

        # Photometric, on the image content only.
        if self.jitter > 0:
            factors = tuple(_uniform(1.0 - self.jitter, 1.0 + self.jitter, generator) for _ in range(3))
            image = color_jitter(image, factors)
        if self.blur_prob > 0 and float(torch.rand(1, generator=generator)) < self.blur_prob:
            image = _gaussian_blur(image, _uniform(*self.blur_sigma, generator))

        out_image = image.new_zeros(3, crop_height, crop_width)
        out_labels = labels.new_full((crop_height, crop_width), IGNORE_INDEX)
        out_image[:, dst_y : dst_y + length_y, dst_x : dst_x + length_x] = image.clamp(0.0, 1.0)
        out_labels[dst_y : dst_y + length_y, dst_x : dst_x + length_x] = labels
        valid = torch.zeros((crop_height, crop_width), dtype=torch.bool, device=labels.device)
        valid[dst_y : dst_y + length_y, dst_x : dst_x + length_x] = True
        return out_image, out_labels, valid
