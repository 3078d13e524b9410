"""MC-dropout inference with a last-layer-dropout network (paper 000, sections 3.1-3.2).

Encoder and decoder run once per image; only ``Dropout2d -> 1x1 conv`` is sampled.
Channel-wise dropout of the features equals dropping columns of the classifier weight
``W [C, D]``, so a chunk of k samples is one matrix product with k masked copies of W:

    logits[k, C, n] = (W * mask[k, None, :] / keep) @ features[D, n] + b

Softmax and the per-pixel moments are taken at the decoder's resolution (1/4 of the image
for DeepLabV3+) and accumulated in float64 chunk by chunk (on the CPU in one numba pass over
the chunk's logits, ``MomentAccumulator.update_logits``), so memory stays
O(chunk * C * h * w) instead of O(m * C * H * W). A chunk holds as many samples as fit in
``CHUNK_ELEMENTS`` softmax values: all 20 of a 480x360 image at once (one matrix product is
about 0.8x the time of two of half the size on a CPU), fewer for large images.

The three moments are then bilinearly interpolated to the image resolution once:
interpolating the moments (not the samples) is our definition of the image-resolution
uncertainty. It leaves the mean exact and makes the variance at in-between pixels the
interpolated variance.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .moments import MCMoments, MomentAccumulator
from .network import BayesianSegmenter
from .precision import autocast, resolve_precision

DEFAULT_NUM_SAMPLES = 20
CHUNK_ELEMENTS = 4_000_000  # softmax values k * B * C * h * w per chunk: 16 MB float32, 32 MB float64
_LOW_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _dropout_masks(model: BayesianSegmenter, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
    """Scaled channel-dropout masks ``[m, D]``, drawn all at once so chunking never changes them."""
    rate = model.dropout.p
    keep = 1.0 - rate
    if rate == 0.0:
        return torch.ones(num_samples, model.feature_channels)
    kept = torch.rand(num_samples, model.feature_channels, generator=generator) < keep
    return kept.to(torch.float32) / keep


@dataclass
class LogitChunk:
    """The sampled logits of a chunk of k masks, ``base + deviations`` (``logits``).

    In float32 (``base`` None) ``deviations`` are the logits themselves, one exact product.
    In bf16 or fp16 the product that costs (k masked copies of W times the features) gives
    only each sample's deviation from the deterministic logits ``base``, computed once in
    float32: a trained CamVid model's logits reach 19, where bf16's spacing is 0.125, while a
    deviation is the MC spread itself (0.26 on average), whose rounding then moves the
    moments 400-500x less than the sampling does (README, "MC precision").
    """

    deviations: torch.Tensor  # [B, k, C, h, w]
    base: torch.Tensor | None  # [B, C, h, w] float32, None in float32

    def logits(self) -> torch.Tensor:
        """Float32 sampled logits ``[B, k, C, h, w]``."""
        if self.base is None:
            return self.deviations
        return self.deviations.float() + self.base.unsqueeze(1)


def _logit_chunks(
    model: BayesianSegmenter,
    features: torch.Tensor,
    masks: torch.Tensor,
    chunk_size: int,
    precision: str = "fp32",
) -> Iterator[LogitChunk]:
    """Yield the sampled logits of consecutive chunks of the masks, each ``[B, k, C, h, w]``.

    `precision` (resolved: "fp32", "bf16", "fp16") is the dtype of the masked product."""
    batch, channels, height, width = features.shape
    classes = model.num_classes
    weight = model.classifier.weight.reshape(classes, channels).float()  # [C, D]
    bias = model.classifier.bias.float()  # [C]
    # [B, D, n] (bf16 features under an autocast are widened: the logits are float32 whatever
    # the caller's precision); for channels-last features a transposed view, which the matrix
    # product reads as it is (a copy into [D, n] cost a third of the product)
    low = _LOW_PRECISION_DTYPES.get(precision)
    flat = features.float().flatten(2) if low is None else features.to(low).flatten(2)
    masks = masks.to(device=features.device, dtype=torch.float32)
    base = None
    with torch.autocast(features.device.type, enabled=False):  # out= takes no autocast; not across the yield
        if low is not None:  # the deterministic logits, float32: one 1x1 convolution
            base = F.conv2d(features.float(), weight[:, :, None, None], bias)  # [B, C, h, w]
    for start in range(0, masks.shape[0], chunk_size):
        chunk = masks[start : start + chunk_size]  # [k, D]
        samples = chunk.shape[0]
        with torch.autocast(features.device.type, enabled=False):
            if low is None:
                weights = (weight.unsqueeze(0) * chunk.unsqueeze(1)).reshape(samples * classes, channels)  # [k C, D]
                sample_bias = bias.repeat(samples).unsqueeze(1)  # [k C, 1]
                logits = torch.empty(batch, samples * classes, height * width, device=features.device)
                for index in range(batch):
                    torch.addmm(sample_bias, weights, flat[index], out=logits[index])  # [k C, n]
            else:  # W (mask / keep - 1): -W on a dropped channel, W (1 / keep - 1) on a kept one
                weights = (weight.unsqueeze(0) * (chunk.unsqueeze(1) - 1.0)).reshape(samples * classes, channels)
                weights = weights.to(low)
                logits = torch.empty(batch, samples * classes, height * width, device=features.device, dtype=low)
                for index in range(batch):
                    torch.mm(weights, flat[index], out=logits[index])  # [k C, n] deviations
        yield LogitChunk(logits.view(batch, samples, classes, height, width), base)


@contextmanager
def _eval_mode(model: BayesianSegmenter) -> Iterator[None]:
    """Eval mode inside the block (BatchNorm statistics, stock dropouts off), then restore.

    A model already wholly in eval mode (a served one) is left alone: ``train(mode)`` walks
    every module in Python, 2-3 ms per call for this network, twice per request."""
    modes = {module: module.training for module in model.modules()}
    if not any(modes.values()):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():  # as it was, submodules that were in eval mode included
            module.training = mode


def chunk_size_for(model: BayesianSegmenter, features: torch.Tensor) -> int:
    """Samples per chunk for decoder features ``[B, D, h, w]``: ``CHUNK_ELEMENTS`` softmax values."""
    batch, _, height, width = features.shape
    return max(1, CHUNK_ELEMENTS // (batch * model.num_classes * height * width))


def _check(images: torch.Tensor, num_samples: int, chunk_size: int | None = None) -> torch.Tensor:
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected an image [3, H, W] or a batch [B, 3, H, W], got {tuple(images.shape)}.")
    return images


@torch.no_grad()
def mc_moments(
    model: BayesianSegmenter,
    images: torch.Tensor,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    image_resolution: bool = True,
    mean_entropy: bool = True,
    logit_precision: str = "fp32",
) -> list[MCMoments]:
    """Per-pixel MC moments for each image of ``[B, 3, H, W]`` (or one ``[3, H, W]``).

    Returns one ``MCMoments`` per image: ``[C, H, W]`` at the image resolution, or at the
    decoder's resolution (padded grid) with ``image_resolution=False``. `generator` is a CPU
    generator (the dropout masks are drawn on the CPU, then moved to the model's device).
    `chunk_size`: samples per chunk (default: ``chunk_size_for``; the masks are the same
    whatever it is, the logits differ only by the float32 rounding of a matrix product of
    another shape, 1e-8 here). ``mean_entropy=False`` skips E_s[H(p_s)], which only BALD-type
    acquisitions read (``model.acquisition.needs_mean_entropy``): about a third less work.

    `logit_precision` ("fp32", "bf16", "fp16", "auto": bf16 where native, ``model.precision``)
    is that of the masked matrix product, most of the sampling's cost: in bf16 it gives each
    sample's deviation from float32 deterministic logits (``LogitChunk``), a third of the
    time of float32 on an AVX512-BF16 CPU; softmax and moments stay float64.
    """
    images = _check(images, num_samples, chunk_size)
    precision = resolve_precision(logit_precision, images.device)
    with _eval_mode(model):
        features = model.features(images)  # [B, D, h, w]
        moments = _moments_from_features(model, features, num_samples, generator, chunk_size, mean_entropy, precision)
    if not image_resolution:
        return moments
    return [to_image_resolution(model, m, tuple(images.shape[-2:])) for m in moments]


def to_image_resolution(model: BayesianSegmenter, moments: MCMoments, size: tuple[int, int]) -> MCMoments:
    """Decoder-resolution moments ``[C, h, w]`` -> ``[C, H, W]``, bilinear (``model.upsample``)."""
    return moments.map_spatial(lambda maps: model.upsample(maps.unsqueeze(0), size).squeeze(0))


def _moments_from_features(
    model: BayesianSegmenter,
    features: torch.Tensor,  # [B, D, h, w]
    num_samples: int,
    generator: torch.Generator | None,
    chunk_size: int | None,
    mean_entropy: bool,
    precision: str,
) -> list[MCMoments]:
    masks = _dropout_masks(model, num_samples, generator)  # [m, D]
    if chunk_size is None:
        chunk_size = chunk_size_for(model, features)
    accumulators = [MomentAccumulator(mean_entropy) for _ in range(features.shape[0])]
    for chunk in _logit_chunks(model, features, masks, chunk_size, precision):  # [B, k, C, h, w]
        for index, accumulator in enumerate(accumulators):
            accumulator.update_logits(chunk.deviations[index], None if chunk.base is None else chunk.base[index])
    return [accumulator.result() for accumulator in accumulators]


@torch.no_grad()
def mc_moments_and_embeddings(
    model: BayesianSegmenter,
    image: torch.Tensor,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    mean_entropy: bool = True,
    image_resolution: bool = True,
    embedding_precision: str = "fp32",
    logit_precision: str = "fp32",
) -> tuple[MCMoments, torch.Tensor]:
    """One image's MC moments ``[C, H, W]`` and its unit pixel embeddings ``[P, h, w]`` at the
    decoder's resolution, from a single encoder/decoder pass.

    The moments equal ``mc_moments``'s for the same generator state and arguments
    (``image_resolution=False``: at the decoder's resolution, ``[C, h, w]``). The
    embeddings (the projection head's) give paper 004's region features: they cover the padded image grid
    ``model.padded_size((H, W))``, which is the `grid_size` to pass to
    ``model.regions.region_embeddings`` / ``acquire_regions``. They are not upsampled here:
    128 channels at image resolution would be 400 MB for a 1024x768 image.

    `embedding_precision` ("fp32", "bf16", "auto": bf16 where native, ``model.precision``)
    autocasts the projection head alone, a 3x3 convolution over all D channels that costs
    about half an encoder/decoder pass in fp32; the moments are fp32 whatever it is. In bf16
    the unit embeddings of a 480x360 frame stay within 0.004 of fp32 (cosine >= 0.996).
    `logit_precision`: as in ``mc_moments``.
    """
    images = _check(image, num_samples, chunk_size)[:1]
    precision = resolve_precision(embedding_precision, images.device)
    sampling = resolve_precision(logit_precision, images.device)
    with _eval_mode(model):
        features = model.features(images)  # [1, D, h, w]
        with autocast(precision, images.device):
            embeddings = model.embed(features)  # [1, P, h, w] float32, unit length
        moments = _moments_from_features(
            model, features, num_samples, generator, chunk_size, mean_entropy, sampling
        )[0]
    if image_resolution:
        moments = to_image_resolution(model, moments, tuple(images.shape[-2:]))
    return moments, embeddings[0]


@torch.no_grad()
def mc_samples(
    model: BayesianSegmenter,
    image: torch.Tensor,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Stored MC softmax samples ``[m, C, h, w]`` of one image at the decoder resolution.

    Same masks as ``mc_moments`` for the same generator state: for tests, figures and the
    stored-samples path of ``model.acquisition.score``.
    """
    images = _check(image, num_samples)[:1]
    with _eval_mode(model):
        features = model.features(images)  # [1, D, h, w]
        masks = _dropout_masks(model, num_samples, generator)  # [m, D]
        chunks = _logit_chunks(model, features, masks, chunk_size_for(model, features))
        return torch.cat([chunk.logits()[0].softmax(dim=1) for chunk in chunks])


@torch.no_grad()
def predict_probabilities(model: BayesianSegmenter, images: torch.Tensor) -> torch.Tensor:
    """Deterministic (dropout off) softmax ``[B, C, H, W]`` at the image resolution."""
    images = _check(images, 1)
    with _eval_mode(model):
        return F.softmax(model(images), dim=1)
