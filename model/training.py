"""Training on sparse pixel labels (paper 000, eq. 5; section 4.2).

The loss is cross-entropy over the labeled pixels only, averaged over the labeled pixels of
the batch: every pixel that is ``IGNORE_INDEX`` (unlabeled, void, padding) contributes
nothing. The samples are few and small enough to hold in memory, so the input is a plain
list of ``(image [3, H, W], labels [H, W])``.

Schedule: AdamW with poly learning-rate decay ``lr * (1 - t / T) ** 0.9`` (DeepLab; PixelPick,
ref. [72] of paper 000, whose schedule the paper follows, uses Adam at 5e-4 with poly decay).
The pretrained encoder gets a tenth of the learning rate: with a handful of clicks per image
the decoder and classifier must move, the ImageNet features mostly should not.

Two traps handled here: DeepLabV3+ cannot run a train-mode batch of one (BatchNorm after
ASPP's global pooling sees a single value per channel), so batches are always >= 2 and drawn
with replacement when there are fewer images; and a random crop can miss every labeled pixel
of a sparse image, so such a crop is redrawn (a batch without any labeled pixel would give a
NaN loss, 0 / 0).

Contrastive training (paper 004, section 3.2; ``model.contrastive``): with
``contrastive_weight`` (lambda) > 0 the loss is ``CE + lambda * InfoNCE`` over anchors drawn
from the labeled pixels, against a per-class memory bank that the run fills and returns;
with ``ema_decay`` set, an EMA teacher follows the student after every step and is returned
as the model to serve. Both are on by default; ``contrastive_weight=0, ema_decay=None`` is
paper 000's plain sparse-CE training.

Semi-supervised training (paper 003; ``model.semi``): with ``semi_supervised`` the EMA
teacher's confident predictions on the unlabeled pixels train the student too, on ClassMix
views concatenated to the supervised batch (one forward of 2B crops). Off by default.

Speed (README, "Training speed"): ``precision`` autocasts the convolutions (bf16 where the
hardware has it natively, fp16 with loss scaling on older CUDA), and ``channels_last`` runs
the step in NHWC; the losses and the memory bank stay fp32 either way. The projection head
runs only at the decoder cells the labeled pixels read (``head_at_labeled_cells``,
``ProjectionHead.at_cells``).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import contrastive, semi
from .augment import SparseAugment
from .contrastive import EmaTeacher, MemoryBank
from .data import IGNORE_INDEX
from .distributed import Distributed
from .network import BayesianSegmenter
from .precision import PRECISIONS, autocast, resolve_precision

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
_CROP_TRIES = 10  # redraws of a crop that missed every labeled pixel, per sample

# (step, total steps, loss) after each optimizer step; not called for a skipped step
Progress = Callable[[int, int, float], None]


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    ``steps`` wins over ``epochs`` when given; an epoch is ``ceil(images / batch_size)``
    steps over the images that have at least one label.
    """

    epochs: int = 100  # paper 000, section 4.2
    steps: int | None = None
    batch_size: int = 4
    optimizer: str = "adamw"
    lr: float = 5e-4
    encoder_lr_scale: float = 0.1  # encoder lr = lr * this
    weight_decay: float = 2e-4
    momentum: float = 0.9  # SGD only
    poly_power: float = 0.9
    crop_size: tuple[int, int] = (360, 480)  # a whole CamVid frame
    augment: bool = True
    seed: int = 0
    # paper 004: loss = CE + contrastive_weight * InfoNCE; 0 turns the contrastive part off
    contrastive_weight: float = 0.1
    temperature: float = contrastive.DEFAULT_TEMPERATURE
    anchors_per_class: int = contrastive.DEFAULT_ANCHORS_PER_CLASS
    negatives: int = contrastive.DEFAULT_NEGATIVES  # K_n per anchor
    bank_per_image: int = contrastive.DEFAULT_BANK_PER_IMAGE  # P_i
    bank_capacity: int = contrastive.DEFAULT_BANK_CAPACITY  # P_t per class
    ema_decay: float | None = 0.99  # None: no teacher, the student is the result
    # the teacher is served unless its labeled-pixel accuracy is this much below the student's
    # (``TrainResult.teacher`` is then None); None: always the teacher
    teacher_tolerance: float | None = 0.05
    # autocast of the forward pass: "auto" is bf16 where the device computes it natively (CPUs
    # with AVX512-BF16 / AMX, CUDA >= Ampere), fp16 with loss scaling on older CUDA, else fp32
    precision: str = "fp32"
    # NHWC activations for the run: oneDNN's depthwise-convolution backward (most of an
    # EfficientNet step on CPU) is about 1.6x faster in it; the model is handed back as it came
    channels_last: bool = True
    # the projection head evaluated only at the decoder cells the labeled pixels read
    # (ProjectionHead.at_cells; the whole map when labels cover more than a fifth of it)
    head_at_labeled_cells: bool = True
    # paper 003 (S4AL, model.semi): pseudo labels from the EMA teacher on the unlabeled pixels
    semi_supervised: bool = False
    pseudo_threshold: float = semi.DEFAULT_THRESHOLD  # eta counts the pixels above it (eq. 4)
    pseudo_min_confidence: float = 0.0  # unlabeled pixels less sure than this are left out (0: none)
    semi_warmup: float = 0.1  # share of the steps on the labels alone first (paper 003: 10 of 100 epochs)
    replay_size: int = semi.DEFAULT_REPLAY_SIZE  # M: crops kept for the balanced ClassMix
    tail_weight: float = semi.DEFAULT_TAIL_WEIGHT  # how much likelier a tail class is pasted

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size must be >= 2, got {self.batch_size}: BatchNorm in DeepLabV3+'s ASPP "
                "pooling fails on a train-mode batch of one (fewer images are drawn with replacement)."
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 or None, got {self.steps}.")
        if self.steps is None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 (or give steps), got {self.epochs}.")
        if self.lr <= 0 or self.weight_decay < 0 or self.encoder_lr_scale < 0:
            raise ValueError("lr must be > 0; weight_decay and encoder_lr_scale must be >= 0.")
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be (H, W) with both >= 1, got {self.crop_size}.")
        if self.contrastive_weight < 0 or self.temperature <= 0:
            raise ValueError("contrastive_weight must be >= 0 and temperature > 0.")
        if min(self.anchors_per_class, self.negatives, self.bank_per_image, self.bank_capacity) < 1:
            raise ValueError("anchors_per_class, negatives, bank_per_image and bank_capacity must be >= 1.")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {self.ema_decay}.")
        if self.teacher_tolerance is not None and not self.teacher_tolerance >= 0.0:
            raise ValueError(f"teacher_tolerance must be >= 0 or None, got {self.teacher_tolerance}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if self.semi_supervised and self.ema_decay is None:
            raise ValueError(
                "semi_supervised needs the EMA teacher for its pseudo labels (paper 003): set ema_decay "
                "(0.99), or train with semi_supervised=False."
            )
        if not (0.0 <= self.pseudo_threshold < 1.0 and 0.0 <= self.pseudo_min_confidence < 1.0):
            raise ValueError("pseudo_threshold and pseudo_min_confidence must be in [0, 1).")
        if not 0.0 <= self.semi_warmup < 1.0:
            raise ValueError(f"semi_warmup must be in [0, 1), got {self.semi_warmup}.")
        if self.replay_size < 1 or self.tail_weight <= 0:
            raise ValueError("replay_size must be >= 1 and tail_weight > 0.")

    @property
    def contrastive(self) -> bool:
        return self.contrastive_weight > 0

    def total_steps(self, num_images: int) -> int:
        if self.steps is not None:
            return self.steps
        return self.epochs * math.ceil(num_images / self.batch_size)

    def augmentation(self) -> SparseAugment:
        """The augmentation for this run; with ``augment=False`` only crop/pad (batches must stack)."""
        if self.augment:
            return SparseAugment(crop_size=tuple(self.crop_size))
        return SparseAugment(
            crop_size=tuple(self.crop_size), scale_range=(1.0, 1.0), flip=False, jitter=0.0, blur_prob=0.0
        )


# The backend's schedule (SEGAL_TRAIN_STEPS=auto, the default): steps grow with the labeled
# images (about AUTO_EPOCHS passes over them) within [min, max]; a run that continues from the
# served model needs fewer. 50 passes are 100 steps for 8 images at batch 4: in bf16 with an
# EMA decay of 0.9 they scored 0.241 mIoU on CamVid val (3 seeds) against 0.242 for the fixed
# 300 fp32 steps used before (README, "Training speed").
AUTO_EPOCHS = 50
AUTO_MIN_STEPS = 60
AUTO_MAX_STEPS = 1500
WARM_START_FRACTION = 0.5


def auto_steps(num_images: int, batch_size: int, warm_start: bool) -> int:
    """Optimizer steps for a run on `num_images` labeled images (see AUTO_EPOCHS)."""
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1, got {num_images} and {batch_size}.")
    steps = AUTO_EPOCHS * math.ceil(num_images / batch_size)
    if warm_start:
        steps = round(steps * WARM_START_FRACTION)
    return int(min(AUTO_MAX_STEPS, max(AUTO_MIN_STEPS, steps)))


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step (the total loss)
    contrastive_losses: list[float] = field(default_factory=list)  # InfoNCE of the steps that had one
    pseudo_losses: list[float] = field(default_factory=list)  # the unsupervised loss of the semi-supervised steps
    steps: int = 0  # optimizer steps taken
    skipped_steps: int = 0  # steps whose whole batch held no labeled pixel after cropping
    nonfinite_steps: int = 0  # steps not applied: a NaN or infinite gradient (fp16: the scaler skips its own)
    num_images: int = 0  # images with at least one label (the ones trained on)
    num_labeled_pixels: int = 0
    seconds: float = 0.0
    precision: str = "fp32"  # the resolved TrainConfig.precision
    teacher: BayesianSegmenter | None = None  # the EMA teacher (eval mode), with ema_decay set and kept
    memory_bank: MemoryBank | None = None  # with contrastive_weight > 0
    # with a teacher checked: both networks' accuracy on the labeled pixels of the training
    # images (unaugmented, at most TEACHER_CHECK_IMAGES)
    teacher_accuracy: float | None = None
    student_accuracy: float | None = None

    @property
    def teacher_rejected(self) -> bool:
        """A teacher was trained and checked, and the student is served instead."""
        return self.teacher is None and self.teacher_accuracy is not None


def _labeled_samples(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]], num_classes: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validate and keep the samples that have at least one labeled pixel."""
    kept = []
    for index, (image, labels) in enumerate(samples):
        if image.ndim != 3 or image.shape[0] != 3 or labels.shape != image.shape[-2:]:
            raise ValueError(
                f"Sample {index}: expected image [3, H, W] and labels [H, W], got "
                f"{tuple(image.shape)} and {tuple(labels.shape)}."
            )
        if not image.is_floating_point():
            raise ValueError(
                f"Sample {index}: image is {image.dtype}; pass floats in [0, 1] (model.data.load_image)."
            )
        labels = labels.to(torch.int64)
        labeled = labels != IGNORE_INDEX
        bad = labeled & ((labels < 0) | (labels >= num_classes))
        if bad.any():
            raise ValueError(
                f"Sample {index}: label {int(labels[bad][0])} is outside 0..{num_classes - 1}. Map void "
                f"and unlabeled pixels to IGNORE_INDEX ({IGNORE_INDEX}), e.g. SegmentationFolder(void_index=...)."
            )
        if labeled.any():
            kept.append((image.to(torch.float32), labels))
    if not kept:
        raise ValueError(
            f"None of the {len(samples)} samples has a labeled pixel (every label is IGNORE_INDEX = "
            f"{IGNORE_INDEX}); annotate some pixels before training."
        )
    return kept


def _index_stream(count: int, generator: torch.Generator) -> Iterator[int]:
    """Endless concatenated random permutations: every image once per pass, then reshuffle."""
    while True:
        yield from torch.randperm(count, generator=generator).tolist()


def _augmented(
    augment: SparseAugment, image: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A crop that holds a labeled pixel (after at most _CROP_TRIES draws): image, labels, valid."""
    for _ in range(_CROP_TRIES):
        crop = augment.with_valid(image, labels, generator)
        if (crop[1] != IGNORE_INDEX).any():
            break
    return crop


def _optimizer(model: BayesianSegmenter, config: TrainConfig) -> torch.optim.Optimizer:
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    encoder_ids = {id(p) for p in encoder}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    groups = [
        {"params": head, "lr": config.lr},
        {"params": encoder, "lr": config.lr * config.encoder_lr_scale},
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def sparse_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 5: mean cross-entropy over labeled pixels. ``logits [B, C, H, W]``, ``labels [B, H, W]``."""
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="mean")


def _memory_bank(model: BayesianSegmenter, config: TrainConfig, given: MemoryBank | None, device) -> MemoryBank:
    dim = model.config.projection_dim
    if given is not None and (given.num_classes, given.dim) == (model.num_classes, dim):
        return given.to(device)  # continue the previous run's queues
    return MemoryBank(model.num_classes, dim, config.bank_capacity, device=device)


class _StudentForward(nn.Module):
    """The student's training forward as one module call: DistributedDataParallel exchanges
    the gradients of what runs through its wrapped forward. Unwrapped (one process) it runs
    the same operations in the same order as calling the model's parts directly."""

    def __init__(self, model: BayesianSegmenter, embed: bool, at_labeled_cells: bool = True):
        super().__init__()
        self.model = model
        self.embed = embed
        self.at_labeled_cells = at_labeled_cells

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        """-> features ``[B', D, h/4, w/4]``, logits ``[B', C, h, w]``, and for the contrastive loss
        the embeddings of the first ``B = len(labels)`` crops (the supervised ones; strong views
        follow them): ``[u, P]`` at the sorted cells ``[u]`` their labeled pixels read, or the
        whole map ``[B, P, h/4, w/4]`` (and no cells) when the labels cover much of it."""
        features = self.model.features(images)  # [B', D, h/4, w/4]
        size = tuple(images.shape[-2:])
        logits = self.model.logits_from_features(features, size)  # [B', C, h, w]
        if not self.embed:
            return features, logits, None, None
        # the head's 3x3 conv over all channels costs as much as ASPP: at the labeled cells only
        supervised = features[: len(labels)]
        keys = None
        if self.at_labeled_cells:
            keys = contrastive.labeled_cells(labels, tuple(features.shape[-2:]), self.model.padded_size(size))
        if keys is None:
            return features, logits, self.model.embed(supervised), None
        return features, logits, self.model.projection.at_cells(supervised, keys), keys

    @property
    def unused_parameters(self) -> bool:
        """Whether some parameters never reach the outputs: a projection head not run."""
        return not self.embed and self.model.projection is not None


def train(
    model: BayesianSegmenter,
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    config: TrainConfig | None = None,
    progress: Progress | None = None,
    memory_bank: MemoryBank | None = None,
    distributed: Distributed | None = None,
) -> TrainResult:
    """Fine-tune `model` (the student) in place on sparse labels; returns the loss history,
    and, as configured, the EMA teacher and the memory bank.

    `memory_bank` continues a previous run's bank (it is updated in place); one of another
    shape (the class list or the projection changed) is replaced by an empty one.

    Runs on the model's device. Reproducible for a given ``config.seed`` on CPU: sampling and
    augmentation use their own generator, and dropout runs under a forked global RNG seeded
    from it, so the caller's global RNG state is left untouched. The model's train/eval mode
    is restored afterwards.

    `distributed` (``model.distributed``, one process per rank under ``torchrun``): the same
    training data-parallel, each rank on its share of every global batch; the losses are the
    global batch's, and every rank returns the same teacher and bank (how: that module).
    """
    config = config or TrainConfig()
    if distributed is not None:
        distributed.check_batch_size(config.batch_size)
    if config.contrastive and model.projection is None:
        raise ValueError(
            "contrastive_weight > 0 needs a projection head: build the model with "
            "ModelConfig(projection_dim=128), or train with contrastive_weight=0."
        )
    start = time.perf_counter()
    data = _labeled_samples(samples, model.num_classes)
    total = config.total_steps(len(data))
    augment = config.augmentation()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    indices = _index_stream(len(data), generator)
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / total) ** config.poly_power
    )
    result = TrainResult(
        num_images=len(data), num_labeled_pixels=sum(int((lab != IGNORE_INDEX).sum()) for _, lab in data)
    )
    if config.contrastive:
        result.memory_bank = _memory_bank(model, config, memory_bank, device)
    teacher = EmaTeacher(model, config.ema_decay) if config.ema_decay is not None else None
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    result.precision = precision = resolve_precision(config.precision, device)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    was_training = model.training
    model.train()
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    fp32_convs = dilated_depthwise_in_fp32(model, precision, layout, device)
    forward = _StudentForward(
        model, embed=result.memory_bank is not None, at_labeled_cells=config.head_at_labeled_cells
    )
    rank_generator = generator  # anchor sampling and ClassMix: per rank under DDP
    if distributed is not None:
        forward = distributed.wrap(forward, find_unused_parameters=forward.unused_parameters)
        rank_generator = distributed.contrastive_generator(config.seed)  # the data generator stays in step
    replay = semi.ReplayBuffer(config.replay_size) if config.semi_supervised else None
    if config.semi_supervised:
        teacher.model.to(memory_format=layout)
        labeled_counts = sum(
            torch.bincount(lab[lab != IGNORE_INDEX], minlength=model.num_classes) for _, lab in data
        )  # [C]
        class_weights = semi.balanced_class_weights(labeled_counts, config.tail_weight)
        semi_from_step = math.floor(config.semi_warmup * total) + 1
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(config.seed if distributed is None else distributed.dropout_seed(config.seed))
            for step in range(1, total + 1):
                batch = [_augmented(augment, *data[next(indices)], generator) for _ in range(config.batch_size)]
                labels = torch.stack([lab for _, lab, _ in batch]).to(device)  # [B, h, w]
                if not (labels != IGNORE_INDEX).any():
                    result.skipped_steps += 1
                    _advance_schedule(scheduler)
                    continue
                if distributed is not None:  # every rank drew the whole global batch; it trains on its share
                    batch, labels = distributed.shard(batch, labels)
                images = torch.stack([img for img, _, _ in batch]).to(device)  # [B, 3, h, w]
                images = images.contiguous(memory_format=layout)
                strong = None
                if replay is not None and step >= semi_from_step:
                    valid = torch.stack([mask for _, _, mask in batch]).to(device)  # [B, h, w]
                    strong = _strong_views(teacher, images, labels, valid, replay, class_weights,
                                           precision, device, rank_generator)
                    inputs = torch.cat([images, strong.images.contiguous(memory_format=layout)])  # [2B, 3, h, w]
                else:
                    inputs = images
                with autocast(precision, device):  # the convolutions: nearly all the FLOPs
                    # [B', D, h/4, w/4], [B', C, h, w], [B, P, h/4, w/4] (None without the contrastive loss);
                    # B' = B, or 2B with the strong views after the supervised crops
                    features, all_logits, embeddings, cell_keys = forward(inputs, labels)
                # the losses and the memory bank in fp32: InfoNCE at tau = 0.1 is sensitive to
                # rounding, and the bank is saved with the model
                all_logits = all_logits.float()
                features, logits = features[: len(images)], all_logits[: len(images)]
                cross_entropy = sparse_cross_entropy if distributed is None else distributed.sparse_cross_entropy
                loss = cross_entropy(logits, labels)
                if result.memory_bank is not None:
                    if cell_keys is None:
                        sampled = embeddings  # [B, P, h/4, w/4] unit vectors (the head normalizes in fp32)
                    else:  # [u, P] at the labeled pixels' cells
                        padded = model.padded_size(tuple(labels.shape[-2:]))
                        sampled = contrastive.CellEmbeddings(cell_keys, embeddings, tuple(features.shape[-2:]), padded)
                    nce = contrastive.contrastive_step(
                        model, features, logits, labels, result.memory_bank,
                        per_image=config.bank_per_image, anchors_per_class=config.anchors_per_class,
                        negatives=config.negatives, temperature=config.temperature, generator=rank_generator,
                        embeddings=sampled,
                        share_pushes=None if distributed is None else distributed.share_pushes,
                    )
                    if nce is not None:  # None until the bank holds two classes
                        loss = loss + config.contrastive_weight * nce
                        result.contrastive_losses.append(float(nce.detach()))
                    elif distributed is not None:  # DDP waits for a gradient of every output's parameters
                        loss = loss + 0.0 * embeddings.sum()
                if strong is not None:
                    unsupervised = semi.pseudo_label_loss(
                        all_logits[len(images):], strong, config.pseudo_threshold, config.pseudo_min_confidence
                    )
                    loss = loss + unsupervised
                    result.pseudo_losses.append(float(unsupervised.detach()))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if not scaler.is_enabled() and not _finite_gradients(model):
                    # one such update makes AdamW's moments NaN and the network with them (seen in bf16
                    # runs); the gradients are all-reduced already, so every rank skips the same step
                    _skip_nonfinite_step(result, step, total, float(loss.detach()))
                    optimizer.zero_grad(set_to_none=True)
                    _advance_schedule(scheduler)
                    continue
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if distributed is not None:  # identical BatchNorm statistics before the teacher reads them
                    distributed.sync_buffers(model)
                if teacher is not None:
                    teacher.update(model)
                result.losses.append(float(loss.detach()) if distributed is None else distributed.global_mean(loss))
                result.steps += 1
                if progress is not None:
                    progress(step, total, result.losses[-1])
    finally:
        for override in fp32_convs:
            override.remove()
        model.train(was_training)
        model.to(memory_format=torch.contiguous_format)
    if teacher is not None:
        result.teacher = teacher.model.to(memory_format=torch.contiguous_format).eval()
        _check_teacher(result, model, data, device, config.teacher_tolerance)
    result.seconds = time.perf_counter() - start
    return result


class _InstanceForward:
    """An instance-level ``forward`` override; ``remove()`` gives the class's back."""

    def __init__(self, module: nn.Module, forward: Callable):
        self.module = module
        module.forward = forward

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def dilated_depthwise_in_fp32(model: nn.Module, precision: str, layout: torch.memory_format,
                              device: torch.device) -> list[_InstanceForward]:  # fmt: skip
    """Run the dilated depthwise convolutions in fp32 when a CPU step is bf16 and channels-last;
    returns the overrides to remove after training.

    oneDNN (torch 2.13, CPU) computes the weight gradient of a depthwise convolution with
    dilation 2 wrong in bf16 channels-last: off by more than its own size, at times 1e32, while
    its forward and input gradient are right, and fp32 channels-last and bf16 contiguous are
    right too. DeepLabV3+ dilates the encoder's last stages (EfficientNet-Lite0: blocks 5.1-6.0),
    so every bf16 step trained four layers on garbage, and now and then an infinite gradient
    made the whole network NaN (the runs that "collapsed"). In fp32 channels-last they are also
    the fastest: forward and backward of blocks 5.x, batch 4 at 1/16 of 360x480, 95 ms against
    229 ms in bf16 (343 ms bf16 contiguous). Their output is fp32; the next convolution casts.
    """
    if precision != "bf16" or layout != torch.channels_last or device.type != "cpu":
        return []
    overrides = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1 and max(module.dilation) > 1:

            def fp32_forward(inputs: torch.Tensor, _forward=type(module).forward, _module=module) -> torch.Tensor:
                with torch.autocast(device.type, enabled=False):
                    return _forward(_module, inputs.float())

            overrides.append(_InstanceForward(module, fp32_forward))
    return overrides


# A run fails when more of its steps than this had NaN or infinite gradients (skipped, not applied).
MAX_NONFINITE_FRACTION = 0.1


class TrainingDiverged(RuntimeError):
    """Too many steps of a run had NaN or infinite gradients."""


def _advance_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """The schedule's step for a skipped optimizer step: the poly decay follows the step count,
    so a run ends at the same rate however many steps it skipped. torch warns of a scheduler
    step before any optimizer step as a likely mistake; when the first step is skipped, it is
    on purpose, and the warning would only alarm the user."""
    with warnings.catch_warnings():
        ordering = r"Detected call of `lr_scheduler\.step\(\)` before"
        warnings.filterwarnings("ignore", message=ordering, category=UserWarning)
        scheduler.step()


def _finite_gradients(model: nn.Module) -> bool:
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    return not gradients or bool(torch.isfinite(torch.nn.utils.get_total_norm(gradients)))


def _skip_nonfinite_step(result: TrainResult, step: int, total: int, loss: float) -> None:
    result.nonfinite_steps += 1
    log.warning("step %d of %d: NaN or infinite gradients (loss %s); the step is skipped", step, total, loss)
    if result.nonfinite_steps > max(1, MAX_NONFINITE_FRACTION * total):
        raise TrainingDiverged(
            f"training diverged: {result.nonfinite_steps} of the first {step} steps had NaN or infinite "
            f"gradients (precision {result.precision}). Train in fp32 (SEGAL_TRAIN_PRECISION=fp32) or with a lower "
            "learning rate."
        )


# The check of TrainConfig.teacher_tolerance: a teacher that lags far behind its student (a
# 0.99 teacher of 30 steps: 46% of the labeled pixels against 64%) is dropped and the student
# served instead.
TEACHER_CHECK_IMAGES = 16


@torch.no_grad()
def labeled_accuracy(model: BayesianSegmenter, data: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     device: torch.device) -> float:  # fmt: skip
    """Fraction of the labeled pixels of `data` ``[(image [3, H, W], labels [H, W])]`` that
    `model` (in eval mode here) predicts right."""
    was_training = model.training
    model.eval()
    correct = labeled = 0
    try:
        for image, labels in data:
            predicted = model(image.unsqueeze(0).to(device))[0].max(0).indices.cpu()  # [H, W] (argmax, faster on CPU)
            known = labels != IGNORE_INDEX
            correct += int((predicted[known] == labels[known]).sum())
            labeled += int(known.sum())
    finally:
        model.train(was_training)
    return correct / max(labeled, 1)


def _check_teacher(result: TrainResult, student: BayesianSegmenter, data, device: torch.device,
                   tolerance: float | None) -> None:  # fmt: skip
    """Serve the student when the teacher is clearly worse on the labeled pixels (the same on every rank)."""
    if tolerance is None:
        return
    subset = data[:TEACHER_CHECK_IMAGES]
    result.teacher_accuracy = labeled_accuracy(result.teacher, subset, device)
    result.student_accuracy = labeled_accuracy(student, subset, device)
    if result.teacher_accuracy < result.student_accuracy - tolerance:
        log.warning(
            "the EMA teacher predicts %.1f%% of the labeled pixels right, the student %.1f%%: serving the student",
            100 * result.teacher_accuracy, 100 * result.student_accuracy,
        )
        result.teacher = None


@torch.no_grad()
def _strong_views(
    teacher: EmaTeacher,
    images: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    replay: semi.ReplayBuffer,
    class_weights: torch.Tensor,
    precision: str,
    device: torch.device,
    generator: torch.Generator,
) -> semi.PseudoBatch:
    """The teacher's pseudo labels of this step's crops ``images [B, 3, h, w]``, their ClassMix
    strong views (``model.semi.strong_views``); the crops then join the replay buffer."""
    with autocast(precision, device):
        teacher_logits = teacher.model(images)  # [B, C, h, w], eval mode: no dropout
    current = semi.PseudoBatch(images, labels, valid, *semi.pseudo_labels(teacher_logits))
    strong = semi.strong_views(current, replay, class_weights, generator)
    replay.add(current)
    return strong
