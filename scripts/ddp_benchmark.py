"""Training step time in 1 and 2 processes on CPU, through the backend's launcher.

    ./run.sh bench-ddp              # or: .venv/bin/python scripts/ddp_benchmark.py --steps 8

Each configuration is one real run folder trained by ``backend.runs.run_training``, as the
backend trains (``python -m backend.train_job``, or ``torchrun --standalone`` with Gloo for
2 processes): the default network (DeepLabV3+ / EfficientNet-Lite0, packaged weights,
projection head and contrastive loss), real CamVid frames with sparse labels, the same global
batch in every configuration. A step's time is the gap between two progress records; the
figure is the median over the steps after the first (which pays one-off allocations).

Configurations: 1 process with every core as torch threads, 1 process with 1 thread, and
2 processes with ``cores / 2`` threads each (1 on a 2-core machine). Efficiency is the
speed-up over the 1-process run divided by the 2 processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.runs import run_training  # noqa: E402
from model.data import CAMVID_CLASSES, SegmentationFolder, random_sparse_labels  # noqa: E402
from model.network import ModelConfig  # noqa: E402
from model.training import TrainConfig  # noqa: E402


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _step_seconds(records: list[dict]) -> float:
    times = [record["time"] for record in records if record["event"] == "step"]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--camvid", default=os.environ.get("CAMVID_DIR", str(REPO.parent / "shared/datasets/camvid")))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="the global batch, split across the processes")
    parser.add_argument("--crop", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()

    folder = SegmentationFolder(args.camvid, "train")
    generator = torch.Generator().manual_seed(0)
    picks = torch.linspace(0, len(folder) - 1, args.images).round().int().tolist()
    samples = [(image, random_sparse_labels(dense, 50, generator)) for image, dense in (folder[i] for i in picks)]
    model_config = ModelConfig(num_classes=len(CAMVID_CLASSES))
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, crop_size=tuple(args.crop), seed=0)
    cores = _cores()
    configurations = [("1 process", 1, cores), ("1 process", 1, 1), ("2 processes", 2, max(1, cores // 2))]
    print(
        f"CPU, {cores} cores, torch {torch.__version__}; global batch {args.batch_size}, crop {args.crop[0]}x"
        f"{args.crop[1]}, {args.steps} steps, {args.images} CamVid frames, precision {train_config.precision}"
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="segal-ddp-bench-") as scratch:
        for name, procs, threads in configurations:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            records: list[dict] = []
            started = time.monotonic()
            run_training(
                Path(scratch) / f"{procs}-{threads}", classes=list(CAMVID_CLASSES), model_config=model_config,
                train_config=train_config, samples=samples, device="cpu", init_checkpoint=None, procs=procs,
                on_record=records.append,
            )  # fmt: skip
            results[(procs, threads)] = seconds = _step_seconds(records)
            print(
                f"{name}, {threads} thread(s) each, {args.batch_size // procs} image(s) per process: "
                f"{seconds:.2f} s/step (run with start-up {time.monotonic() - started:.0f} s)",
                flush=True,
            )
    two = results[(2, max(1, cores // 2))]
    for threads in sorted({cores, 1}, reverse=True):
        one = results[(1, threads)]
        print(
            f"speed-up of 2 processes over 1 process with {threads} thread(s): {one / two:.2f}x, "
            f"efficiency {one / two / 2:.2f}"
        )


if __name__ == "__main__":
    main()
