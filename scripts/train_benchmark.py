"""Training speed and quality on a fixed set of 8 sparsely labeled CamVid images.

    ./run.sh bench-train steps                   step time: today's fp32 vs channels-last vs bf16, one run
    ./run.sh bench-train quality --seeds 0 1 2 [--precision fp32] [--steps 300] [--channels-last off]
    ./run.sh bench-train cycle [--seeds 0 1 2]   time to a new version through a real Label Studio

The labeled set stands for a project's first cycle: 8 CamVid train images spread over the
sequences, each with what a cold-start proposal asks an annotator for under the default
settings (5 keypoints and 3 SEEDS superpixel regions), answered from CamVid's ground truth (a
region takes the majority class of its pixels). Points and regions are drawn with a fixed
generator, so every run and every configuration trains on the same labels.

- ``steps`` times optimizer steps of the backend's default network and batch for today's
  configuration (fp32, contiguous), fp32 channels-last and bf16 autocast channels-last,
  interleaved in rounds in one process, and prints medians and ratios.
- ``quality`` trains with the TrainConfig the backend builds (``backend.trainer.train_config``),
  one run per seed, and prints the mIoU of the served (EMA teacher) model on CamVid val.
- ``cycle`` starts a Label Studio, imports the 8 tasks with their labels as annotations plus
  32 unlabeled tasks, asks the backend's trainer for a run and times each phase to the
  published version (collect, train, projector fit, score calibration, save), then evaluates
  the published model on CamVid val.

Every mode appends one JSON line per run to ``--out`` (default test-artifacts/train-benchmark.jsonl).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CAMVID = Path(os.environ.get("CAMVID_DIR", REPO.parent / "shared" / "datasets" / "camvid"))
LABELED_IMAGES = 8
POINTS_PER_IMAGE = 5  # the backend's SEGAL_POINTS_PER_TASK default
REGIONS_PER_IMAGE = 3  # SEGAL_REGIONS_PER_TASK
LABEL_SEED = 0

from backend.config import Settings  # noqa: E402
from backend.trainer import train_config  # noqa: E402
from model.data import CAMVID_CLASSES, IGNORE_INDEX, SegmentationFolder  # noqa: E402
from model.process import prepare_process  # noqa: E402
from model.network import ModelConfig, build_model  # noqa: E402
from model.simulation.metrics import mean_iou  # noqa: E402
from model.simulation.splits import evaluate  # noqa: E402
from model.superpixels import seeds_superpixels  # noqa: E402
from model.training import train  # noqa: E402


@dataclass
class LabeledImage:
    path: Path
    image: torch.Tensor  # [3, H, W] float in [0, 1]
    points: list[tuple[int, int, int]]  # (row, col, class)
    regions: list[tuple[np.ndarray, int]]  # (mask [H, W] bool, class)

    @property
    def sparse(self) -> torch.Tensor:
        """Sparse labels ``[H, W]``: the regions, then the points over them, IGNORE_INDEX elsewhere."""
        labels = torch.full(self.image.shape[-2:], IGNORE_INDEX, dtype=torch.int64)
        for mask, cls in self.regions:
            labels[torch.from_numpy(mask)] = cls
        for row, col, cls in self.points:
            labels[row, col] = cls
        return labels


def labeled_set(camvid: Path = CAMVID) -> list[LabeledImage]:
    """The fixed 8 images with their points and regions, drawn with generator seed LABEL_SEED."""
    folder = SegmentationFolder(camvid, "train")
    generator = torch.Generator().manual_seed(LABEL_SEED)
    picks = np.linspace(0, len(folder) - 1, LABELED_IMAGES).round().astype(int)
    labeled = []
    for index in picks.tolist():
        image, dense = folder[index]  # [3, H, W], [H, W]
        rgb = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        segments = torch.from_numpy(seeds_superpixels(rgb)).to(torch.int64)  # [H, W]
        annotated = [s for s in range(int(segments.max()) + 1) if (dense[segments == s] != IGNORE_INDEX).any()]
        regions = []
        for pick in torch.randperm(len(annotated), generator=generator)[:REGIONS_PER_IMAGE].tolist():
            inside = segments == annotated[pick]
            classes = dense[inside]
            regions.append((inside.numpy(), int(torch.bincount(classes[classes != IGNORE_INDEX]).argmax())))
        known = torch.nonzero(dense.reshape(-1) != IGNORE_INDEX).squeeze(1)
        width = dense.shape[1]
        points = [
            (flat // width, flat % width, int(dense.view(-1)[flat]))
            for flat in known[torch.randperm(known.numel(), generator=generator)[:POINTS_PER_IMAGE]].tolist()
        ]
        labeled.append(LabeledImage(folder.pairs[index][0], image, points, regions))
    return labeled


def default_model(settings: Settings, seed: int):
    """The network the backend's trainer builds, initialized from `seed` (decoder and heads)."""
    torch.manual_seed(seed)
    return build_model(
        ModelConfig(
            num_classes=len(CAMVID_CLASSES),
            arch=settings.arch,
            encoder=settings.encoder,
            encoder_weights=settings.encoder_weights,
            dropout=settings.dropout,
        )
    )


def val_miou(model, camvid: Path = CAMVID) -> float:
    folder = SegmentationFolder(camvid, "val")
    images, truth = zip(*(folder[i] for i in range(len(folder))))
    return mean_iou(evaluate(model.eval(), list(images), list(truth), batch_size=2))


def settings_from(args) -> Settings:
    """The backend's settings, with what the command line changes (unset: the backend's default)."""
    given = {"SEGAL_TRAIN_PRECISION": args.precision, "SEGAL_TRAIN_CHANNELS_LAST": args.channels_last,
             "SEGAL_TRAIN_STEPS": args.steps, "SEGAL_EMA_DECAY": args.ema_decay}  # fmt: skip
    return Settings.from_env({name: str(value) for name, value in given.items() if value is not None})


def append(out: Path, row: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def run_quality(args) -> None:
    samples = [(item.image, item.sparse) for item in labeled_set()]
    settings = settings_from(args)
    for seed in args.seeds:
        settings = dataclasses.replace(settings, seed=seed)
        config = train_config(settings, samples, warm_start=False)
        if args.lr is not None:
            config = dataclasses.replace(config, lr=args.lr)
        model = default_model(settings, seed)
        result = train(model, samples, config)
        served = result.teacher if result.teacher is not None else model
        append(args.out, {
            "mode": "quality", "seed": seed, "steps": result.steps, "precision": result.precision,
            "channels_last": config.channels_last, "lr": config.lr, "ema_decay": config.ema_decay,
            "train_seconds": round(result.seconds, 1),
            "seconds_per_step": round(result.seconds / max(result.steps, 1), 3),
            "val_miou": round(val_miou(served), 4),
            # the student beside the served teacher: what the teacher's lag costs at this schedule
            "student_val_miou": round(val_miou(model), 4) if result.teacher is not None else None,
            "labeled_pixels": result.num_labeled_pixels, "threads": torch.get_num_threads(),
        })


STEP_CONFIGS = (  # (name, precision, channels_last, projection head at the labeled cells only)
    ("today: fp32, contiguous", "fp32", False, False),
    ("fp32, channels-last", "fp32", True, False),
    ("bf16 autocast, channels-last", "bf16", True, False),
    ("bf16, channels-last, sparse head", "bf16", True, True),
)


def run_steps(args) -> None:
    samples = [(item.image, item.sparse) for item in labeled_set()]
    base = Settings.from_env({})
    model = default_model(base, 0)
    times: dict[str, list[float]] = {name: [] for name, *_ in STEP_CONFIGS}
    for _ in range(args.rounds):
        for name, precision, channels_last, sparse_head in STEP_CONFIGS:
            settings = dataclasses.replace(
                base, train_precision=precision, train_channels_last=channels_last, train_steps=args.steps_per_round
            )
            stamps = []
            config = dataclasses.replace(train_config(settings, samples, warm_start=False), head_at_labeled_cells=sparse_head)
            train(model, samples, config,
                  progress=lambda step, total, loss: stamps.append(time.perf_counter()))
            times[name] += list(np.diff(stamps))  # the first step (warm-up, allocator) is left out
    today = statistics.median(times[STEP_CONFIGS[0][0]])
    print(f"optimizer step, batch {base.train_batch_size}, 360x480 crops, default network, "
          f"{torch.get_num_threads()} threads; median of {len(times[STEP_CONFIGS[0][0]])} steps each, interleaved")
    for name, precision, channels_last, sparse_head in STEP_CONFIGS:
        median = statistics.median(times[name])
        print(f"  {name:<30} {median:6.2f} s/step   {median / today:5.2f}x today")
        append(args.out, {"mode": "steps", "config": name, "precision": precision, "channels_last": channels_last,
                          "head_at_labeled_cells": sparse_head,
                          "seconds_per_step": round(median, 3), "ratio_to_today": round(median / today, 3),
                          "steps_timed": len(times[name])})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("steps", "quality", "cycle"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precision", help="SEGAL_TRAIN_PRECISION (default: the backend's)")
    parser.add_argument("--channels-last", help="SEGAL_TRAIN_CHANNELS_LAST (default: the backend's)")
    parser.add_argument("--steps", help="SEGAL_TRAIN_STEPS: a number or auto (default: the backend's)")
    parser.add_argument("--ema-decay", help="SEGAL_EMA_DECAY (default: the backend's)")
    parser.add_argument("--lr", type=float, help="quality mode: the run's learning rate (default: TrainConfig's)")
    parser.add_argument("--rounds", type=int, default=3, help="steps mode: interleaved rounds")
    parser.add_argument("--steps-per-round", type=int, default=4, help="steps mode: steps per configuration and round")
    parser.add_argument("--out", type=Path, default=REPO / "test-artifacts" / "train-benchmark.jsonl")
    args = parser.parse_args(argv)
    prepare_process()  # as the backend's processes do (model/process.py)
    if not (CAMVID / "train").is_dir():
        sys.exit(f"CamVid not found at {CAMVID}; set CAMVID_DIR")
    if args.mode == "quality":
        run_quality(args)
    elif args.mode == "steps":
        run_steps(args)
    else:
        from train_cycle import run_cycle  # noqa: PLC0415 - needs the Label Studio test harness

        run_cycle(args)


if __name__ == "__main__":
    main()
