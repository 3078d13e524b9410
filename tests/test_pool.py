"""The pool job (backend/pool.py) in process, against the session's real Label Studio.

Cold-start versions need no model forward, so these runs take seconds: they check the job's
bookkeeping (resume after a restart, superseding, the cap, cancellation, a broken task) on
Label Studio's own records. The trained-model path runs in tests/test_e2e_label_studio.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from backend.config import Settings
from backend.service import ActiveLearningBackend
from ls_harness import camvid_label_config, import_images
from model.data import CAMVID_CLASSES
from model.network import ModelConfig, build_model

pytestmark = pytest.mark.e2e

CONFIG = camvid_label_config()


def backend_for(label_studio, model_dir, **env) -> ActiveLearningBackend:
    settings = Settings.from_env(
        {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.token,
            "MODEL_DIR": str(model_dir),
            "SEGAL_SUPERPIXELS": "100",
            **env,
        }
    )
    return ActiveLearningBackend(settings)


def connect(backend: ActiveLearningBackend, project: int, timeout: float = 120) -> dict:
    """What Label Studio's /setup does, then wait for the job it starts."""
    backend.setup(f"{project}.1700000000", CONFIG)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # the connect thread starts the job a moment later
        state = backend.pool.states().get(str(project), {})
        if state.get("jobs") and state.get("status") != "running":
            return state
        backend.pool.wait(str(project), timeout=1)
        time.sleep(0.1)
    raise TimeoutError(f"the pool job of project {project} did not finish in {timeout} s")


def own_predictions(client, task_id: int) -> list[tuple[int, str]]:
    return sorted((p.id, p.model_version) for p in client.predictions.list(task=task_id))


@pytest.fixture()
def project(label_studio, camvid_dir):
    client = label_studio.client()
    created = client.projects.create(title="pool job", label_config=CONFIG)
    paths = sorted((camvid_dir / "train").glob("*.png"))[:4]
    task_ids = import_images(label_studio, created.id, paths)
    return created.id, task_ids


def test_pool_job_scores_resumes_supersedes_and_keeps_other_models(label_studio, project, tmp_path):
    project_id, task_ids = project
    client = label_studio.client()
    # an annotated task is not in the pool; another model's prediction is never touched
    client.annotations.create(id=task_ids[0], result=[], was_cancelled=False)
    client.predictions.create(task=task_ids[1], result=[], score=0.5, model_version="someone-else-v3")
    broken = client.tasks.create(project=project_id, data={"image": "/data/upload/999/missing.png"}).id
    # a thin image (SEEDS once crashed on these) is scored like any other
    thin_path = tmp_path / "thin.png"
    cv2.imwrite(str(thin_path), np.random.default_rng(0).integers(0, 255, (40, 2000, 3), dtype=np.uint8))
    thin = import_images(label_studio, project_id, [thin_path])[0]

    backend = backend_for(label_studio, tmp_path / "models")
    state = connect(backend, project_id)
    assert state["status"] == "done" and state["version"] == "segal-v0-untrained", state
    assert state["total"] == 5 and state["done"] == 4 and state["skipped"] == 1
    assert [v for _, v in own_predictions(client, thin)] == ["segal-v0-untrained"]
    assert f"task {broken}" in state["skipped_reasons"][0] and "missing.png" in state["skipped_reasons"][0]
    assert client.projects.get(id=project_id).model_version == "segal-v0-untrained"
    assert own_predictions(client, task_ids[0]) == []
    versions = [v for _, v in own_predictions(client, task_ids[1])]
    assert sorted(versions) == ["segal-v0-untrained", "someone-else-v3"]
    first_ids = {t: own_predictions(client, t) for t in task_ids[1:]}

    # a restart of the backend resumes: nothing is pushed twice
    restarted = backend_for(label_studio, tmp_path / "models")
    state = connect(restarted, project_id)
    assert state["done"] == 0 and state["already_current"] == 4 and state["skipped"] == 1, state
    assert {t: own_predictions(client, t) for t in task_ids[1:]} == first_ids

    # a duplicate of the current version (e.g. from Retrieve Predictions) is removed, the newest kept
    duplicate = client.predictions.create(task=task_ids[2], result=[], score=0.1, model_version="segal-v0-untrained")
    restarted.pool.start(str(project_id), "test")
    restarted.pool.wait(str(project_id))
    assert own_predictions(client, task_ids[2]) == [(duplicate.id, "segal-v0-untrained")]

    # a new version supersedes this backend's older predictions, and only those
    model = build_model(ModelConfig(num_classes=len(CAMVID_CLASSES), encoder_weights=None))
    restarted.store.publish(str(project_id), model, tuple(CAMVID_CLASSES), extra={})
    restarted.pool.start(str(project_id), "new version")
    restarted.pool.wait(str(project_id))
    state = restarted.pool.states()[str(project_id)]
    assert state["status"] == "done" and state["version"] == "segal-v1" and state["done"] == 4, state
    assert state["superseded"] == 4
    for task_id in task_ids[1:] + [thin]:
        versions = [v for _, v in own_predictions(client, task_id)]
        assert versions.count("segal-v1") == 1 and "segal-v0-untrained" not in versions
    assert "someone-else-v3" in [v for _, v in own_predictions(client, task_ids[1])]
    assert client.projects.get(id=project_id).model_version == "segal-v1"


def test_pool_job_cap_off_and_cancel(label_studio, project, tmp_path):
    project_id, task_ids = project
    client = label_studio.client()
    off = backend_for(label_studio, tmp_path / "off", SEGAL_SCORE_POOL="off")
    off.setup(f"{project_id}.1", CONFIG)
    time.sleep(1)
    assert off.pool.states()[str(project_id)]["status"] == "off"
    assert all(own_predictions(client, t) == [] for t in task_ids)

    capped = backend_for(label_studio, tmp_path / "capped", SEGAL_SCORE_POOL="2")
    state = connect(capped, project_id)
    assert state["total"] == 2 and state["done"] == 2
    assert sum(bool(own_predictions(client, t)) for t in task_ids) == 2

    # a training run starting cancels a job; its end starts one again
    slow = backend_for(label_studio, tmp_path / "slow")
    slow.schemas[str(project_id)] = capped.schemas[str(project_id)]
    started = threading.Event()
    original = slow.predictor.predict_task

    def predict_slowly(*args, **kwargs):
        started.set()
        time.sleep(0.5)
        return original(*args, **kwargs)

    slow.predictor.predict_task = predict_slowly
    slow.pool.start(str(project_id), "test")
    assert started.wait(30)
    slow.pool.training_started(str(project_id))
    slow.pool.wait(str(project_id), timeout=30)
    assert slow.pool.states()[str(project_id)]["status"] == "cancelled"
    slow.pool.training_finished(str(project_id), None)
    slow.pool.wait(str(project_id), timeout=60)
    state = slow.pool.states()[str(project_id)]
    assert state["status"] == "done" and state["jobs"] == 2


def test_pool_job_in_two_processes_scores_every_task_once(label_studio, project, tmp_path):
    """SEGAL_TRAIN_PROCS=2: the job runs as two torchrun ranks (backend.score_job), each scoring
    the tasks whose id is its rank modulo 2, against the same Label Studio."""
    project_id, task_ids = project
    client = label_studio.client()
    models = tmp_path / "models"
    backend = backend_for(label_studio, models, SEGAL_TRAIN_PROCS="2", SEGAL_MC_SAMPLES="4")
    model = build_model(ModelConfig(num_classes=len(CAMVID_CLASSES), encoder_weights=None))
    backend.store.publish(str(project_id), model, tuple(CAMVID_CLASSES), extra={})
    assert backend.pool.scoring_processes() == 2
    state = connect(backend, project_id, timeout=300)
    assert state["status"] == "done" and state["version"] == "segal-v1", state
    assert (state["total"], state["done"], state["skipped"]) == (4, 4, 0), state
    for task_id in task_ids:
        current = [p for p in client.predictions.list(task=task_id) if p.model_version == "segal-v1"]
        assert len(current) == 1 and 0.0 <= current[0].score <= 1.0
    assert client.projects.get(id=project_id).model_version == "segal-v1"
    # both ranks scored their share; the job's folder is gone, its log kept
    project_dir = models / str(project_id)
    log = (project_dir / "last-scoring.log").read_text()
    assert "rank 0 of 2: 2 pushed" in log and "rank 1 of 2: 2 pushed" in log, log[-2000:]
    assert not any((project_dir / "scoring").iterdir())
    # the key never reaches a file
    assert label_studio.token not in log

    # a restart resumes in two processes too: nothing is pushed twice
    restarted = backend_for(label_studio, models, SEGAL_TRAIN_PROCS="2", SEGAL_MC_SAMPLES="4")
    state = connect(restarted, project_id, timeout=300)
    assert state["status"] == "done" and state["done"] == 0 and state["already_current"] == 4, state

    # a training run cancels a sharded job: its processes are stopped, none is left behind
    restarted.store.publish(str(project_id), model, tuple(CAMVID_CLASSES), extra={})
    restarted.pool.start(str(project_id), "new version")
    deadline = time.monotonic() + 120
    while not _scoring_processes(models) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _scoring_processes(models), "the scoring processes never started"
    restarted.pool.training_started(str(project_id))
    restarted.pool.wait(str(project_id), timeout=60)
    assert restarted.pool.states()[str(project_id)]["status"] == "cancelled"
    assert _scoring_processes(models) == []
    assert not any((project_dir / "scoring").iterdir())


def _scoring_processes(models) -> list[int]:
    """Pids of live processes scoring a job under `models` (their command line names the manifest)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if "backend.score_job" in command and str(models) in command and state != "Z":
            found.append(int(proc.name))
    return found


def test_pool_job_waits_while_a_request_computes(label_studio, project, tmp_path):
    """Requests first (backend/gate.py): while a /predict holds the gate the job scores
    nothing; it goes on when the request ends, and counts the pause."""
    project_id, task_ids = project
    client = label_studio.client()
    backend = backend_for(label_studio, tmp_path / "models")
    backend.schemas[str(project_id)] = backend.schema_for(str(project_id), CONFIG)
    with backend.predictor.gate.request():
        backend.pool.start(str(project_id), "test")
        time.sleep(3.0)
        state = backend.pool.states()[str(project_id)]
        assert state["status"] == "running" and state["done"] == 0, state
        assert all(own_predictions(client, t) == [] for t in task_ids)
    backend.pool.wait(str(project_id), timeout=60)
    state = backend.pool.states()[str(project_id)]
    assert state["status"] == "done" and state["done"] == 4, state
    assert state["request_wait_seconds"] > 0.5
