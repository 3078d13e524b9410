"""Semi-supervised training from the unlabeled pixels (paper 003, S4AL, section 3).

Sparse labels leave more than 99% of every training image unlabeled. S4AL trains the student
on those pixels too, with the EMA teacher's predictions as targets:

- **Pseudo labels** (eq. 3): the teacher (eval mode, no dropout, no gradient) sees the same
  augmented crop as the supervised loss; its argmax is the target of an unlabeled pixel and
  its top probability ``p`` the pixel's confidence.
- **Confidence weighting** (eq. 5): each unlabeled pixel's cross-entropy is weighted by ``p``,
  so an unsure teacher pushes the student less. ``min_confidence`` can leave the least sure
  pixels out entirely (0, the paper's setting, keeps them all).
- **eta** (eqs. 4 and 6): an image's unsupervised loss is scaled by the share of its pixels
  the teacher gives ``p > threshold`` (0.97), so a teacher that knows little about an image
  (early in training, or an unusual frame) contributes little.
- **ClassMix** (Olsson et al., ref. [59]): the student sees strong views. Each is a target crop
  with the pixels of half the classes (rounded up) of a source crop's pseudo labels pasted
  on it, images, labels, pseudo labels and confidences alike, then color jitter. Of the B
  strong views of a batch, the first ceil(B/2) mix within the batch with classes drawn
  uniformly (eq. 6's L_unsup1); the rest take their source from a replay buffer of earlier
  steps' crops, with classes drawn **balanced**, tail classes ``tail_weight`` times as
  likely as head classes (L_unsup2, paper 003 section 3.3). Head classes are the ones with
  at least a uniform share (1 / C) of the labeled pixels, tail the rest; the paper leaves
  the split and the two distributions open, these are this project's choices.

The unsupervised loss is over pixels with no annotation: annotated pixels are the supervised
loss's, and crop padding (``valid`` False) is nobody's. What the teacher saw is what the
buffer keeps, so a replayed source needs no second teacher forward; its pseudo labels are a
few steps old, from a teacher that moves slowly (alpha 0.99).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import color_jitter
from .data import IGNORE_INDEX

DEFAULT_THRESHOLD = 0.97  # paper 003, eq. 4: a pixel counts towards eta above this confidence
DEFAULT_REPLAY_SIZE = 50  # M, paper 003's CamVid setting (Table S1)
DEFAULT_TAIL_WEIGHT = 3.0
STRONG_JITTER = 0.4  # the strong view's brightness / contrast / saturation range, as SparseAugment's
STRONG_JITTER_PROB = 0.5  # paper 003, Table S1: ColorJitter(p = 0.5)


@dataclass
class PseudoBatch:
    """Training crops with the teacher's view of them.

    ``images [B, 3, H, W]`` float in [0, 1]; ``labels [B, H, W]`` int64, IGNORE_INDEX where no
    annotation; ``valid [B, H, W]`` bool, False on crop padding; ``pseudo [B, H, W]`` int64,
    the teacher's argmax; ``confidence [B, H, W]`` float, the teacher's top probability.
    """

    images: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    pseudo: torch.Tensor
    confidence: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def take(self, indices: list[int]) -> PseudoBatch:
        return PseudoBatch(*(field[indices] for field in self._fields()))

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return self.images, self.labels, self.valid, self.pseudo, self.confidence

    @classmethod
    def concat(cls, batches: list[PseudoBatch]) -> PseudoBatch:
        return cls(*(torch.cat(fields) for fields in zip(*(batch._fields() for batch in batches))))


@torch.no_grad()
def pseudo_labels(teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's targets: ``logits [B, C, H, W]`` -> argmax ``[B, H, W]`` int64 and its
    probability ``[B, H, W]`` float32 (softmax in fp32 whatever the autocast)."""
    confidence, pseudo = F.softmax(teacher_logits.float(), dim=1).max(dim=1)
    return pseudo, confidence


def pseudo_label_loss(
    student_logits: torch.Tensor,
    batch: PseudoBatch,
    threshold: float = DEFAULT_THRESHOLD,
    min_confidence: float = 0.0,
) -> torch.Tensor:
    """Eqs. 4-6: the mean over images of ``eta_b * L_b``, where ``L_b`` is the mean over image b's
    unlabeled valid pixels of ``w * CE(student, pseudo)``, ``w = p`` (0 below `min_confidence`)
    and ``eta_b`` the share of its valid pixels with ``p > threshold``.

    ``student_logits [B, C, H, W]`` on the strong views whose pseudo labels `batch` holds.
    Annotated and padding pixels add nothing; 0 when no image has an unlabeled pixel.
    """
    if student_logits.shape[0] != len(batch) or student_logits.shape[-2:] != batch.pseudo.shape[-2:]:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} do not match the pseudo labels "
            f"{tuple(batch.pseudo.shape)}: pass the logits of the strong views the labels were mixed for."
        )
    unlabeled = batch.valid & (batch.labels == IGNORE_INDEX)  # [B, H, W]
    weight = batch.confidence * (unlabeled & (batch.confidence >= min_confidence))  # [B, H, W], eq. 5
    per_pixel = F.cross_entropy(student_logits.float(), batch.pseudo, reduction="none")  # [B, H, W]
    per_image = (weight * per_pixel).flatten(1).sum(1) / unlabeled.flatten(1).sum(1).clamp(min=1)  # [B]
    confident = (batch.confidence > threshold) & batch.valid
    eta = confident.flatten(1).sum(1) / batch.valid.flatten(1).sum(1).clamp(min=1)  # [B]
    return (eta * per_image).mean()


def balanced_class_weights(labeled_counts: torch.Tensor, tail_weight: float = DEFAULT_TAIL_WEIGHT) -> torch.Tensor:
    """Per-class ClassMix sampling weights ``[C]`` from the labeled pixels per class ``[C]``:
    1 for a head class (at least 1 / C of the labeled pixels), `tail_weight` for the others."""
    if tail_weight <= 0:
        raise ValueError(f"tail_weight must be > 0, got {tail_weight}.")
    counts = labeled_counts.to(torch.float64)
    share = counts / counts.sum().clamp(min=1)
    head = share >= 1.0 / len(counts)
    return torch.where(head, 1.0, tail_weight).to(torch.float64)


def class_mask(
    pseudo: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """ClassMix's paste mask ``[H, W]`` bool for one source crop: the valid pixels of half the
    classes (rounded up) present in its pseudo labels ``[H, W]``, drawn without replacement
    with probabilities proportional to ``weights [C]``."""
    present = torch.unique(pseudo[valid]).cpu()  # [k] sorted
    if present.numel() == 0:
        return torch.zeros_like(valid)
    count = math.ceil(present.numel() / 2)
    drawn = torch.multinomial(weights[present], count, replacement=False, generator=generator)
    chosen = present[drawn].to(pseudo.device)
    return torch.isin(pseudo, chosen) & valid


def class_mix(target: PseudoBatch, source: PseudoBatch, masks: torch.Tensor) -> PseudoBatch:
    """`source`'s pixels where ``masks [B, H, W]`` is True, `target`'s elsewhere, in every field."""
    if masks.shape != target.labels.shape or len(source) != len(target):
        raise ValueError(f"masks {tuple(masks.shape)} must be [B, H, W] of the target, one source per target.")
    return PseudoBatch(
        images=torch.where(masks[:, None], source.images, target.images),
        labels=torch.where(masks, source.labels, target.labels),
        valid=torch.where(masks, source.valid, target.valid),
        pseudo=torch.where(masks, source.pseudo, target.pseudo),
        confidence=torch.where(masks, source.confidence, target.confidence),
    )


class ReplayBuffer:
    """The last `capacity` crops the teacher labeled (FIFO), sampled uniformly (paper 003, 3.3).

    Kept compact on their device: images and confidences in fp16, labels and pseudo labels in
    the smallest integer type that holds them; at a 512 x 512 crop one entry is about 3.1 MB.
    """

    def __init__(self, capacity: int = DEFAULT_REPLAY_SIZE):
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}.")
        self.capacity = capacity
        self._entries: deque[tuple[torch.Tensor, ...]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, batch: PseudoBatch) -> None:
        label_dtype = torch.uint8 if int(batch.pseudo.max()) <= 255 else torch.int16
        for index in range(len(batch)):
            self._entries.append((
                batch.images[index].detach().to(torch.float16),
                batch.labels[index].to(torch.int16),
                batch.valid[index].clone(),
                batch.pseudo[index].to(label_dtype),
                batch.confidence[index].detach().to(torch.float16),
            ))

    def sample(self, count: int, generator: torch.Generator) -> PseudoBatch:
        """`count` entries drawn uniformly with replacement, as a batch in training dtypes."""
        if not self._entries:
            raise ValueError("The replay buffer is empty: add a batch before sampling from it.")
        picks = torch.randint(0, len(self._entries), (count,), generator=generator).tolist()
        images, labels, valid, pseudo, confidence = zip(*(self._entries[pick] for pick in picks))
        return PseudoBatch(
            images=torch.stack(images).float(),
            labels=torch.stack(labels).to(torch.int64),
            valid=torch.stack(valid),
            pseudo=torch.stack(pseudo).to(torch.int64),
            confidence=torch.stack(confidence).float(),
        )


def strong_views(
    current: PseudoBatch,
    replay: ReplayBuffer,
    class_weights: torch.Tensor,
    generator: torch.Generator,
) -> PseudoBatch:
    """The B strong views of a batch (module docstring): ClassMix within the batch for the
    first ceil(B/2), balanced ClassMix from `replay` for the rest (within the batch too while
    the buffer is empty), then color jitter with probability 1/2 per view."""
    size = len(current)
    in_batch = size if len(replay) == 0 else size - size // 2
    # in-batch sources: the batch rotated by 1..B-1, so no crop is mixed with itself (B > 1)
    shift = int(torch.randint(1, size, (1,), generator=generator)) if size > 1 else 0
    sources = [current.take([(index + shift) % size for index in range(in_batch)])]
    if in_batch < size:
        sources.append(replay.sample(size - in_batch, generator))
    source = PseudoBatch.concat(sources)
    uniform = torch.ones_like(class_weights)
    masks = torch.stack([
        class_mask(source.pseudo[index], source.valid[index], uniform if index < in_batch else class_weights, generator)
        for index in range(size)
    ])  # [B, H, W]
    mixed = class_mix(current, source, masks)
    images = []
    for image in mixed.images:
        if float(torch.rand(1, generator=generator)) < STRONG_JITTER_PROB:
            draws = torch.rand(3, generator=generator).tolist()
            image = color_jitter(image, tuple(1.0 + STRONG_JITTER * (2.0 * draw - 1.0) for draw in draws))
        images.append(image)
    mixed.images = torch.stack(images)
    return mixed
