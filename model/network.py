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


def grid_sample_coordinates(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel indices along one axis of an image grid `size` pixels long -> ``F.grid_sample``
    coordinates (``align_corners=False``: -1 and 1 are the grid's outer edges).

    Bilinear ``grid_sample`` of a map covering that grid (``border`` padding) at these
    coordinates gives what ``BayesianSegmenter.upsample`` gives at those pixels, without
    upsampling the whole map.
    """
    return (pixels + 0.5) * 2.0 / size - 1.0


class ProjectionHead(nn.Module):
    """``3x3 conv -> BatchNorm -> ReLU -> Dropout(0.1) -> 1x1 conv``, then L2 norm per pixel.

    ``[B, D, h, w]`` decoder features -> ``[B, P, h, w]`` unit-length embeddings.
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
        return F.normalize(self.layers(features), dim=1)


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
        height, width = size
        maps = F.interpolate(maps, size=self.padded_size(size), mode="bilinear", align_corners=False)
        return maps[..., :height, :width]

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
