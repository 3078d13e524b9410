"""``train_benchmark.py cycle``: time to a new version through a real Label Studio.

For each seed: a fresh project in a Label Studio 1.23.2 on loopback (tests/ls_harness.py) with
the 8 labeled images as annotated tasks (their points as KeyPointLabels, their regions as
BrushLabels, the way an annotator's answers arrive) and POOL_TASKS unlabeled CamVid tasks;
then one training request to the backend's trainer, exactly as "Start training" makes it, with
the settings given (the defaults unless told). Prints the wall time of every phase until the
version is published, and the mIoU of the published model on CamVid val.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from train_benchmark import CAMVID, REPO, append, labeled_set, settings_from, val_miou

sys.path.insert(0, str(REPO / "tests"))

from ls_harness import BRUSH_NAME, IMAGE_NAME, KEYPOINT_NAME, LabelStudioServer, camvid_label_config, import_images  # noqa: E402

from backend.config import Settings  # noqa: E402
from backend.convert import brush_region, keypoint_region  # noqa: E402
from backend.service import ActiveLearningBackend  # noqa: E402
from model.data import CAMVID_CLASSES  # noqa: E402

POOL_TASKS = 32  # what the score scale is fitted on (backend.pool.CALIBRATION_TASKS)
POLL_SECONDS = 0.2


def annotation(item) -> list[dict]:
    height, width = item.image.shape[-2:]
    result = []
    for row, col, cls in item.points:
        result.append(keypoint_region(row, col, label=CAMVID_CLASSES[cls], score=1.0, from_name=KEYPOINT_NAME,
                                      to_name=IMAGE_NAME, width=width, height=height))  # fmt: skip
    for mask, cls in item.regions:
        result.append(brush_region(mask, label=CAMVID_CLASSES[cls], score=1.0, from_name=BRUSH_NAME, to_name=IMAGE_NAME))
    for region in result:
        region.pop("score", None)  # an annotation, not a prediction
    return result


def follow(backend: ActiveLearningBackend, project: str) -> tuple[dict, dict[str, float]]:
    """Poll the trainer's state until the run ends; seconds spent in each phase."""
    phases: dict[str, float] = {}
    last_phase, last_time = None, time.perf_counter()
    while True:
        state = backend.trainer.states().get(project, {})
        now = time.perf_counter()
        if last_phase is not None:
            phases[last_phase] = phases.get(last_phase, 0.0) + now - last_time
        last_phase, last_time = state.get("phase") or "starting", now
        if state.get("status") in ("succeeded", "failed"):
            return state, phases
        time.sleep(POLL_SECONDS)


def run_cycle(args) -> None:
    chosen = settings_from(args)
    items = labeled_set()
    labeled_paths = {item.path.name for item in items}
    pool_paths = [p for p in sorted((CAMVID / "train").glob("*.png")) if p.name not in labeled_paths][::7][:POOL_TASKS]
    with tempfile.TemporaryDirectory(prefix="segal-train-bench-") as work, LabelStudioServer() as ls:
        client = ls.client()
        for seed in args.seeds:
            project = client.projects.create(title=f"cycle seed {seed}", label_config=camvid_label_config())
            task_ids = import_images(ls, project.id, [item.path for item in items])
            for task_id, item in zip(task_ids, items):
                client.annotations.create(id=task_id, result=annotation(item), was_cancelled=False)
            import_images(ls, project.id, pool_paths)
            env = {
                "LABEL_STUDIO_URL": ls.url,
                "LABEL_STUDIO_API_KEY": ls.token,
                "MODEL_DIR": str(Path(work) / f"models-{seed}"),
                "SEGAL_SCORE_POOL": "off",  # the pool job after training is not part of "time to a version"
                "SEGAL_SEED": str(seed),
                "SEGAL_TRAIN_PRECISION": chosen.train_precision,
                "SEGAL_TRAIN_CHANNELS_LAST": "on" if chosen.train_channels_last else "off",
                "SEGAL_EMA_DECAY": str(chosen.ema_decay or 0),
            }
            env["SEGAL_TRAIN_STEPS"] = str(chosen.train_steps or "auto")
            backend = ActiveLearningBackend(Settings.from_env(env))
            pid = str(project.id)
            warm_seconds = _wait_for_warm_up(backend)
            start = time.perf_counter()
            backend.trainer.request(pid, "benchmark")
            state, phases = follow(backend, pid)
            seconds = time.perf_counter() - start
            if state["status"] != "succeeded":
                raise RuntimeError(f"training of seed {seed} failed: {state.get('error')}")
            served = backend.store.current(pid)
            append(args.out, {
                "mode": "cycle", "seed": seed, "seconds_to_version": round(seconds, 1),
                "phases": {name: round(value, 1) for name, value in phases.items()},
                "steps": served.extra.get("steps"), "precision": chosen.train_precision,
                "trained_precision": served.extra.get("precision"), "ema_decay": chosen.ema_decay,
                "served": served.extra.get("served"), "teacher_accuracy": served.extra.get("teacher_accuracy"),
                "student_accuracy": served.extra.get("student_accuracy"),
                "nonfinite_steps": served.extra.get("nonfinite_steps"),
                "channels_last": chosen.train_channels_last, "images": state.get("images"),
                "labeled_pixels": state.get("labeled_pixels"), "umap_warm_up_seconds": warm_seconds,
                "projector_fit_seconds": served.extra.get("projector_fit_seconds"),
                "val_miou": round(val_miou(served.model), 4),
            })


def _wait_for_warm_up(backend: ActiveLearningBackend, timeout: float = 300.0) -> float:
    """The server's start-up work (UMAP compile) runs before the first training is asked for,
    as it does for a server that has been up a minute; returns how long it took."""
    from model.regions import umap_is_warm

    start = time.perf_counter()
    while not umap_is_warm() and time.perf_counter() - start < timeout:
        time.sleep(POLL_SECONDS)
    return round(time.perf_counter() - start, 1)
