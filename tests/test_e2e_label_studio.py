"""The product end to end: a real Label Studio 1.23.2, our backend as a real server, CamVid.

The backend runs with basic auth, as a careful user runs it. Connecting it scores the whole
project (cold start); an annotator (this test, with CamVid's ground truth) labels the proposed
points and one proposed region on some tasks, and Label Studio's webhook (to which the backend
gave its credentials) counts each annotation; "Start training" trains a new version, and with
no further click every unlabeled task then holds one prediction of it, and Label Studio's own
task list, ordered by prediction score, follows the backend's ranking. A headless Chromium
screenshot shows that Data Manager, and the labeling page with the predictions drawn.
"""

from __future__ import annotations

import base64
import os
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from backend.convert import brush_mask, percent_to_pixel
from ls_harness import (
    BRUSH_NAME,
    KEYPOINT_NAME,
    REPO,
    camvid_label_config,
    free_port,
    import_images,
    screenshot,
    start_service,
)
from model.data import CAMVID_CLASSES, CAMVID_VOID

pytestmark = pytest.mark.e2e

NUM_TASKS = 10
ANNOTATED = 5  # tasks the annotator labels; the other ones stay in the pool
POINTS = 5
REGIONS = 2
TRAINING_TIMEOUT = 600
BASIC_AUTH = ("segal-e2e", "e2e-password")


def wait_until(condition, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def backend_server(label_studio, tmp_path_factory, artifacts_dir):
    """Our backend, started the way users start it (the console script), pointed at Label Studio."""
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "MODEL_DIR": str(tmp_path_factory.mktemp("models")),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "SEGAL_POINTS_PER_TASK": str(POINTS),
        "SEGAL_REGIONS_PER_TASK": str(REGIONS),
        "SEGAL_MC_SAMPLES": "10",
        "SEGAL_TRAIN_STEPS": "12",
        "SEGAL_TRAIN_BATCH_SIZE": "2",
        "SEGAL_TRAIN_CROP": "256",
        "BASIC_AUTH_USER": BASIC_AUTH[0],
        "BASIC_AUTH_PASS": BASIC_AUTH[1],
    }
    log_path = artifacts_dir / "segal-backend.log"
    process = start_service(
        [str(Path(sys.executable).parent / "segal-backend")],
        log_path,
        f"http://127.0.0.1:{port}/health",
        env=env,
        headers={"Authorization": "Basic " + base64.b64encode(":".join(BASIC_AUTH).encode()).decode()},
        cwd=REPO,
        timeout=180,
        name="segal-backend",
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


def predictions_of(client, task_id: int, version: str | None = None) -> list[dict]:
    found = [p.model_dump() for p in client.predictions.list(task=task_id)]
    return [p for p in found if version is None or p["model_version"] == version]


def ground_truth(camvid_dir: Path, name: str) -> np.ndarray:
    return cv2.imread(str(camvid_dir / "trainannot" / name), cv2.IMREAD_UNCHANGED)


def annotate_from_ground_truth(prediction: dict, truth: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """Label the proposed points and the first proposed region with the true class."""
    height, width = truth.shape
    labeled = np.zeros_like(truth, dtype=bool)
    result = []
    for region in prediction["result"]:
        if region["type"] == "keypointlabels":
            row, col = percent_to_pixel(region["value"]["x"], region["value"]["y"], width, height)
            if truth[row, col] == CAMVID_VOID:
                continue  # an annotator would delete a point on nothing nameable
            label = CAMVID_CLASSES[truth[row, col]]
            value = {k: region["value"][k] for k in ("x", "y", "width")}
            result.append({**_base(region), "value": {**value, "keypointlabels": [label]}})
            labeled[row, col] = True
    regions = [r for r in prediction["result"] if r["type"] == "brushlabels"]
    if regions:
        region = regions[0]
        mask = brush_mask(region["value"], width, height)
        classes = truth[mask & (truth != CAMVID_VOID)]
        if classes.size:
            label = CAMVID_CLASSES[np.bincount(classes).argmax()]
            value = {"format": "rle", "rle": region["value"]["rle"], "brushlabels": [label]}
            result.append({**_base(region), "value": value})
            labeled |= mask
    return result, labeled


def _base(region: dict) -> dict:
    keys = ("from_name", "to_name", "type", "original_width", "original_height", "image_rotation")
    return {**{k: region[k] for k in keys}, "id": region["id"], "origin": "prediction-changed"}


def health(backend_server: str) -> dict:
    return httpx.get(f"{backend_server}/health", auth=BASIC_AUTH, timeout=10).json()


def project_status(backend_server: str, project_id: int) -> dict:
    return health(backend_server)["projects"].get(str(project_id), {})


def pool_done(backend_server: str, project_id: int, version: str):
    """The finished pool job of `version`, or None while it is not finished; fails on a failed job."""
    pool = project_status(backend_server, project_id).get("pool") or {}
    if pool.get("status") == "failed":
        pytest.fail(f"pool scoring failed: {pool.get('error')}")
    return pool if pool.get("status") == "done" and pool.get("version") == version else None


def tasks_by_prediction_score(label_studio, project_id: int) -> list[dict]:
    """Label Studio's own task list, ordered the way "Order by: Prediction score" orders it."""
    response = httpx.get(
        f"{label_studio.url}/api/tasks",
        params={"project": project_id, "page_size": 100, "query": '{"ordering": ["tasks:predictions_score"]}'},
        headers=label_studio.auth_headers,
        timeout=30,
    )
    response.raise_for_status()
    return response.json()["tasks"]


def test_label_studio_round_trip(label_studio, backend_server, camvid_dir, artifacts_dir):
    client = label_studio.client()
    project = client.projects.create(title="segal e2e", label_config=camvid_label_config())
    names = sorted(p.name for p in (camvid_dir / "train").glob("*.png"))[::30][:NUM_TASKS]
    task_ids = import_images(label_studio, project.id, [camvid_dir / "train" / n for n in names])
    assert len(task_ids) == NUM_TASKS
    # a task whose image cannot be downloaded: the pool job skips it with a reason and goes on
    broken = client.tasks.create(project=project.id, data={"image": "/data/upload/1/not-there.png"}).id
    ml = client.ml.create(
        project=project.id, url=backend_server, title="segal", is_interactive=False,
        auth_method="BASIC_AUTH", basic_auth_user=BASIC_AUTH[0], basic_auth_pass=BASIC_AUTH[1],
    )  # fmt: skip

    # 1. connecting scores the whole project (cold start), with no click and no /predict
    cold = wait_until(lambda: pool_done(backend_server, project.id, "segal-v0-untrained"), 180, "the cold-start pool job")
    assert cold["done"] == NUM_TASKS and cold["skipped"] == 1 and cold["total"] == NUM_TASKS + 1
    assert f"task {broken}" in cold["skipped_reasons"][0], cold["skipped_reasons"]
    assert predictions_of(client, broken) == []
    first = {}
    for task_id in task_ids:
        predictions = predictions_of(client, task_id)
        assert [p["model_version"] for p in predictions] == ["segal-v0-untrained"]
        first[task_id] = predictions[0]
    for prediction in first.values():
        kinds = [r["type"] for r in prediction["result"]]
        assert kinds.count("keypointlabels") == POINTS and kinds.count("brushlabels") == REGIONS
        assert all(0.0 <= r["score"] <= 1.0 for r in prediction["result"])
        assert 0.0 <= prediction["score"] <= 1.0
    # the backend gave Label Studio's webhook its basic-auth credentials
    hooks = [h for h in client.webhooks.list(project=str(project.id)) if h.url == f"{backend_server}/webhook"]
    assert len(hooks) == 1 and (hooks[0].headers or {}).get("Authorization", "").startswith("Basic ")

    # 2. the annotator labels the proposed points and one region on some tasks; every
    # annotation event reaches the backend through the authenticated webhook
    labeled = {}
    for task_id, name in list(zip(task_ids, names))[:ANNOTATED]:
        result, labeled[task_id] = annotate_from_ground_truth(first[task_id], ground_truth(camvid_dir, name))
        assert result, "every task should get some labels"
        client.annotations.create(id=task_id, result=result, was_cancelled=False)
    wait_until(
        lambda: ((project_status(backend_server, project.id).get("training") or {}).get("annotations_since_training")
                 == ANNOTATED),
        30, "the annotation webhooks to be counted",
    )  # fmt: skip
    predict_calls = health(backend_server)["predict_requests"]

    # 3. Start training (Label Studio sends START_TRAINING to /webhook); wait for version 1
    client.ml.train(id=ml.id)

    def trained():
        training = project_status(backend_server, project.id).get("training") or {}
        if training.get("status") == "failed":
            pytest.fail(f"training failed: {training.get('error')}")
        return training if training.get("status") == "succeeded" else None

    training = wait_until(trained, TRAINING_TIMEOUT, "the training run", interval=2)
    assert training["version"] == 1 and training["images"] == ANNOTATED
    assert training["labeled_pixels"] >= ANNOTATED * 2
    assert training["seconds_per_step"] > 0 and training["eta_seconds"] == 0  # the pace /health showed
    # contrastive training filled the memory bank and the region projector was fitted on it
    served = project_status(backend_server, project.id)
    assert served["memory_bank_vectors"] > 0 and served["region_selection"] == "umap-kmeans", served

    # 4. with no further click, one pool job re-scores every unlabeled task with version 1
    pool = wait_until(lambda: pool_done(backend_server, project.id, "segal-v1"), 300, "the segal-v1 pool job")
    unlabeled = task_ids[ANNOTATED:]
    assert pool["done"] == len(unlabeled) and pool["skipped"] == 1 and pool["superseded"] == len(unlabeled)
    assert health(backend_server)["predict_requests"] == predict_calls, "tasks were scored one /predict at a time"
    scores = {}
    for task_id in unlabeled:
        predictions = predictions_of(client, task_id)
        assert [p["model_version"] for p in predictions] == ["segal-v1"], f"task {task_id}: {predictions}"
        scores[task_id] = predictions[0]["score"]
        points = [r for r in predictions[0]["result"] if r["type"] == "keypointlabels"]
        values = [p["acquisition"]["value"] for p in points]
        assert len(points) == POINTS and values == sorted(values, reverse=True)
        # one superpixel per KMeans cluster, most informative first
        regions = [r for r in predictions[0]["result"] if r["type"] == "brushlabels"]
        region_values = [r["acquisition"]["value"] for r in regions]
        assert len(regions) == REGIONS and region_values == sorted(region_values, reverse=True)
    assert client.projects.get(id=project.id).model_version == "segal-v1"
    # Label Studio's task list, ordered by prediction score: the backend's ranking, lowest
    # (most informative) first, every score readable in [0, 1]; unscored tasks sort last
    everything = tasks_by_prediction_score(label_studio, project.id)
    assert len(everything) == NUM_TASKS + 1
    ordered, unscored = everything[: len(scores)], everything[len(scores) :]
    assert all(t["predictions_score"] is None for t in unscored)  # annotated ones and the broken one
    listed = [t["predictions_score"] for t in ordered]
    assert all(score is not None and 0.0 <= score <= 1.0 for score in listed), listed
    assert [t["id"] for t in ordered] == sorted(scores, key=scores.get)
    assert listed == pytest.approx(sorted(scores.values()))
    assert len(set(listed)) > 1, "every task got the same score"

    # what the annotator sees: the Data Manager, ordered by prediction score, column filled
    view = httpx.post(
        f"{label_studio.url}/api/dm/views",
        json={"project": project.id, "data": {
            "title": "most informative first", "ordering": ["tasks:predictions_score"],
            "hiddenColumns": {"explore": HIDDEN_COLUMNS, "labeling": []},
            # the broken task's thumbnail would never load, and the screenshot waits for images
            "filters": {"conjunction": "and", "items": [
                {"filter": "filter:tasks:id", "operator": "not_equal", "type": "Number", "value": broken}]},
        }},
        headers=label_studio.auth_headers, timeout=30,
    )  # fmt: skip
    assert view.status_code == 201, view.text
    png = screenshot(
        f"{label_studio.url}/projects/{project.id}/data?tab={view.json()['id']}",
        artifacts_dir / "data-manager-by-prediction-score.png",
        label_studio.username,
        label_studio.password,
        wait_selector=".dm-table__row-wrapper, [class*='table-row']",
    )
    image = cv2.imread(str(png))
    assert image is not None and image.std() > 10, "the Data Manager screenshot is blank"

    # 5. annotated tasks asked again (Retrieve predictions -> /predict) avoid what is labeled
    client.actions.create(
        id="retrieve_tasks_predictions", project=project.id, selected_items={"all": False, "included": list(labeled)}
    )
    for task_id in labeled:
        prediction = wait_until(
            lambda t=task_id: predictions_of(client, t, "segal-v1"), 120, f"segal-v1 predictions of task {task_id}"
        )[0]
        height, width = labeled[task_id].shape
        for point in (r for r in prediction["result"] if r["type"] == "keypointlabels"):
            row, col = percent_to_pixel(point["value"]["x"], point["value"]["y"], width, height)
            assert not labeled[task_id][row, col], f"task {task_id}: proposes an already labeled pixel"
        for region in (r for r in prediction["result"] if r["type"] == "brushlabels"):
            mask = brush_mask(region["value"], width, height)
            assert (mask & labeled[task_id]).sum() <= 0.5 * mask.sum(), f"task {task_id}: proposes a labeled region"

    # 6. the labeling page of the most informative unlabeled task, its predictions drawn
    png = screenshot(
        label_studio.labeling_url(project.id, ordered[0]["id"]),
        artifacts_dir / "labeling-with-predictions.png",
        label_studio.username,
        label_studio.password,
        wait_selector=".konvajs-content canvas",
    )
    image = cv2.imread(str(png))
    assert image is not None and image.std() > 20, "the screenshot is blank"


# Data Manager columns hidden in the screenshot, so that ID, the image and the score fit
HIDDEN_COLUMNS = [
    f"tasks:{name}"
    for name in (
        "completed_at", "cancelled_annotations", "total_predictions", "annotators", "annotations_results",
        "annotations_ids", "predictions_results", "predictions_model_versions", "file_upload", "storage_filename",
        "created_at", "updated_at", "updated_by", "avg_lead_time", "draft_exists", "inner_id", "comment_count",
        "comment_authors", "unresolved_comment_count", "last_comment_updated_at", "agreement",
    )
]  # fmt: skip
