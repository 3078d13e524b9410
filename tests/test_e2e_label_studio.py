"""The product end to end: a real Label Studio 1.23.2, our backend as a real server, CamVid.

Label Studio asks for predictions, an annotator (this test, with CamVid's ground truth)
labels the proposed points and one proposed region per task, "Start training" trains a new
version, and the next predictions come from it and avoid what is labeled. A headless
Chromium screenshot of the labeling page shows the predictions drawn.
"""

from __future__ import annotations

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

NUM_TASKS = 6
POINTS = 5
REGIONS = 2
TRAINING_TIMEOUT = 600


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
    }
    log_path = artifacts_dir / "segal-backend.log"
    process = start_service(
        [str(Path(sys.executable).parent / "segal-backend")],
        log_path,
        f"http://127.0.0.1:{port}/health",
        env=env,
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


def test_label_studio_round_trip(label_studio, backend_server, camvid_dir, artifacts_dir):
    client = label_studio.client()
    project = client.projects.create(title="segal e2e", label_config=camvid_label_config())
    names = sorted(p.name for p in (camvid_dir / "train").glob("*.png"))[::60][:NUM_TASKS]
    task_ids = import_images(label_studio, project.id, [camvid_dir / "train" / n for n in names])
    assert len(task_ids) == NUM_TASKS
    ml = client.ml.create(project=project.id, url=backend_server, title="segal", is_interactive=False)

    # 1. predictions before any training: random points and regions, stored with scores
    client.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})
    first = {t: wait_until(lambda t=t: predictions_of(client, t), 120, f"predictions of task {t}")[0] for t in task_ids}
    for prediction in first.values():
        assert prediction["model_version"] == "segal-v0-untrained"
        kinds = [r["type"] for r in prediction["result"]]
        assert kinds.count("keypointlabels") == POINTS and kinds.count("brushlabels") == REGIONS
        assert all(isinstance(r.get("score"), float) for r in prediction["result"])
        assert prediction["score"] is not None

    # 2. the annotator labels the proposed points and one region per task, from the ground truth
    labeled = {}
    for task_id, name in zip(task_ids, names):
        result, labeled[task_id] = annotate_from_ground_truth(first[task_id], ground_truth(camvid_dir, name))
        assert result, "every task should get some labels"
        client.annotations.create(id=task_id, result=result, was_cancelled=False)

    # 3. Start training (Label Studio sends START_TRAINING to /webhook); wait for version 1
    client.ml.train(id=ml.id)

    def trained():
        status = httpx.get(f"{backend_server}/health", timeout=10).json()["projects"].get(str(project.id), {})
        training = status.get("training") or {}
        if training.get("status") == "failed":
            pytest.fail(f"training failed: {training.get('error')}")
        return training if training.get("status") == "succeeded" else None

    training = wait_until(trained, TRAINING_TIMEOUT, "the training run", interval=2)
    assert training["version"] == 1 and training["images"] == NUM_TASKS
    assert training["labeled_pixels"] >= NUM_TASKS * 2
    # contrastive training filled the memory bank and the region projector was fitted on it
    served = httpx.get(f"{backend_server}/health", timeout=10).json()["projects"][str(project.id)]
    assert served["memory_bank_vectors"] > 0 and served["region_selection"] == "umap-kmeans", served

    # 4. new predictions come from the new version and avoid what is labeled
    client.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})
    for task_id in task_ids:
        prediction = wait_until(
            lambda t=task_id: predictions_of(client, t, "segal-v1"), 120, f"segal-v1 predictions of task {task_id}"
        )[0]
        height, width = labeled[task_id].shape
        points = [r for r in prediction["result"] if r["type"] == "keypointlabels"]
        assert len(points) == POINTS
        for point in points:
            row, col = percent_to_pixel(point["value"]["x"], point["value"]["y"], width, height)
            assert not labeled[task_id][row, col], f"task {task_id}: proposes an already labeled pixel"
        for region in (r for r in prediction["result"] if r["type"] == "brushlabels"):
            mask = brush_mask(region["value"], width, height)
            assert (mask & labeled[task_id]).sum() <= 0.5 * mask.sum(), f"task {task_id}: proposes a labeled region"
        scores = [p["score"] for p in points]
        assert scores == sorted(scores, reverse=True)
        # one superpixel per KMeans cluster, most informative first
        region_scores = [r["score"] for r in prediction["result"] if r["type"] == "brushlabels"]
        assert len(region_scores) == REGIONS and region_scores == sorted(region_scores, reverse=True)

    # 5. what the annotator sees: the labeling page with the predicted regions drawn
    fresh = next(p for p in sorted((camvid_dir / "train").glob("*.png")) if p.name not in names)
    unlabeled = import_images(label_studio, project.id, [fresh])[0]
    client.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": False, "included": [unlabeled]})
    wait_until(lambda: predictions_of(client, unlabeled, "segal-v1"), 120, "predictions of the screenshot task")
    png = screenshot(
        label_studio.labeling_url(project.id, unlabeled),
        artifacts_dir / "labeling-with-predictions.png",
        label_studio.username,
        label_studio.password,
        wait_selector=".konvajs-content canvas",
    )
    image = cv2.imread(str(png))
    assert image is not None and image.std() > 20, "the screenshot is blank"
