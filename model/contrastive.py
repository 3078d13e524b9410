"""Pixel-to-pixel contrastive learning on sparse labels (paper 004, sections 3.2 and 4.2).

Three pieces, used by ``model.training.train`` when ``contrastive_weight > 0``:

- ``MemoryBank``: one FIFO queue of unit-length embeddings per class (``capacity`` = P_t =
  100 * P_i entries). After every step, for each image of the batch and each class, the
  ``per_image`` (P_i) labeled pixels that are classified correctly and have the highest
  predictive entropy (eq. 4) are pushed. The bank is saved with the checkpoint: the UMAP of
  the region acquisition (``model.regions``) is fitted on it.
- ``contrastive_loss``: InfoNCE (eq. 3, temperature tau) for anchors drawn from the labeled
  pixels of the batch, per class half misclassified ("hard") and half random; the positive
  is the mean of the anchor's class in the bank, the negatives come from the other classes'
  queues, half the nearest by cosine similarity and half random among the rest.
- ``EmaTeacher``: M_t = alpha * M_t + (1 - alpha) * M_s after every optimizer step; the
  teacher is the model that is served and that gives region features.

Only labeled pixels (keypoints, brushed or polygon regions) ever become anchors or bank
entries: with sparse labels there is nothing else whose class is known. Embeddings live at
the decoder resolution; an image pixel's embedding is bilinearly interpolated at its
position (the same mapping as ``BayesianSegmenter.upsample``), so a single click gets its
own embedding instead of sharing a downsampled cell.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .network import BayesianSegmenter, bilinear_taps, grid_sample_coordinates

DEFAULT_BANK_CAPACITY = 1000  # P_t = 100 * P_i
DEFAULT_BANK_PER_IMAGE = 10  # P_i
DEFAULT_ANCHORS_PER_CLASS = 50
DEFAULT_NEGATIVES = 1024  # K_n
DEFAULT_TEMPERATURE = 0.1


class MemoryBank:
    """Per-class FIFO queues of embeddings: ``features [C, T, P]``, ``sizes [C]`` filled slots.

    Each queue is a ring buffer; ``next_slot[c]`` is where the next vector goes, which is the
    oldest entry once the queue is full.
    """

    def __init__(self, num_classes: int, dim: int, capacity: int = DEFAULT_BANK_CAPACITY, device="cpu"):
        if num_classes < 1 or dim < 1 or capacity < 1:
            raise ValueError(f"num_classes, dim and capacity must be >= 1, got {num_classes}, {dim}, {capacity}.")
        self.features = torch.zeros(num_classes, capacity, dim, device=device)  # [C, T, P]
        self.sizes = torch.zeros(num_classes, dtype=torch.int64)  # [C]
        self.next_slot = torch.zeros(num_classes, dtype=torch.int64)  # [C]

    @property
    def num_classes(self) -> int:
        return self.features.shape[0]

    @property
    def capacity(self) -> int:
        return self.features.shape[1]

    @property
    def dim(self) -> int:
        return self.features.shape[2]

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def to(self, device) -> MemoryBank:
        self.features = self.features.to(device)
        return self

    def push(self, class_index: int, vectors: torch.Tensor) -> None:
        """Append ``vectors [n, P]`` to class `class_index`'s queue, dropping its oldest entries."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"Expected vectors [n, {self.dim}], got {tuple(vectors.shape)}.")
        vectors = vectors.detach()[-self.capacity :]  # more than fit: only the newest stay
        count = vectors.shape[0]
        if count == 0:
            return
        start = int(self.next_slot[class_index])
        slots = (start + torch.arange(count)) % self.capacity
        self.features[class_index, slots.to(self.features.device)] = vectors.to(self.features)
        self.next_slot[class_index] = (start + count) % self.capacity
        self.sizes[class_index] = min(self.capacity, int(self.sizes[class_index]) + count)

    def class_vectors(self, class_index: int) -> torch.Tensor:
        """The stored vectors ``[n_c, P]`` of one class (storage order, not age order)."""
        return self.features[class_index, : int(self.sizes[class_index])]

    def vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored vectors ``[N, P]`` and their classes ``[N]``."""
        parts = [self.class_vectors(c) for c in range(self.num_classes)]
        labels = [torch.full((len(p),), c, dtype=torch.int64) for c, p in enumerate(parts)]
        return torch.cat(parts), torch.cat(labels)

    def state_dict(self) -> dict:
        """Tensors only, so a checkpoint holding it still loads with ``weights_only=True``."""
        return {"features": self.features.cpu().clone(), "sizes": self.sizes.clone(), "next_slot": self.next_slot.clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> MemoryBank:
        try:
            features, sizes, next_slot = state["features"], state["sizes"], state["next_slot"]
            num_classes, capacity, dim = features.shape
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"Not a memory-bank state (features [C, T, P], sizes, next_slot): {error}") from error
        if (
            tuple(sizes.shape) != (num_classes,)
            or tuple(next_slot.shape) != (num_classes,)
            or bool((sizes < 0).any() | (sizes > capacity).any())
        ):
            raise ValueError("Memory-bank state is inconsistent: sizes/next_slot do not match features [C, T, P].")
        bank = cls(num_classes, dim, capacity)
        bank.features = features.to(torch.float32).clone()
        bank.sizes = sizes.to(torch.int64).clone()
        bank.next_slot = next_slot.to(torch.int64).clone()
        return bank


class EmaTeacher:
    """Exponential moving average of a student network (the mean teacher).

    ``update`` sets every floating-point parameter and buffer to
    ``alpha * teacher + (1 - alpha) * student`` and copies integer buffers (BatchNorm's
    batch counter). With ``warmup`` (the default), ``alpha = min(decay, 1 - 1 / (t + 1))``
    for the t-th update, the ramp of Tarvainen and Valpola's mean teacher: the first update
    copies the student, and the teacher of a short run (the backend trains for a few hundred
    steps) is not dominated by the weights it started from.
    """

    def __init__(self, student: torch.nn.Module, decay: float = 0.99, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}.")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.model = copy.deepcopy(student).eval()
        self.model.requires_grad_(False)

    def alpha(self) -> float:
        """The weight the next update gives the teacher's current value."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - 1.0 / (self.updates + 1))

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        alpha = self.alpha()
        student_state = student.state_dict()
        for name, teacher_value in self.model.state_dict().items():
            value = student_state[name].detach()
            if teacher_value.is_floating_point():
                teacher_value.mul_(alpha).add_(value, alpha=1.0 - alpha)
            else:
                teacher_value.copy_(value)
        self.updates += 1


def pixel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Eq. 4 in nats (the base only rescales, the ranking is the same): ``[n, C]`` -> ``[n]``."""
    log_probs = logits.log_softmax(dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def sample_embeddings(
    model: BayesianSegmenter,
    embeddings: torch.Tensor,  # [B, P, h, w] decoder resolution
    image_size: tuple[int, int],  # (H, W) of the images the labels belong to
    positions: torch.Tensor,  # [n, 3] (image, row, col) in image pixels
) -> torch.Tensor:
    """Unit embeddings ``[n, P]`` at image pixels, bilinear as ``model.upsample`` then renormalized."""
    padded_h, padded_w = model.padded_size(image_size)
    out = embeddings.new_empty(positions.shape[0], embeddings.shape[1])
    for index in positions[:, 0].unique().tolist():
        rows = (positions[:, 0] == index).nonzero().squeeze(1)
        y = grid_sample_coordinates(positions[rows, 1].to(embeddings.dtype), padded_h)
        x = grid_sample_coordinates(positions[rows, 2].to(embeddings.dtype), padded_w)
        grid = torch.stack([x, y], dim=-1).view(1, 1, -1, 2)  # [1, 1, n_i, 2]
        sampled = F.grid_sample(
            embeddings[index : index + 1], grid, mode="bilinear", padding_mode="border", align_corners=False
        )  # [1, P, 1, n_i]
        out[rows] = sampled[0, :, 0].t()
    return F.normalize(out, dim=1)


# above this share of a batch's decoder cells, the head runs on the whole map instead
# (gathering 3x3 patches cell by cell costs more per cell than the convolution)
MAX_CELL_FRACTION = 0.2


@dataclass
class CellEmbeddings:
    """The projection head's unit embeddings at the decoder cells that labeled pixels read.

    `keys` ``[u]`` sorted flat cells ``b * h * w + y * w + x`` of a ``[B, ·, h, w]`` map covering
    the padded image grid `padded_size`, `vectors` ``[u, P]`` (``ProjectionHead.at_cells``).
    """

    keys: torch.Tensor
    vectors: torch.Tensor
    cells: tuple[int, int]  # (h, w)
    padded_size: tuple[int, int]  # (H', W')

    def sample(self, positions: torch.Tensor) -> torch.Tensor:
        """Unit embeddings ``[n, P]`` at image pixels `positions` ``[n, 3]`` (image, row, col),
        bilinear as ``sample_embeddings`` then renormalized; every pixel's cells must be in `keys`."""
        taps, weights = _pixel_taps(positions, self.cells, self.padded_size)  # [n, 4], [n, 4]
        index = torch.searchsorted(self.keys, taps.reshape(-1))  # [n * 4]
        # index_select, not vectors[index]: the backward of advanced indexing accumulates in
        # parallel on a CPU, in an order that changes from run to run (index_add_'s does not)
        corners = self.vectors.index_select(0, index).view(*taps.shape, -1)  # [n, 4, P]
        mixed = (corners * weights.unsqueeze(2).to(self.vectors.dtype)).sum(dim=1)  # [n, P]
        return F.normalize(mixed, dim=1)


def _pixel_taps(
    positions: torch.Tensor, cells: tuple[int, int], padded_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4 flat decoder cells ``[n, 4]`` of each image pixel ``[n, 3]`` and their bilinear weights ``[n, 4]``."""
    height, width = cells
    rows0, rows1, row_frac = bilinear_taps(positions[:, 1], padded_size[0], height)
    cols0, cols1, col_frac = bilinear_taps(positions[:, 2], padded_size[1], width)
    base = positions[:, 0] * (height * width)
    taps = torch.stack([base + r * width + c for r in (rows0, rows1) for c in (cols0, cols1)], dim=1)
    weights = torch.stack([rw * cw for rw in (1 - row_frac, row_frac) for cw in (1 - col_frac, col_frac)], dim=1)
    return taps, weights


def labeled_cells(labels: torch.Tensor, cells: tuple[int, int], padded_size: tuple[int, int]) -> torch.Tensor | None:
    """Sorted flat decoder cells ``[u]`` that the labeled pixels of `labels` ``[B, H, W]`` read,
    or None when they are more than ``MAX_CELL_FRACTION`` of the map (then run the head on all)."""
    positions = (labels != IGNORE_INDEX).nonzero()  # [M, 3]
    keys = _pixel_taps(positions, cells, padded_size)[0].unique()  # sorted
    if keys.numel() > MAX_CELL_FRACTION * labels.shape[0] * cells[0] * cells[1]:
        return None
    return keys


def _random_pick(count: int, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(count, generator=generator)[:k]


def bank_candidates(
    labels: torch.Tensor,  # [M] classes of the labeled pixels
    predictions: torch.Tensor,  # [M]
    entropy: torch.Tensor,  # [M]
    images: torch.Tensor,  # [M] which image of the batch each pixel is in
    per_image: int,
) -> torch.Tensor:
    """Indices into the M labeled pixels to push: per image and class, the `per_image`
    correctly classified ones with the highest entropy (paper 004, section 3.2)."""
    chosen = []
    correct = (labels == predictions).nonzero().squeeze(1)
    if correct.numel() == 0:
        return correct
    groups = images[correct] * (int(labels.max()) + 1) + labels[correct]  # one id per (image, class)
    for group in groups.unique().tolist():
        members = correct[groups == group]
        top = entropy[members].topk(min(per_image, members.numel())).indices
        chosen.append(members[top])
    return torch.cat(chosen)


def anchor_indices(
    labels: torch.Tensor,  # [M]
    predictions: torch.Tensor,  # [M]
    per_class: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Per class up to `per_class` labeled pixels: half misclassified (hard), the rest random."""
    chosen = []
    for cls in labels.unique().tolist():
        members = (labels == cls).nonzero().squeeze(1)
        hard = members[predictions[members] != cls]
        hard = hard[_random_pick(hard.numel(), per_class // 2, generator)]
        rest = members[~torch.isin(members, hard)]
        rest = rest[_random_pick(rest.numel(), per_class - hard.numel(), generator)]
        chosen.append(torch.cat([hard, rest]))
    return torch.cat(chosen) if chosen else labels.new_empty(0)


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 3, mean over anchors. ``anchors [n, P]``, ``positives [n, P]``, ``negatives [n, K, P]``."""
    positive = (anchors * positives).sum(dim=-1, keepdim=True)  # [n, 1]
    negative = torch.einsum("np,nkp->nk", anchors, negatives)  # [n, K]
    logits = torch.cat([positive, negative], dim=1) / temperature  # [n, 1 + K]
    return F.cross_entropy(logits, torch.zeros(len(anchors), dtype=torch.int64, device=anchors.device))


def _negatives(anchors: torch.Tensor, pool: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, k, P]``: per anchor the count/2 most similar pool vectors, then random others."""
    k = min(count, pool.shape[0])
    with torch.no_grad():
        similarity = anchors.detach() @ pool.t()  # [n, N] cosine: both unit length
        nearest = similarity.topk(k // 2, dim=1).indices  # [n, k/2]
        # random distinct others: random keys, the nearest ones pushed below every other key
        keys = torch.rand(similarity.shape, generator=generator).to(similarity.device)
        keys.scatter_(1, nearest, -1.0)
        others = keys.topk(k - k // 2, dim=1).indices  # [n, k - k/2]
        picked = torch.cat([nearest, others], dim=1)  # [n, k]
    return pool[picked]


def contrastive_loss(
    anchors: torch.Tensor,  # [n, P] unit embeddings (with grad)
    anchor_labels: torch.Tensor,  # [n]
    bank: MemoryBank,
    negatives: int = DEFAULT_NEGATIVES,
    temperature: float = DEFAULT_TEMPERATURE,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """InfoNCE of each anchor against its class mean and other-class negatives from the bank.

    Anchors whose class has no bank entry, or for which the bank holds no other class, are
    left out; None when no anchor is left (early steps, a single labeled class).
    """
    generator = generator if generator is not None else torch.Generator()
    losses, weights = [], []
    for cls in anchor_labels.unique().tolist():
        positives = bank.class_vectors(cls)
        pool = torch.cat([bank.class_vectors(c) for c in range(bank.num_classes) if c != cls])
        if positives.shape[0] == 0 or pool.shape[0] == 0:
            continue
        group = anchors[anchor_labels == cls]  # [n_c, P]
        positive = F.normalize(positives.mean(dim=0), dim=0).expand_as(group)  # [n_c, P]
        losses.append(info_nce(group, positive, _negatives(group, pool, negatives, generator), temperature))
        weights.append(group.shape[0])
    if not losses:
        return None
    weights_t = torch.tensor(weights, dtype=anchors.dtype, device=anchors.device)
    return (torch.stack(losses) * weights_t).sum() / weights_t.sum()


def contrastive_step(
    model: BayesianSegmenter,
    features: torch.Tensor,  # [B, D, h, w] decoder features (with grad)
    logits: torch.Tensor,  # [B, C, H, W] image-resolution logits
    labels: torch.Tensor,  # [B, H, W] sparse labels, IGNORE_INDEX elsewhere
    bank: MemoryBank,
    *,
    per_image: int = DEFAULT_BANK_PER_IMAGE,
    anchors_per_class: int = DEFAULT_ANCHORS_PER_CLASS,
    negatives: int = DEFAULT_NEGATIVES,
    temperature: float = DEFAULT_TEMPERATURE,
    generator: torch.Generator,
    # [B, P, h, w] model.embed(features), or the embeddings at the labeled pixels' cells, if already computed
    embeddings: torch.Tensor | CellEmbeddings | None = None,
    share_pushes: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor | None:
    """One step of Algorithm 1, lines 9-11: update the bank, then the InfoNCE of the batch's anchors.

    `share_pushes` (data-parallel training, ``model.distributed``) turns this process's bank
    pushes ``([n, P], [n] classes)`` into every process's, in rank order; it is a collective,
    so it is called even when this share of the batch has nothing to push.
    """
    positions = (labels != IGNORE_INDEX).nonzero()  # [M, 3] (image, row, col)
    if positions.shape[0] == 0 and share_pushes is None:
        return None
    image_size = tuple(labels.shape[-2:])
    if embeddings is None:
        embeddings = model.embed(features)  # [B, P, h, w]
    if isinstance(embeddings, CellEmbeddings):
        sample = embeddings.sample
    else:
        def sample(at: torch.Tensor) -> torch.Tensor:
            return sample_embeddings(model, embeddings, image_size, at)
    with torch.no_grad():
        pixel_labels = labels[positions[:, 0], positions[:, 1], positions[:, 2]]  # [M]
        pixel_logits = logits.detach()[positions[:, 0], :, positions[:, 1], positions[:, 2]]  # [M, C]
        predictions = pixel_logits.argmax(dim=1)
        to_push = bank_candidates(
            pixel_labels.cpu(), predictions.cpu(), pixel_entropy(pixel_logits).cpu(), positions[:, 0].cpu(), per_image
        ).to(positions.device)
        if to_push.numel() or share_pushes is not None:
            pushed = sample(positions[to_push])  # [n, P] (no grad here)
            pushed_labels = pixel_labels[to_push]
            if share_pushes is not None:  # every rank's pushes, so that every rank holds the same bank
                pushed, pushed_labels = share_pushes(pushed, pushed_labels)
            for cls in pushed_labels.unique().tolist():
                bank.push(cls, pushed[pushed_labels == cls])
    if positions.shape[0] == 0:
        return None
    chosen = anchor_indices(pixel_labels.cpu(), predictions.cpu(), anchors_per_class, generator).to(positions.device)
    anchors = sample(positions[chosen])  # [n, P] with grad
    return contrastive_loss(anchors, pixel_labels[chosen], bank, negatives, temperature, generator)
