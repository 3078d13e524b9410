"""Last-layer-dropout Bayesian segmentation network (paper 000, section 3.1).

Any segmentation-models-pytorch architecture and encoder; smp's segmentation head is
replaced by ``Dropout2d(r) -> 1x1 conv`` so that the classifier's dropout is the only part
that MC sampling varies. Dropout is channel-wise (a whole decoder feature channel is kept
or dropped per sample): that is the same as dropping columns of the 1x1 classifier's
weight matrix, which lets MC inference run all samples as one matrix product
(see ``model.mc_dropout``). The decoder's own stock dropout layers (ASPP in DeepLabV3+,
FPN's decoder dropout) act only in training; MC inference runs encoder and decoder once,
in eval mode.

A projection head (paper 004, section 4.2) maps the same decoder features to L2-normalized
128-d pixel embeddings for the contrastive loss (``model.contrastive``) and for region
features at acquisition time (``model.regions``). It does not feed the classifier, so it
changes neither the logits nor MC sampling.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .compat import ensure_torchvision_importable
from .pretrained import load_packaged_weights

ensure_torchvision_importable()
import segmentation_models_pytorch as smp  # noqa: E402 - needs the guard above
import timm  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_WEIGHT_CHOICES = ("packaged", "imagenet", None)


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    num_classes: int
    arch: str = "deeplabv3plus"
    encoder: str = "tu-tf_efficientnet_lite0"
    # "packaged": offline weights from a pip package (model.pretrained); "imagenet": smp/timm
    # hub download (needs internet); None: random init.
    encoder_weights: str | None = "packaged"
    dropout: float = 0.2
    # width of the contrastive projection head's embeddings; 0 builds no head
    projection_dim: int = 128

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0 (0: no projection head), got {self.projection_dim}.")
        if self.encoder_weights not in ENCODER_WEIGHT_CHOICES:
            raise ValueError(
                f"encoder_weights must be one of {ENCODER_WEIGHT_CHOICES}, got {self.encoder_weights!r}."
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _normalization(encoder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the encoder was pretrained with, read offline (timm's config for `tu-`)."""
    if encoder.startswith("tu-"):
        try:
            cfg = timm.models.get_pretrained_cfg(encoder[3:])
        except Exception:  # noqa: BLE001 - unknown tag: fall back to ImageNet statistics
            cfg = None
        if cfg is not None and cfg.mean and cfg.std:
            return tuple(cfg.mean), tuple(cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD


def _build_smp(config: ModelConfig) -> nn.Module:
    hub_weights = None
    if config.encoder_weights == "imagenet":
        hub_weights = True if config.encoder.startswith("tu-") else "imagenet"
    try:
        net = smp.create_model(
            config.arch, encoder_name=config.encoder, encoder_weights=hub_weights, classes=config.num_classes
        )
    except KeyError as error:
        raise ValueError(f"Unknown architecture or encoder ({config.arch!r}, {config.encoder!r}): {error}") from error
    except (OSError, RuntimeError) as error:
        if hub_weights is None:
            raise
        raise RuntimeError(
            f"Could not download hub weights for {config.encoder!r} ({error}). Offline, use "
            "encoder_weights='packaged' (default encoder) or encoder_weights=None."
        ) from error
    if config.encoder_weights == "packaged":
        if not hasattr(net.encoder, "model"):
            raise ValueError(
                f"encoder_weights='packaged' needs a timm ('tu-') encoder, got {config.encoder!r}."
            )
        load_packaged_weights(config.encoder, net.encoder.model)
    return net


def upsample_to_image(maps: torch.Tensor, size: tuple[int, int], padded_size: tuple[int, int]) -> torch.Tensor:
    """Maps ``[B, K, h, w]`` covering the padded image grid `padded_size` -> ``[B, K, H, W]`` at
    the image ``size``: bilinear (``align_corners=False``) to the padded grid, then cropped
    (``BayesianSegmenter.upsample``)."""
    height, width = size
    maps = F.interpolate(maps, size=padded_size, mode="bilinear", align_corners=False)
    return maps[..., :height, :width]


def grid_sample_coordinates(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel indices along one axis of an image grid `size` pixels long -> ``F.grid_sample``
    coordinates (``align_corners=False``: -1 and 1 are the grid's outer edges).

    Bilinear ``grid_sample`` of a map covering that grid (``border`` padding) at these
    coordinates gives what ``BayesianSegmenter.upsample`` gives at those pixels, without
    upsampling the whole map.
    """
    return (pixels + 0.5) * 2.0 / size - 1.0


def bilinear_taps(pixels: torch.Tensor, grid: int, cells: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For image pixel indices `pixels` ``[n]`` along one axis of a `grid`-long padded grid whose
    map has `cells` entries: the two source cells ``[n]`` and the weight ``[n]`` of the second,
    as bilinear ``F.grid_sample`` (``align_corners=False``, border padding) and
    ``BayesianSegmenter.upsample`` interpolate."""
    source = ((pixels.to(torch.float64) + 0.5) * cells / grid - 0.5).clamp(0, cells - 1)
    low = source.floor().to(torch.int64)
    return low, (low + 1).clamp(max=cells - 1), source - low


# cells of a training batch whose 3x3 convolution gives the projection head's BatchNorm its
# batch statistics in ``ProjectionHead.at_cells``: the mean and variance within about 1.5% of a
# standard deviation of the whole map's, for a tenth of the convolution over 4 frames of 360x480 (44160 cells)
STATISTICS_CELLS = 4096


class ProjectionHead(nn.Module):
    """``3x3 conv -> BatchNorm -> ReLU -> Dropout(0.1) -> 1x1 conv``, then L2 norm per pixel.

    ``[B, D, h, w]`` decoder features -> ``[B, P, h, w]`` unit-length float32 embeddings; or,
    with ``at_cells``, the same embeddings at a few cells only. The norm is taken in float32
    whatever the autocast precision, so that bf16 or fp16 embeddings come out of unit length.
    """

    def __init__(self, in_channels: int, dim: int = 128, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(in_channels, dim, kernel_size=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(features).float(), dim=1)

    def at_cells(
        self, features: torch.Tensor, keys: torch.Tensor, statistics_cells: int | None = STATISTICS_CELLS
    ) -> torch.Tensor:
        """Unit embeddings ``[u, P]`` at the cells `keys` ``[u]`` (flat ``b * h * w + y * w + x``)
        of `features` ``[B, D, h, w]``, computed at those cells only.

        The contrastive loss reads the embeddings at labeled pixels alone (about 900 of a
        batch's 44160 cells for 4 frames with 5 points and 3 regions each), and the 3x3
        convolution over all D channels at every cell cost about a third of a training step.
        In eval mode the values equal ``forward``'s at those cells. In train mode BatchNorm
        normalizes with batch statistics and updates its running statistics as ``forward``
        does, from the convolution at `statistics_cells` random cells
        of the batch (without autograd; None or a map that small: every cell, which makes the
        values ``forward``'s exactly); the gradient through those statistics is left out (they
        are constants of the step).
        """
        conv, norm, activation, dropout, project = self.layers
        if self.training:
            with torch.no_grad():
                total = features.shape[0] * features.shape[2] * features.shape[3]
                if statistics_cells is None or total <= statistics_cells:
                    before_norm = conv(features).float().transpose(0, 1).reshape(conv.out_channels, -1)  # [D, n]
                else:
                    sample = torch.randint(0, total, (statistics_cells,), device=features.device)
                    before_norm = self._conv_at(features, sample).float().t()  # [D, n]
                mean = before_norm.mean(dim=1)  # [D]
                var = before_norm.var(dim=1, unbiased=False)
                norm(before_norm.unsqueeze(0).unsqueeze(-1))  # [1, D, n, 1]: BatchNorm's own running-statistics update
        else:
            mean, var = norm.running_mean, norm.running_var
        hidden = self._conv_at(features, keys).float()  # [u, D]
        hidden = (hidden - mean) * torch.rsqrt(var + norm.eps) * norm.weight + norm.bias
        hidden = dropout(activation(hidden))
        out = F.linear(hidden, project.weight.view(project.out_channels, -1), project.bias)  # [u, P]
        return F.normalize(out.float(), dim=1)

    def _conv_at(self, features: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The 3x3 convolution (zero padding) of `features` ``[B, D, h, w]`` at the flat cells
        `keys` ``[u]`` -> ``[u, D]``."""
        conv = self.layers[0]
        _, channels, height, width = features.shape
        image, flat = keys // (height * width), keys % (height * width)
        rows, cols = flat // width, flat % width
        pixels = features.permute(0, 2, 3, 1).reshape(-1, channels)  # [B * h * w, D] (a view when channels-last)
        taps, inside = [], []
        for dy in (-1, 0, 1):  # the kernel's rows, then columns: the weight's (ky, kx) order
            for dx in (-1, 0, 1):
                r, c = rows + dy, cols + dx
                inside.append((r >= 0) & (r < height) & (c >= 0) & (c < width))  # zero padding outside
                taps.append(image * height * width + r.clamp(0, height - 1) * width + c.clamp(0, width - 1))
        patches = pixels.index_select(0, torch.stack(taps, 1).reshape(-1)).view(len(keys), 9, channels)
        patches = patches * torch.stack(inside, 1).unsqueeze(2).to(patches.dtype)  # [u, 9, D]
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # [D, 9 * D] as (ky, kx, D)
        return F.linear(patches.reshape(len(keys), -1), weight)


class BayesianSegmenter(nn.Module):
    """smp encoder + decoder, then ``Dropout2d(r) -> Conv1x1(D, C)``.

    Takes RGB images as floats in [0, 1], ``[B, 3, H, W]`` of any size; normalizes, pads to
    the encoder's output stride, and crops the output back to ``H x W``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        net = _build_smp(config)
        self.encoder = net.encoder
        self.decoder = net.decoder
        self.feature_channels: int = net.segmentation_head[0].in_channels  # D
        self.dropout = nn.Dropout2d(config.dropout)
        self.classifier = nn.Conv2d(self.feature_channels, config.num_classes, kernel_size=1)
        self.projection = ProjectionHead(self.feature_channels, config.projection_dim) if config.projection_dim else None
        self.stride: int = int(getattr(self.encoder, "output_stride", 32))
        mean, std = _normalization(config.encoder)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def _pad(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        pad_h = -height % self.stride
        pad_w = -width % self.stride
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
        return images

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Decoder features ``[B, D, h, w]`` of the padded image (h, w: decoder resolution)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected images [B, 3, H, W], got {tuple(images.shape)}.")
        normalized = (images - self.pixel_mean) / self.pixel_std
        return self.decoder(self.encoder(self._pad(normalized)))

    def upsample(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Decoder-resolution maps ``[B, K, h, w]`` -> image resolution ``[B, K, H, W]``."""
        return upsample_to_image(maps, size, self.padded_size(size))

    def padded_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """``(H, W)`` of the image grid the decoder resolution maps to (padded to the stride)."""
        height, width = size
        return height + (-height % self.stride), width + (-width % self.stride)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Unit-length pixel embeddings ``[B, P, h, w]`` from decoder features ``[B, D, h, w]``."""
        if self.projection is None:
            raise ValueError(
                "This model has no projection head (projection_dim=0); build it with "
                "ModelConfig(projection_dim=128) to train contrastively or select regions by embedding."
            )
        return self.projection(features)

    def logits_from_features(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Image-resolution logits ``[B, C, H, W]`` from decoder features ``[B, D, h, w]``."""
        return self.upsample(self.classifier(self.dropout(features)), size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C, H, W]``; stochastic only in train mode (or with MC sampling)."""
        return self.logits_from_features(self.features(images), tuple(images.shape[-2:]))


def build_model(config: ModelConfig) -> BayesianSegmenter:
    return BayesianSegmenter(config)
