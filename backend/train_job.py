"""``segal-train MANIFEST``: one training run as a process of its own.

The backend writes a run folder (``<MODEL_DIR>/<project>/runs/<run>/``) and starts this
command on it: alone (``SEGAL_TRAIN_PROCS=1``) or once per rank under ``torchrun``. It reads
the manifest, trains, and rank 0 writes the model to serve with its memory bank
(``output.pt``, a ``model.checkpoint`` file) and its progress as JSON lines
(``progress.jsonl``). The backend follows that file, and publishes the checkpoint when the
command exits 0. On a cluster it runs the same way on a manifest in a shared ``MODEL_DIR``
(README, "Training as a job").

The run folder::

    manifest.json        what to train: classes, ModelConfig, TrainConfig, device, samples,
                         the checkpoint to continue from (warm start: weights and memory bank)
    samples/NNNNNN.png   the image at the working resolution (8-bit RGB)
    samples/NNNNNN.labels.png   its sparse labels, 8-bit: class index, 255 = unlabeled
    progress.jsonl       {"event": "started" | "step" | "finished" | "failed", ...}, one per line
    output.pt            the served network (EMA teacher, or the student) and its memory bank
    train.log            the command's stdout and stderr (written by the launcher)
    rank-<r>.pid         each rank's process id, for the stale-run cleanup of a restarted backend

The TrainConfig travels as ``dataclasses.asdict`` and comes back as ``TrainConfig(**fields)``,
so every field of it reaches ``train()`` without this module naming it.

Imports only ``model`` and the standard library (no web framework, no Label Studio client):
each rank pays the import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.data import IGNORE_INDEX
from model.distributed import Distributed
from model.process import prepare_process
from model.network import BayesianSegmenter, ModelConfig, build_model
from model.training import TrainConfig, train

from .launcher import die_with_parent

log = logging.getLogger("segal-train")

MANIFEST_FORMAT = "segal-train-manifest"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "progress.jsonl"
OUTPUT_NAME = "output.pt"
ERROR_PREFIX = "segal-train: error: "  # the line the backend shows in /health when the run fails
EXIT_FAILED = 1
EXIT_BAD_MANIFEST = 2


class ManifestError(ValueError):
    """The manifest cannot be trained from; the message says what is wrong."""


@dataclass
class TrainingManifest:
    folder: Path  # the run folder; every path in the manifest is relative to it
    classes: list[str]
    model_config: ModelConfig
    train_config: TrainConfig
    device: str
    samples: list[dict]  # {"image": path, "labels": path}
    init_checkpoint: Path | None
    output: Path
    progress: Path


# -- writing (the backend) --------------------------------------------------------------


def write_manifest(
    folder: Path,
    *,
    classes: list[str] | tuple[str, ...],
    model_config: ModelConfig,
    train_config: TrainConfig,
    samples: list[tuple[torch.Tensor, torch.Tensor]],
    device: str,
    init_checkpoint: Path | None = None,
) -> Path:
    """Write the run folder's manifest and samples (``samples``: ``[(image [3, H, W] in [0, 1],
    labels [H, W])]``); returns the manifest's path. `init_checkpoint`: the checkpoint to
    continue from (weights and memory bank), referenced by a path relative to the folder."""
    folder = Path(folder)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    entries = []
    for index, (image, labels) in enumerate(samples):
        image_path, labels_path = f"samples/{index:06d}.png", f"samples/{index:06d}.labels.png"
        rgb = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # [H, W, 3]
        _write_png(folder / image_path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        _write_png(folder / labels_path, labels.to(torch.uint8).numpy())  # IGNORE_INDEX is 255
        entries.append({"image": image_path, "labels": labels_path})
    init = None if init_checkpoint is None else os.path.relpath(Path(init_checkpoint), folder)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "classes": list(classes),
        "model_config": model_config.to_dict(),
        "train_config": dataclasses.asdict(train_config),
        "device": device,
        "init_checkpoint": init,
        "samples": entries,
        "output": OUTPUT_NAME,
        "progress": PROGRESS_NAME,
    }
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=1))
    return path


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])  # fast: samples live minutes
    if not ok:
        raise OSError(f"could not encode {path.name} as PNG")
    path.write_bytes(encoded.tobytes())


# -- reading (this command) -------------------------------------------------------------


def train_config_from(fields: dict) -> TrainConfig:
    """``TrainConfig(**fields)``, lists back to tuples (JSON has no tuples, e.g. crop_size)."""
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ManifestError(
            f"train_config has fields this segal does not know: {unknown}. Run segal-train from the same "
            "install as the backend that wrote the manifest."
        )
    try:
        return TrainConfig(**{key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()})
    except (TypeError, ValueError) as error:
        raise ManifestError(f"train_config: {error}") from None


def read_manifest(path: str | Path) -> TrainingManifest:
    path = Path(path).resolve()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"No manifest at {path}.") from None
    except (OSError, ValueError) as error:
        raise ManifestError(f"{path} is not a readable JSON manifest: {error}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path} is not a segal training manifest (no \"format\": \"{MANIFEST_FORMAT}\").")
    if data.get("format_version") != MANIFEST_VERSION:
        raise ManifestError(
            f"{path} has manifest version {data.get('format_version')!r}; this segal reads {MANIFEST_VERSION}."
        )
    missing = [key for key in ("classes", "model_config", "train_config", "samples") if key not in data]
    if missing:
        raise ManifestError(f"{path} lacks {missing}.")
    folder = path.parent
    try:
        model_config = ModelConfig.from_dict(data["model_config"])
    except (TypeError, ValueError) as error:
        raise ManifestError(f"model_config: {error}") from None
    if len(data["classes"]) != model_config.num_classes:
        raise ManifestError(f"{len(data['classes'])} classes for a model_config of {model_config.num_classes}.")
    if not data["samples"]:
        raise ManifestError(f"{path} lists no samples.")
    init = data.get("init_checkpoint")
    return TrainingManifest(
        folder=folder,
        classes=[str(name) for name in data["classes"]],
        model_config=model_config,
        train_config=train_config_from(data["train_config"]),
        device=str(data.get("device") or "cpu"),
        samples=list(data["samples"]),
        init_checkpoint=None if init is None else (folder / init).resolve(),
        output=folder / data.get("output", OUTPUT_NAME),
        progress=folder / data.get("progress", PROGRESS_NAME),
    )


def load_samples(manifest: TrainingManifest) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(image [3, H, W] float in [0, 1], labels [H, W] int64)]`` as the manifest lists them."""
    samples = []
    for entry in manifest.samples:
        image_path, labels_path = manifest.folder / entry["image"], manifest.folder / entry["labels"]
        bgr = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        labels = cv2.imread(str(labels_path), cv2.IMREAD_UNCHANGED)
        if bgr is None or labels is None:
            raise ManifestError(f"cannot read {image_path.name} or {labels_path.name} in {manifest.folder}.")
        if labels.shape != bgr.shape[:2]:
            raise ManifestError(f"{labels_path.name} is {labels.shape}, its image {bgr.shape[:2]}.")
        image = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float().div_(255.0)
        samples.append((image, torch.from_numpy(labels.astype(np.int64))))
    return samples


def continue_from(model: BayesianSegmenter, previous: BayesianSegmenter) -> None:
    """Start from the previous version's weights; one from before the projection head leaves
    the new head at its initialization."""
    missing, unexpected = model.load_state_dict(previous.state_dict(), strict=False)
    new_head = all(name.startswith("projection.") for name in missing)
    if unexpected or not new_head:
        raise ValueError(
            f"The served model does not fit the configured network (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was SEGAL_ARCH or SEGAL_ENCODER changed? Move the old model-v*.pt files away."
        )


class ProgressLog:
    """JSON lines appended to the run's progress file; one write per line, flushed at once."""

    def __init__(self, path: Path):
        self.path = path

    def emit(self, event: str, **fields) -> None:
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n"
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(line)


def _failure_message(error: BaseException) -> str:
    if isinstance(error, torch.cuda.OutOfMemoryError) or isinstance(error, MemoryError):
        return (
            f"out of memory ({type(error).__name__}): lower SEGAL_TRAIN_BATCH_SIZE or SEGAL_TRAIN_CROP, "
            "or train on a larger device"
        )
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:500]}"


def report_failure(message: str, rank: int, progress_log: ProgressLog) -> None:
    """In an ``except`` block of a job process: the traceback to the log, the one line the
    backend shows (``ERROR_PREFIX``), and a "failed" progress record."""
    traceback.print_exc()
    print(f"{ERROR_PREFIX}{message}", file=sys.stderr, flush=True)
    try:
        progress_log.emit("failed", error=message, rank=rank)
    except OSError:
        pass


def run(manifest_path: str | Path, device: str | None = None) -> int:
    """Train one manifest (one rank of it under torchrun); returns the exit status."""
    rank = int(os.environ.get("RANK", "0"))
    folder = Path(manifest_path).resolve().parent
    try:
        (folder / f"rank-{rank}.pid").write_text(str(os.getpid()))
    except OSError:
        pass  # only the stale-run cleanup needs it
    try:
        manifest = read_manifest(manifest_path)
    except ManifestError as error:
        print(f"{ERROR_PREFIX}{error}", file=sys.stderr, flush=True)
        return EXIT_BAD_MANIFEST
    progress_log = ProgressLog(manifest.progress)
    distributed = None
    try:
        distributed = Distributed.from_environment(device or manifest.device)
        main_rank = distributed is None or distributed.is_main
        run_device = distributed.device if distributed is not None else torch.device(device or manifest.device)
        result = _train(manifest, run_device, distributed, progress_log if main_rank else None)
    except Exception as error:  # noqa: BLE001 - every failure becomes a line the backend can show
        message = _failure_message(error)
        report_failure(f"rank {rank}: {message}" if rank else message, rank, progress_log)
        return EXIT_FAILED
    finally:
        if distributed is not None:
            distributed.close()
    log.info("rank %d: done (%s)", rank, result)
    return 0


def _train(manifest: TrainingManifest, device: torch.device, distributed: Distributed | None, progress_log) -> str:
    config = manifest.train_config
    samples = load_samples(manifest)
    torch.manual_seed(config.seed)  # the same initialization on every rank, and run after run
    model = build_model(manifest.model_config)
    memory_bank = None
    if manifest.init_checkpoint is not None:
        previous, meta = load_checkpoint(manifest.init_checkpoint)
        continue_from(model, previous)
        memory_bank = meta["memory_bank"]
        del previous
    model.to(device)
    world_size = distributed.world_size if distributed is not None else 1
    total = config.total_steps(sum(bool((labels != IGNORE_INDEX).any()) for _, labels in samples))
    if progress_log is not None:
        progress_log.emit(
            "started", total=total, processes=world_size, device=str(device), images=len(samples), nice=os.nice(0)
        )
    started = time.monotonic()

    def progress(step: int, total: int, loss: float) -> None:
        if progress_log is None:
            return
        per_step = (time.monotonic() - started) / max(step, 1)
        progress_log.emit(
            "step", step=step, total=total, loss=loss,
            seconds_per_step=round(per_step, 3), eta_seconds=round(per_step * (total - step), 1),
        )  # fmt: skip

    result = train(model, samples, config, progress, memory_bank=memory_bank, distributed=distributed)
    served = result.teacher if result.teacher is not None else model.eval()
    if distributed is not None:  # DDP keeps the ranks identical; say so if they are not
        tensors = [*model.state_dict().values(), *served.state_dict().values()]
        if result.memory_bank is not None:
            tensors.append(result.memory_bank.features)
        distributed.check_consistent(tensors)
    if progress_log is None:
        return "not rank 0: nothing to write"
    extra = {
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "nonfinite_steps": result.nonfinite_steps,
        "final_loss": result.losses[-1] if result.losses else None,
        "final_contrastive_loss": result.contrastive_losses[-1] if result.contrastive_losses else None,
        # semi-supervised runs: the last step's pseudo-label loss (None without the option)
        "final_pseudo_loss": result.pseudo_losses[-1] if result.pseudo_losses else None,
        "served": "ema_teacher" if result.teacher is not None else "student",
        # labeled-pixel accuracy of both (TrainConfig.teacher_tolerance decides which is served)
        "teacher_accuracy": None if result.teacher_accuracy is None else round(result.teacher_accuracy, 4),
        "student_accuracy": None if result.student_accuracy is None else round(result.student_accuracy, 4),
        "teacher_rejected": result.teacher_rejected,
        "seconds": round(result.seconds, 1),
        "precision": result.precision,
        "processes": world_size,
    }
    save_checkpoint(
        manifest.output, served, class_names=manifest.classes, version=0, extra=extra, memory_bank=result.memory_bank
    )
    progress_log.emit("finished", output=manifest.output.name, **extra)
    return f"{result.steps} steps in {result.seconds:.1f} s, wrote {manifest.output}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="segal-train",
        description="Train one segal run folder (the backend writes it; README 'Training as a job'). Alone, or one "
        "process per rank: torchrun --nproc-per-node N -m backend.train_job MANIFEST.",
    )
    parser.add_argument("manifest", help="the run's manifest.json")
    parser.add_argument("--device", help="override the manifest's device (cpu, cuda); under torchrun each rank "
                        "takes cuda:LOCAL_RANK")  # fmt: skip
    args = parser.parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank started by torchrun: gone with torchrun, even after a SIGKILL
        die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare_process()
    sys.exit(run(args.manifest, args.device))


if __name__ == "__main__":
    main()
