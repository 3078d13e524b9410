"""``python -m backend.score_job MANIFEST``: one rank of a sharded pool job.

With more than one process for a project (``SEGAL_TRAIN_PROCS=N``, or one per visible GPU),
the backend's pool job (``backend.pool``) runs here instead of in its own thread: under
``torchrun --standalone --nproc-per-node N``, the launcher of training runs. Each rank loads
the served version from ``MODEL_DIR``, takes the pool tasks whose id is its rank modulo N,
and scores, pushes and supersedes them exactly as the in-process job does (prefetch, batched
pushes, the project's ``model_version``). The ranks share nothing but Label Studio and
``MODEL_DIR``: no gradient or tensor crosses between them, so there is no process group.

The job folder (``<MODEL_DIR>/<project>/scoring/<job>/``)::

    manifest.json     project, version to score with, the backend's settings (no secrets)
    progress.jsonl    {"event": "shard" | "finished" | "failed", "rank": r, done, skipped, ...}
    score.log         the command's output (written by the launcher)
    rank-<r>.pid      each rank's process id, for the clean-up after a backend died

The Label Studio key comes in the environment (``SEGAL_SCORE_API_KEY``), never in a file. A
rank that finds another version served than the manifest's stops: the backend starts a new
job for the new version anyway.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from model.process import prepare_process

from .config import ConfigError, Settings
from .images import ImageFetcher
from .label_config import parse_label_config
from .labelstudio import LabelStudioProject, sdk_client
from .launcher import die_with_parent
from .pool import API_KEY_VARIABLE, PoolScorer, _Job
from .predictor import Predictor
from .store import ModelStore, ServedModel
from .train_job import ERROR_PREFIX, ProgressLog, report_failure

log = logging.getLogger("segal-score")

MODULE = "backend.score_job"
MANIFEST_FORMAT = "segal-score-manifest"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "progress.jsonl"
LOG_NAME = "score.log"
EXIT_FAILED = 1
EXIT_BAD_MANIFEST = 2
SHARD_FIELDS = ("done", "already_current", "skipped", "superseded", "compute_seconds", "image_wait_seconds",
                "api_wait_seconds")  # fmt: skip


def write_manifest(folder: Path, *, project: str, version: int, settings: Settings) -> Path:
    path = Path(folder) / MANIFEST_NAME
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "project": project,
        "version": int(version),
        "settings": settings.snapshot(),
        "progress": PROGRESS_NAME,
    }
    path.write_text(json.dumps(manifest, indent=1))
    return path


def read_manifest(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the scoring manifest {path}: {error}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{path} is not a segal scoring manifest.")
    if data.get("format_version") != MANIFEST_VERSION:
        raise ConfigError(f"{path} is format {data.get('format_version')}; this segal reads {MANIFEST_VERSION}.")
    return data


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far (Linux VmHWM), for /health and the benchmark."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def rank_device(settings: Settings) -> torch.device:
    """The served model's device: under torchrun on CUDA, this rank's GPU (cuda:LOCAL_RANK)."""
    from .service import choose_device

    device = choose_device(settings.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def run(manifest_path: str | Path) -> int:
    """Score this rank's share of the pool; returns the exit status."""
    rank, ranks = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    folder = Path(manifest_path).resolve().parent
    try:
        (folder / f"rank-{rank}.pid").write_text(str(os.getpid()))
    except OSError:
        pass  # only the clean-up after a dead backend needs it
    try:
        manifest = read_manifest(manifest_path)
        settings = Settings.from_snapshot(manifest["settings"], os.environ.get(API_KEY_VARIABLE, ""))
    except (ConfigError, KeyError, TypeError) as error:
        print(f"{ERROR_PREFIX}{error}", file=sys.stderr, flush=True)
        return EXIT_BAD_MANIFEST
    progress = ProgressLog(folder / manifest.get("progress", PROGRESS_NAME))
    try:
        summary = _score(manifest, settings, rank, ranks, progress)
    except Exception as error:  # noqa: BLE001 - every failure becomes a line the backend can show
        report_failure(f"rank {rank}: {type(error).__name__}: {' '.join(str(error).split())[:500]}", rank, progress)
        return EXIT_FAILED
    log.info("rank %d of %d: %s", rank, ranks, summary)
    return 0


def _score(manifest: dict, settings: Settings, rank: int, ranks: int, progress: ProgressLog) -> str:
    project, version = str(manifest["project"]), int(manifest["version"])
    store = ModelStore(settings.model_dir, rank_device(settings))
    served = store.current(project)
    if served.version != version:
        raise RuntimeError(
            f"MODEL_DIR serves segal-v{served.version} for project {project}, the job was for segal-v{version}; "
            "the backend scores the pool again with the new version"
        )

    def client(_project: str):
        return sdk_client(settings.label_studio_url, settings.label_studio_api_key)

    predictor = Predictor(settings, store, ImageFetcher(settings))
    scorer = PoolScorer(settings, store, predictor, {}, client)
    entry = scorer._project(project)
    api = LabelStudioProject(client, project)
    schema = parse_label_config(api.label_config())
    if served.model is not None and served.classes != schema.classes:
        served = ServedModel(None, served.version, served.classes, {})  # as /predict does
    entry.state.version = served.name
    job = None

    def report(event: str = "shard") -> None:
        with scorer._lock:
            fields = {name: getattr(entry.state, name) for name in SHARD_FIELDS}
            reasons = list(entry.state.skipped_reasons)
        progress.emit(event, rank=rank, ranks=ranks, pool_remaining=job.pool_remaining if job else 0,
                      skipped_reasons=reasons, peak_rss_mib=peak_rss_mib(), **fields)  # fmt: skip

    job = _Job(scorer, project, entry, api, served, schema, shard=(rank, ranks), on_progress=report)
    started = time.monotonic()
    job.run()
    report("finished")
    state = entry.state
    return f"{state.done} pushed, {state.already_current} current, {state.skipped} skipped in " \
           f"{time.monotonic() - started:.1f} s"  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="segal-score",
        description="One rank of a sharded pool job (the backend starts it; README 'Several processes and GPUs').",
    )
    parser.add_argument("manifest", help="the job's manifest.json")
    args = parser.parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank started by torchrun: gone with torchrun, even after a SIGKILL
        die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare_process()
    sys.exit(run(args.manifest))


if __name__ == "__main__":
    main()
