"""Paper 000's Algorithm 1 with a ground-truth oracle: train, evaluate, query, repeat; resumable.

Cycle k (1-based) of a run:

1. build the network from the pretrained initialization (the same initialization every
   cycle, seeded: cycles differ only by their labels; ``warm_start`` continues from the
   previous cycle's weights instead) and train it on the labels revealed for cycles <= k;
2. evaluate it on the evaluation split (mIoU and per-class IoU, void ignored);
3. run MC dropout on every pool image and reveal the acquisition's queries for cycle k + 1;
4. save the model, then the state (atomically), then metrics.csv / metrics.json.

Cycle 1 trains on the cold start (n random pixels or R random regions per image), so after
K cycles the pool holds the cold start plus K - 1 rounds of queries in the training labels,
and the K-th round of queries waits in the state for a longer run. Each row records the
labels a cycle trained on and the diversity of the queries added for it (cycle 1: the
random cold start, the same for every acquisition of a seed).

Rerunning the same command resumes after the last finished cycle; ``cycles`` may be raised
to extend a finished run. A run folder made with other settings is refused, with the
differences listed. Random streams are seeded from (seed, cycle, purpose), never carried
over, so a resumed run repeats exactly what an uninterrupted one does (on CPU).

The supervised reference (acquisition ``"supervised"``) is one cycle on the dense labels
of the same pool, with the same network and training schedule.

Paper 004's Algorithm 1 (``selection="umap-kmeans"``, region mode) changes three steps:

1. the network has the 128-d projection head and trains with CE + 0.1 InfoNCE against a
   per-class memory bank, with an EMA teacher (decay 0.99; ``model.training``). The bank
   starts empty with every fresh initialization; ``warm_start`` continues both the teacher's
   weights and the bank;
2. the teacher is evaluated (and saved, with the bank), not the student;
3. after training, a ``RegionProjector`` (UMAP) is fitted on the bank, and each pool image
   gets R regions from ``acquire_regions`` (the teacher's region embeddings, KMeans into R
   clusters, the largest summed acquisition score per cluster). A bank with fewer vectors
   than UMAP needs (``MIN_FIT_VECTORS``) falls back to the rank selection for that cycle;
   the ``projector_vectors`` column is 0 then (the fit's time: ``projector_seconds``).

Rank runs keep paper 000's training (no projection head, no contrastive loss, no teacher),
so their figures do not change with this option. ``training="contrastive"`` gives a rank run
steps 1 and 2 (not 3): random regions trained and served as umap-kmeans runs are, so that
the two differ by the selection alone.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numba
import numpy as np
import torch
from tqdm.auto import tqdm

from ..acquisition import needs_mean_entropy, score_moments, select_pixels
from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import CAMVID_CLASSES, IGNORE_INDEX
from ..contrastive import MemoryBank
from ..mc_dropout import mc_moments, mc_moments_and_embeddings
from ..network import BayesianSegmenter, ModelConfig, build_model
from ..regions import MIN_FIT_VECTORS, RegionProjector
from ..superpixels import REFERENCE_AREA, seeds_superpixels, to_uint8_rgb
from ..training import TrainConfig, train
from .config import SimulationConfig, differences
from .metrics import class_iou, diversity, mean_iou
from .pool import LabelPool
from .queries import (
    cold_start, query_clustered_regions, query_grid_pixels, query_pixels, query_regions, task_value,
)
from .report import write_metrics
from .splits import evaluate, load_split, same_shape_batches
from .state import RunState, load_state, save_state

# Purposes of the seeded random streams (see derive_seed).
INIT, TRAIN, MC, QUERY, COLD_START, PROJECTOR = range(6)

# Paper 004's training for the umap-kmeans selection (section 3.2, Algorithm 1 steps 12, 14)
PROJECTION_DIM = 128
CONTRASTIVE_WEIGHT = 0.1  # L_total = L_CE + 0.1 * L_contra
EMA_DECAY = 0.99


class ConfigMismatch(RuntimeError):
    """The output folder holds a run made with other settings."""


@dataclass
class RunResult:
    folder: Path
    rows: list[dict]
    computed: list[int] = field(default_factory=list)  # the cycles this call ran (not resumed ones)


def derive_seed(seed: int, cycle: int, purpose: int) -> int:
    """An independent 63-bit seed for one purpose of one cycle of a run."""
    return int(np.random.SeedSequence([seed, cycle, purpose]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def class_names(num_classes: int) -> list[str]:
    return list(CAMVID_CLASSES) if num_classes == len(CAMVID_CLASSES) else [f"class_{i}" for i in range(num_classes)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fresh_model(config: SimulationConfig, device: torch.device) -> BayesianSegmenter:
    """The pretrained initialization, identical for every cycle of a seed (seeded head init).

    Rank runs build paper 000's network (no projection head), exactly as before the
    umap-kmeans selection existed; umap-kmeans runs add paper 004's 128-d projection head.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, 0, INIT))
        model = build_model(
            ModelConfig(
                num_classes=config.num_classes,
                arch=config.arch,
                encoder=config.encoder,
                encoder_weights=config.encoder_weights,
                dropout=config.dropout,
                # paper 000's network (sparse CE only, no contrastive head) unless paper 004's
                projection_dim=PROJECTION_DIM if config.contrastive else 0,
            )
        )
    return model.to(device)


def _superpixels(images: list[torch.Tensor], per_image: int, progress: bool) -> list[np.ndarray]:
    """SEEDS on every pool image; `per_image` is converted to the 480x360 setting that gives it."""
    segments = []
    for image in tqdm(images, desc="superpixels", leave=False, disable=not progress):
        height, width = image.shape[-2:]
        segments.append(seeds_superpixels(to_uint8_rgb(image), round(per_image * REFERENCE_AREA / (height * width))))
    return segments


def _prepare_folder(config: SimulationConfig, folder: Path) -> RunState | None:
    state = load_state(folder)
    if state is None:
        return None
    changed = differences(state.config, config)
    if changed:
        raise ConfigMismatch(
            f"Refusing to resume {folder}: it was made with other settings ("
            + "; ".join(changed)
            + "). Rerun with the same options to resume it, or pass another --out (or delete the folder) "
            "to start over."
        )
    return state


def _train_cycle(
    model, pool: LabelPool, config: SimulationConfig, cycle: int, progress: bool, memory_bank: MemoryBank | None = None
):
    """Train `model` in place on the labels of `cycle`; `memory_bank` (umap-kmeans) continues a bank."""
    samples = [
        (pool.images[i], pool.dense_labels(i) if config.supervised else pool.sparse_labels(i, cycle))
        for i in range(len(pool))
    ]
    if config.tasks_per_cycle is not None and not config.supervised:  # the labeled tasks, as the backend trains on
        samples = [(image, labels) for image, labels in samples if bool((labels != IGNORE_INDEX).any())]
    crop = config.crop or (max(im.shape[-2] for im in pool.images), max(im.shape[-1] for im in pool.images))
    steps = config.supervised_steps if config.supervised and config.supervised_steps is not None else config.steps
    train_config = TrainConfig(
        steps=steps,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        crop_size=crop,
        augment=config.augment,
        seed=derive_seed(config.seed, cycle, TRAIN),
        # rank: acquisitions compared under paper 000's training; umap-kmeans: paper 004's
        contrastive_weight=CONTRASTIVE_WEIGHT if config.contrastive else 0.0,
        # semi: paper 003's pseudo labels come from the same EMA teacher (alpha 0.99)
        ema_decay=EMA_DECAY if config.teacher else None,
        # the teacher is the one evaluated and querying (paper 004), however it compares with its
        # student: the backend's teacher check would change the method under study
        teacher_tolerance=None,
        semi_supervised=config.semi_supervised,
        head_at_labeled_cells=config.head_cells == "labeled",
    )
    bar = tqdm(
        total=train_config.total_steps(len(samples)), desc=f"train cycle {cycle}", leave=False, disable=not progress
    )

    def report(step: int, total: int, loss: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update(0)

    try:
        return train(model, samples, train_config, report, memory_bank=memory_bank)
    finally:
        bar.close()


@contextlib.contextmanager
def _torch_threads_kept():
    """Keep torch's CPU thread count across numba code (the BalEnt kernel, UMAP).

    numba's OpenMP threading layer sets the process-wide OpenMP thread count to numba's own
    (every core) when it launches a parallel loop, and torch reads that same count. Without
    this, ``--threads 1`` would hold only until the first BalEnt query, and a run's figures
    would depend on whether BalEnt ran earlier in the process (a resumed run would not repeat
    an uninterrupted one: float sums change with the thread count).
    """
    threads = torch.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _query(
    model, pool: LabelPool, config: SimulationConfig, cycle: int, progress: bool, projector: RegionProjector | None
) -> None:
    """Reveal the acquisition's queries, made by this cycle's model, for cycle + 1.

    With a `projector` (umap-kmeans), by paper 004's clustering; without, by rank.
    """
    with _torch_threads_kept():
        if projector is not None:
            _query_clustered(model, pool, config, cycle, progress, projector)
        elif config.tasks_per_cycle is not None:
            _query_tasks(model, pool, config, cycle, progress)
        else:
            _query_all(model, pool, config, cycle, progress)


def _fit_projector(memory_bank: MemoryBank | None, config: SimulationConfig, cycle: int) -> RegionProjector | None:
    """UMAP on the memory bank (Algorithm 1, step 15); None when the bank is too small to fit.

    The bank fills with correctly classified labeled pixels during training; a very short
    training on a few labels can leave fewer than ``MIN_FIT_VECTORS``, and then this cycle's
    queries fall back to the rank selection (the row's ``projector_vectors`` says 0).
    """
    if memory_bank is None or len(memory_bank) < MIN_FIT_VECTORS:
        return None
    vectors, _ = memory_bank.vectors()  # [N, P]
    with _torch_threads_kept():  # UMAP runs numba code
        # numpy's RandomState (UMAP, KMeans) takes seeds below 2**32
        return RegionProjector.fit(
            vectors.cpu().numpy(), seed=derive_seed(config.seed, cycle, PROJECTOR) % 2**32,
            layout_epochs=config.umap_epochs or None,
        )  # fmt: skip


def _query_clustered(
    model, pool: LabelPool, config: SimulationConfig, cycle: int, progress: bool, projector: RegionProjector
) -> None:
    """Paper 004, Algorithm 1 steps 2-6: per pool image, R regions by UMAP + KMeans + max score."""
    device = next(model.parameters()).device
    mc_generator = torch.Generator().manual_seed(derive_seed(config.seed, cycle, MC))
    query_generator = torch.Generator().manual_seed(derive_seed(config.seed, cycle, QUERY))
    desc = f"query ({config.acquisition}, umap-kmeans)"
    with_mean_entropy = needs_mean_entropy(config.acquisition)
    for index in tqdm(range(len(pool)), desc=desc, leave=False, disable=not progress):
        image = pool.images[index]  # [3, H, W]
        moments, embeddings = mc_moments_and_embeddings(
            model, image.to(device), config.mc_samples, generator=mc_generator, mean_entropy=with_mean_entropy,
            logit_precision=config.mc_precision,
        )  # [C, H, W], [P, h, w]
        regions = query_clustered_regions(
            config.acquisition,
            moments,
            embeddings,
            model.padded_size(tuple(image.shape[-2:])),
            projector,
            config.regions,
            pool.segments[index],
            pool.region_candidates(index),
            query_generator,
            seed=int(torch.randint(0, 2**31 - 1, (1,), generator=query_generator)),
        )
        pool.reveal_regions(index, regions, cycle + 1)


def _query_all(model, pool: LabelPool, config: SimulationConfig, cycle: int, progress: bool) -> None:
    device = next(model.parameters()).device
    mc_generator = torch.Generator().manual_seed(derive_seed(config.seed, cycle, MC))
    query_generator = torch.Generator().manual_seed(derive_seed(config.seed, cycle, QUERY))
    batches = list(same_shape_batches(pool.images, config.eval_batch_size))
    with_mean_entropy = needs_mean_entropy(config.acquisition)
    on_grid = config.mode == "pixel" and config.pixel_grid == "decoder"
    for batch in tqdm(batches, desc=f"query ({config.acquisition})", leave=False, disable=not progress):
        stacked = torch.stack([pool.images[i] for i in batch]).to(device)  # [B, 3, H, W]
        batch_moments = mc_moments(
            model,
            stacked,
            config.mc_samples,
            generator=mc_generator,
            mean_entropy=with_mean_entropy,
            image_resolution=not on_grid,  # the decoder grid's moments are scored as they are
            logit_precision=config.mc_precision,
        )
        padded_size = model.padded_size(tuple(stacked.shape[-2:]))
        for index, moments in zip(batch, batch_moments):
            if on_grid:
                coords = query_grid_pixels(
                    config.acquisition, moments, padded_size, config.pixels, pool.exclude(index), query_generator
                )
                pool.reveal_pixels(index, coords, cycle + 1)
            elif config.mode == "pixel":
                coords = query_pixels(config.acquisition, moments, config.pixels, pool.exclude(index), query_generator)
                pool.reveal_pixels(index, coords, cycle + 1)
            else:
                regions = query_regions(
                    config.acquisition,
                    moments,
                    config.regions,
                    pool.segments[index],
                    pool.region_candidates(index),
                    query_generator,
                )
                pool.reveal_regions(index, regions, cycle + 1)


def _query_tasks(model, pool: LabelPool, config: SimulationConfig, cycle: int, progress: bool) -> None:
    """The product's loop: the acquisition's n pixels in each of the ``tasks_per_cycle`` images
    not labeled yet that come first by ``task_order`` (ties: the lower index)."""
    device = next(model.parameters()).device
    mc_generator = torch.Generator().manual_seed(derive_seed(config.seed, cycle, MC))
    query_generator = torch.Generator().manual_seed(derive_seed(config.seed, cycle, QUERY))
    open_tasks = [index for index in range(len(pool)) if not pool.revealed_at[index].any()]
    if config.task_order == "random":  # no model needed to choose; only the chosen are scored
        draw = torch.randperm(len(open_tasks), generator=query_generator)[: config.tasks_per_cycle]
        open_tasks = sorted(open_tasks[i] for i in draw.tolist())
    with_mean_entropy = needs_mean_entropy(config.acquisition)
    queried: list[tuple[float, int, np.ndarray]] = []  # (value, image, pixels [k, 2])
    batches = list(same_shape_batches([pool.images[i] for i in open_tasks], config.eval_batch_size))
    for batch in tqdm(batches, desc=f"query tasks ({config.task_order})", leave=False, disable=not progress):
        indices = [open_tasks[i] for i in batch]
        stacked = torch.stack([pool.images[i] for i in indices]).to(device)  # [B, 3, H, W]
        batch_moments = mc_moments(
            model, stacked, config.mc_samples, generator=mc_generator, mean_entropy=with_mean_entropy,
            logit_precision=config.mc_precision,
        )  # fmt: skip
        for index, moments in zip(indices, batch_moments):
            exclude = torch.from_numpy(pool.exclude(index)).to(moments.mean.device)  # [H, W]
            scores = score_moments(
                config.acquisition, moments, budget=config.pixels, candidates=~exclude, generator=query_generator
            )  # [H, W]
            best = select_pixels(scores, config.pixels, exclude)  # [k, 2]
            value = 0.0 if config.task_order == "random" else task_value(
                config.task_order, config.acquisition, moments, scores, exclude
            )  # fmt: skip
            queried.append((value, index, best.cpu().numpy()))
    # most informative first; a NaN value (nothing left to ask) last
    queried.sort(key=lambda item: (not np.isfinite(item[0]), -item[0] if np.isfinite(item[0]) else 0.0, item[1]))
    for _, index, pixels in queried[: config.tasks_per_cycle]:
        pool.reveal_pixels(index, pixels, cycle + 1)


def _row(
    cycle: int, pool: LabelPool, config: SimulationConfig, confusion, timings: dict, losses, projector_vectors: int
) -> dict:
    labeled = (
        pool.labeled_count(cycle) if not config.supervised else sum(int((t != IGNORE_INDEX).sum()) for t in pool.truth)
    )
    iou = class_iou(confusion)
    queried = pool.queries(cycle) if not config.supervised else []
    pair_distance, unique = diversity(queried) if queried else (float("nan"), float("nan"))
    per_image_queries = float(np.mean([len(points) for points, _ in queried])) if queried else float("nan")
    tail = losses[-max(1, len(losses) // 10) :] if losses else []
    row = {
        "cycle": cycle,
        "labeled_pixels": labeled,
        "labeled_per_image": labeled / len(pool),
        "labeled_percent": 100.0 * labeled / pool.total_pixels,
        "queried_per_image": per_image_queries,
        "miou": mean_iou(confusion),
        # in pixels of the unscaled image, so that profiles at different scales compare
        "pair_distance": pair_distance / config.scale,
        "unique_labels": unique,
        "train_loss": float(np.mean(tail)) if tail else float("nan"),
        # memory-bank vectors the UMAP of this cycle's queries was fitted on; 0: none fitted (rank)
        "projector_vectors": projector_vectors if not config.supervised else float("nan"),
        **timings,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    row.update({f"iou_{name}": float(value) for name, value in zip(class_names(config.num_classes), iou)})
    return row


def _print(message: str) -> None:
    tqdm.write(message)  # above the progress bars, not through them
    sys.stdout.flush()  # a nohup log shows each cycle as it ends


def run_simulation(config: SimulationConfig, out: str | Path, *, progress: bool = True, log=_print) -> RunResult:
    """Run (or resume) one simulated active-learning run into ``<out>/<config.run_name>/``."""
    folder = Path(out) / config.run_name
    state = _prepare_folder(config, folder)
    total = 1 if config.supervised else config.cycles
    completed = state.completed if state else 0
    rows = list(state.metrics) if state else []
    result = RunResult(folder, rows)

    pool_images, pool_truth, names = load_split(config, config.train_split, config.train_images)
    eval_images, eval_truth, _ = load_split(config, config.eval_split, config.eval_images)
    if state is not None and state.names != names:
        raise ConfigMismatch(f"Refusing to resume {folder}: the pool's image files changed since it was made.")
    folder.mkdir(parents=True, exist_ok=True)
    segments = None
    if config.mode == "region" and not config.supervised:
        segments = (
            state.segments if state and state.segments else _superpixels(pool_images, config.superpixels, progress)
        )
    pool = LabelPool(pool_images, pool_truth, names, segments)
    if state is not None:
        pool.revealed_at = state.revealed_at
    elif not config.supervised:
        generator = torch.Generator().manual_seed(derive_seed(config.seed, 0, COLD_START))
        budget = config.pixels if config.mode == "pixel" else config.regions
        cold_start(pool, config.mode, budget, generator, tasks=config.tasks_per_cycle)

    info = {
        "pool_images": len(pool),
        "eval_images": len(eval_images),
        "image_size": list(pool_images[0].shape[-2:]),
        "pool_pixels": pool.total_pixels,
        "superpixels_per_image": float(np.mean([s.max() + 1 for s in segments])) if segments else None,
    }
    if completed >= total:
        log(f"{config.run_name}: all {total} cycles are done already (raise --cycles to extend it).")
        write_metrics(folder, config, rows, class_names(config.num_classes), info)
        return result

    device = resolve_device(config.device)
    model = None
    memory_bank = None  # umap-kmeans with warm_start: the bank the next cycle continues
    bar = tqdm(total=total, initial=completed, desc=config.run_name, disable=not progress)
    with contextlib.closing(bar):
        for cycle in range(completed + 1, total + 1):
            started = time.perf_counter()
            if config.warm_start and model is None and cycle > 1:
                # after a resume the saved bank continues, as it would have without the interruption
                model, memory_bank = _resume_model(folder, cycle - 1, device)
            if model is None or not config.warm_start:
                model, memory_bank = _fresh_model(config, device), None  # None: train starts an empty bank
            trained = _train_cycle(model, pool, config, cycle, progress, memory_bank)
            # paper 004's training: the EMA teacher is evaluated, queries and is saved (Algorithm 1, step 2)
            served = trained.teacher if config.serves_teacher else model
            train_seconds = time.perf_counter() - started
            confusion = evaluate(served, eval_images, eval_truth, config.eval_batch_size, progress)
            eval_seconds = time.perf_counter() - started - train_seconds
            projector = _fit_projector(trained.memory_bank, config, cycle) if config.clustered else None
            projector_seconds = time.perf_counter() - started - train_seconds - eval_seconds
            if config.clustered and projector is None:
                log(
                    f"{config.run_name} cycle {cycle}: the memory bank holds {len(trained.memory_bank)} "
                    f"vectors, fewer than the {MIN_FIT_VECTORS} UMAP needs; this cycle's regions are ranked "
                    "by summed score instead (train longer or on more labels to avoid it)."
                )
            if not config.supervised:
                _query(served, pool, config, cycle, progress, projector)
            acquire_seconds = time.perf_counter() - started - train_seconds - eval_seconds - projector_seconds
            timings = {
                "train_seconds": train_seconds,
                "eval_seconds": eval_seconds,
                "projector_seconds": projector_seconds,
                "acquire_seconds": acquire_seconds,
                "wall_seconds": time.perf_counter() - started,
            }
            projector_vectors = projector.num_vectors if projector is not None else 0
            rows.append(_row(cycle, pool, config, confusion, timings, trained.losses, projector_vectors))
            save_checkpoint(
                folder / "model.pt",
                served,
                class_names=class_names(config.num_classes),
                version=cycle,
                extra={"run": config.run_name, "cycle": cycle},
                memory_bank=trained.memory_bank,
            )
            if config.warm_start:
                # the next cycle trains on from the weights that were evaluated and saved (umap-kmeans:
                # the teacher's, made trainable again; a resume loads the same weights and bank)
                model, memory_bank = served.requires_grad_(True), trained.memory_bank
            save_state(folder, RunState(config.to_dict(), cycle, rows, names, pool.revealed_at, segments))
            write_metrics(folder, config, rows, class_names(config.num_classes), info)
            result.computed.append(cycle)
            bar.update(1)
            row = rows[-1]
            log(
                f"{config.run_name} cycle {cycle}/{total}: {row['labeled_per_image']:.0f} labeled px/image "
                f"({row['labeled_percent']:.3g}%), mIoU {row['miou']:.3f}, {row['wall_seconds']:.0f} s"
            )
    return result


def _resume_model(folder: Path, cycle: int, device: torch.device) -> tuple[BayesianSegmenter, MemoryBank | None]:
    """Warm start after a resume: the saved model (and its memory bank, umap-kmeans) must be
    the ones of the last finished cycle."""
    model, meta = load_checkpoint(folder / "model.pt", map_location=device)
    saved = meta.get("extra", {}).get("cycle") if isinstance(meta, dict) else None
    if saved != cycle:
        raise ConfigMismatch(
            f"{folder / 'model.pt'} is from cycle {saved}, not {cycle}: a warm-started run cannot resume "
            "from it. Delete the run folder to start over."
        )
    return model.to(device), meta["memory_bank"]
