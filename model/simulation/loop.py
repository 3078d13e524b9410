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

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import CAMVID_CLASSES, IGNORE_INDEX
from ..mc_dropout import mc_moments
from ..network import BayesianSegmenter, ModelConfig, build_model
from ..superpixels import REFERENCE_AREA, seeds_superpixels, to_uint8_rgb
from ..training import TrainConfig, train
from .config import SimulationConfig, differences
from .metrics import class_iou, diversity, mean_iou
from .pool import LabelPool
from .queries import cold_start, query_pixels, query_regions
from .report import write_metrics
from .splits import evaluate, load_split, same_shape_batches
from .state import RunState, load_state, save_state

# Purposes of the seeded random streams (see derive_seed).
INIT, TRAIN, MC, QUERY, COLD_START = range(5)


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
    """The pretrained initialization, identical for every cycle of a seed (seeded head init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, 0, INIT))
        model = build_model(
            ModelConfig(
                num_classes=config.num_classes,
                arch=config.arch,
                encoder=config.encoder,
                encoder_weights=config.encoder_weights,
                dropout=config.dropout,
                projection_dim=0,  # paper 000's network: sparse CE only, no contrastive head
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


def _train_cycle(model, pool: LabelPool, config: SimulationConfig, cycle: int, progress: bool):
    samples = [
        (pool.images[i], pool.dense_labels(i) if config.supervised else pool.sparse_labels(i, cycle))
        for i in range(len(pool))
    ]
    crop = config.crop or (max(im.shape[-2] for im in pool.images), max(im.shape[-1] for im in pool.images))
    train_config = TrainConfig(
        steps=config.steps,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        crop_size=crop,
        augment=config.augment,
        seed=derive_seed(config.seed, cycle, TRAIN),
        contrastive_weight=0.0,  # the simulation compares acquisitions under paper 000's training
        ema_decay=None,
    )
    bar = tqdm(
        total=train_config.total_steps(len(samples)), desc=f"train cycle {cycle}", leave=False, disable=not progress
    )

    def report(step: int, total: int, loss: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update(0)

    try:
        return train(model, samples, train_config, report)
    finally:
        bar.close()


@contextlib.contextmanager
def _torch_threads_kept():
    """Keep torch's CPU thread count across numba code (the BalEnt kernel).

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


def _query(model, pool: LabelPool, config: SimulationConfig, cycle: int, progress: bool) -> None:
    """Reveal the acquisition's queries, made by this cycle's model, for cycle + 1."""
    with _torch_threads_kept():
        _query_all(model, pool, config, cycle, progress)


def _query_all(model, pool: LabelPool, config: SimulationConfig, cycle: int, progress: bool) -> None:
    device = next(model.parameters()).device
    mc_generator = torch.Generator().manual_seed(derive_seed(config.seed, cycle, MC))
    query_generator = torch.Generator().manual_seed(derive_seed(config.seed, cycle, QUERY))
    batches = list(same_shape_batches(pool.images, config.eval_batch_size))
    for batch in tqdm(batches, desc=f"query ({config.acquisition})", leave=False, disable=not progress):
        stacked = torch.stack([pool.images[i] for i in batch]).to(device)  # [B, 3, H, W]
        for index, moments in zip(batch, mc_moments(model, stacked, config.mc_samples, generator=mc_generator)):
            if config.mode == "pixel":
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


def _row(cycle: int, pool: LabelPool, config: SimulationConfig, confusion, timings: dict, losses) -> dict:
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
        cold_start(pool, config.mode, config.pixels if config.mode == "pixel" else config.regions, generator)

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
    bar = tqdm(total=total, initial=completed, desc=config.run_name, disable=not progress)
    with contextlib.closing(bar):
        for cycle in range(completed + 1, total + 1):
            started = time.perf_counter()
            if config.warm_start and model is None and cycle > 1:
                model = _resume_model(folder, cycle - 1, device)
            if model is None or not config.warm_start:
                model = _fresh_model(config, device)
            trained = _train_cycle(model, pool, config, cycle, progress)
            train_seconds = time.perf_counter() - started
            confusion = evaluate(model, eval_images, eval_truth, config.eval_batch_size, progress)
            eval_seconds = time.perf_counter() - started - train_seconds
            if not config.supervised:
                _query(model, pool, config, cycle, progress)
            acquire_seconds = time.perf_counter() - started - train_seconds - eval_seconds
            timings = {
                "train_seconds": train_seconds,
                "eval_seconds": eval_seconds,
                "acquire_seconds": acquire_seconds,
                "wall_seconds": time.perf_counter() - started,
            }
            rows.append(_row(cycle, pool, config, confusion, timings, trained.losses))
            save_checkpoint(
                folder / "model.pt",
                model,
                class_names=class_names(config.num_classes),
                version=cycle,
                extra={"run": config.run_name, "cycle": cycle},
            )
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


def _resume_model(folder: Path, cycle: int, device: torch.device) -> BayesianSegmenter:
    """Warm start after a resume: the saved model must be the one of the last finished cycle."""
    model, meta = load_checkpoint(folder / "model.pt", map_location=device)
    saved = meta.get("extra", {}).get("cycle") if isinstance(meta, dict) else None
    if saved != cycle:
        raise ConfigMismatch(
            f"{folder / 'model.pt'} is from cycle {saved}, not {cycle}: a warm-started run cannot resume "
            "from it. Delete the run folder to start over."
        )
    return model.to(device)
