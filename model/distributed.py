"""Data-parallel training across processes (``torch.distributed``, launched by ``torchrun``).

``model.training.train(..., distributed=Distributed.from_environment(device))`` runs the
same training as one process, with the global batch split across the ranks:

- **Batch.** Every rank draws the *whole* global batch (``TrainConfig.batch_size`` images)
  from the same seeded generator, exactly as single-process training does, and trains on its
  contiguous share (rank r: images ``[r * B/W, (r + 1) * B/W)``). So the images, their order
  and their augmentation are those of the single-process run, the global batch size is
  unchanged, and the generator stays in step on every rank (skipped steps agree too).
- **Loss.** Cross-entropy is summed over a rank's labeled pixels and divided by the labeled
  pixels of the whole global batch (times W, because DistributedDataParallel averages the
  gradients): the averaged gradient is the gradient of the single-process mean over the
  batch's labeled pixels, even when the ranks' shares hold different numbers of clicks.
  The contrastive term is the mean of the ranks' InfoNCE over their own anchors.
- **Gradients.** DistributedDataParallel (Gloo on CPU, NCCL on CUDA) averages them, so the
  student's parameters are identical on every rank after each optimizer step.
- **BatchNorm.** On CUDA, SyncBatchNorm: the batch statistics are those of the global batch
  and every rank updates the same running statistics. SyncBatchNorm does not run on CPU;
  there each rank normalizes with its share's statistics, and after every step the running
  statistics are averaged across the ranks (``sync_buffers``; DDP's ``broadcast_buffers``
  would instead copy rank 0's, from half the batch, and only at the next forward: after the
  step the ranks' buffers would differ when the EMA teacher reads them). Either way the
  student's buffers are identical on every rank before the teacher update.
- **EMA teacher.** It is updated from identical student parameters and buffers, so it is
  identical on every rank without any communication.
- **Memory bank.** The vectors a rank pushes after a step are gathered from all ranks and
  pushed on every rank in rank order, which is the batch's image order: every rank holds the
  same bank, in the order single-process training would have built it.
- **Dropout and anchor sampling** draw from per-rank seeds (``seed + rank``): the ranks must
  not repeat each other's masks. This, and per-share BatchNorm statistics on CPU, is why a
  W-process run is close to, not bit-identical with, the single-process run.

``check_consistent`` verifies at the end of a run that every rank holds the same student,
teacher and bank (a checksum compared across ranks). Only rank 0 writes files.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX

# torch >= 2.13 names DDP's buffer broadcast forward_sync_buffers (broadcast_buffers is deprecated)
_HAS_FORWARD_SYNC_BUFFERS = "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
_CONTRASTIVE_SEED_OFFSET = 7919  # keeps the ranks' anchor-sampling seeds apart from the data seed


def _world_size_from_environment() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@dataclass
class Distributed:
    """This process's place in an initialized process group, and the collectives training needs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    sync_batchnorm: bool  # CUDA: SyncBatchNorm; CPU: per-share statistics, buffers averaged per step

    # -- setup ----------------------------------------------------------------------------

    @classmethod
    def from_environment(cls, device: str | torch.device = "cpu") -> Distributed | None:
        """Join the process group that ``torchrun`` describes in the environment (RANK,
        WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); None when there is no group or it
        has one process. On CUDA each rank takes ``cuda:LOCAL_RANK`` and NCCL; on CPU, Gloo."""
        if _world_size_from_environment() <= 1:
            return None
        requested = torch.device(device)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if requested.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("device cuda was asked for, but this process sees no CUDA device.")
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(
                    f"local rank {local_rank} has no GPU (this node sees {torch.cuda.device_count()}): start at "
                    "most one process per visible GPU (--nproc-per-node)."
                )
            rank_device = torch.device("cuda", local_rank)
            torch.cuda.set_device(rank_device)
            backend = "nccl"
        else:
            rank_device = torch.device("cpu")
            backend = "gloo"
        if not dist.is_initialized():
            if rank_device.type == "cuda":
                dist.init_process_group(backend=backend, device_id=rank_device)
            else:
                dist.init_process_group(backend=backend)
        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=local_rank,
            device=rank_device,
            sync_batchnorm=rank_device.type == "cuda",
        )

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes files."""
        return self.rank == 0

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def check_batch_size(self, batch_size: int) -> None:
        """The global batch must split evenly, and each share must be trainable: BatchNorm in
        DeepLabV3+'s ASPP pooling needs two values per channel, which SyncBatchNorm finds
        across the ranks, but per-share statistics (CPU) only within a share."""
        per_rank_minimum = 1 if self.sync_batchnorm else 2
        if batch_size % self.world_size or batch_size // self.world_size < per_rank_minimum:
            raise ValueError(
                f"A global batch of {batch_size} cannot be split across {self.world_size} processes "
                f"(it must be a multiple of the process count, with at least {per_rank_minimum} image(s) per "
                f"process on {self.device.type}): raise the batch size (SEGAL_TRAIN_BATCH_SIZE) or start fewer "
                "processes (SEGAL_TRAIN_PROCS)."
            )

    def wrap(self, forward: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """DistributedDataParallel around the training forward (its parameters are the model's).

        `find_unused_parameters`: some parameters never reach the outputs (a projection head
        without the contrastive loss); DDP then looks for them at every step.
        """
        if self.sync_batchnorm:
            forward = nn.SyncBatchNorm.convert_sync_batchnorm(forward)
        self.broadcast_buffers(forward)  # identical start, whatever each rank built
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers: SyncBatchNorm keeps them identical, or sync_buffers averages them after each step
        buffers = {"forward_sync_buffers": False} if _HAS_FORWARD_SYNC_BUFFERS else {"broadcast_buffers": False}
        return nn.parallel.DistributedDataParallel(
            forward, device_ids=device_ids, find_unused_parameters=find_unused_parameters, **buffers
        )

    def contrastive_generator(self, seed: int) -> torch.Generator:
        """Anchor and negative sampling, and ClassMix (semi): per rank, apart from the shared data generator."""
        return torch.Generator().manual_seed(seed + _CONTRASTIVE_SEED_OFFSET * (self.rank + 1))

    def dropout_seed(self, seed: int) -> int:
        return seed + self.rank

    # -- per step -------------------------------------------------------------------------

    def shard(
        self, batch: Sequence[tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """This rank's contiguous share of the global batch and of its ``labels [B, h, w]``;
        remembers the global batch's labeled-pixel count for ``sparse_cross_entropy``."""
        self._global_labeled = int((labels != IGNORE_INDEX).sum())
        share = len(batch) // self.world_size
        start = self.rank * share
        return list(batch[start : start + share]), labels[start : start + share]

    def sparse_cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This share's part of the global batch's mean CE, scaled so that DDP's gradient
        average gives the gradient of that mean. ``logits [b, C, h, w]``, ``labels [b, h, w]``;
        a share without labeled pixels contributes 0 (and still joins the gradient exchange)."""
        summed = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return summed * (self.world_size / max(self._global_labeled, 1))

    def share_pushes(self, vectors: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory-bank pushes of every rank, ``[N, P]`` and ``[N]``, in rank order."""
        gathered = self._gather_rows(torch.cat([vectors.float(), labels.to(vectors.device).float()[:, None]], dim=1))
        return gathered[:, :-1], gathered[:, -1].round().to(torch.int64)

    @torch.no_grad()
    def sync_buffers(self, model: nn.Module) -> None:
        """Average the floating-point buffers (BatchNorm running statistics) across the ranks
        after a step. Under SyncBatchNorm they are identical already."""
        if self.sync_batchnorm:
            return
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.detach().reshape(-1).to(self.device, torch.float64) for b in buffers])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for buffer in buffers:
            count = buffer.numel()
            buffer.copy_(flat[offset : offset + count].view_as(buffer))
            offset += count

    @torch.no_grad()
    def broadcast_buffers(self, model: nn.Module) -> None:
        for buffer in model.buffers():  # on the rank's device already (the model was moved there)
            dist.broadcast(buffer.data, src=0)

    def global_mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks (the logged loss of the global batch)."""
        total = value.detach().float().reshape(1).to(self.device)
        dist.all_reduce(total)
        return float(total) / self.world_size

    def barrier(self) -> None:
        dist.barrier()

    # -- checks ---------------------------------------------------------------------------

    @torch.no_grad()
    def check_consistent(self, tensors: Iterable[torch.Tensor]) -> None:
        """Raise if the ranks hold different values: two float64 checksums (a sum and a
        position-weighted sum) of every tensor, compared across the ranks."""
        sums = []
        for tensor in tensors:
            flat = tensor.detach().reshape(-1).to(self.device, torch.float64)
            weights = torch.arange(1, flat.numel() + 1, device=self.device, dtype=torch.float64) / max(flat.numel(), 1)
            sums.append(torch.stack([flat.sum(), (flat * weights).sum()]))
        local = torch.cat(sums) if sums else torch.zeros(2, device=self.device, dtype=torch.float64)
        everyone = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(everyone, local)
        differing = [rank for rank, other in enumerate(everyone) if not torch.equal(other, everyone[0])]
        if differing:
            raise RuntimeError(
                f"ranks {differing} hold other weights, buffers or memory-bank vectors than rank 0 after training: "
                "the processes diverged (a bug; please report it)."
            )

    def _gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``[n_r, K]`` on each rank -> ``[sum n_r, K]`` on every rank, in rank order."""
        rows = rows.to(self.device)
        count = torch.tensor([rows.shape[0]], device=self.device, dtype=torch.int64)
        counts = [torch.empty_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
        padded = rows.new_zeros(max(sizes), rows.shape[1])
        padded[: rows.shape[0]] = rows
        everyone = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(everyone, padded)
        return torch.cat([part[:size] for part, size in zip(everyone, sizes)])
