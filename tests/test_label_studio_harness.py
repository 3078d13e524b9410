"""The Label Studio test harness end to end: a real Label Studio 1.23.2, real CamVid images,
a real headless Chromium. If this fails, the backend's e2e tests cannot be trusted either."""

from __future__ import annotations

import cv2
import httpx
import pytest

from ls_harness import (
    BRUSH_NAME,
    IMAGE_NAME,
    KEYPOINT_NAME,
    LABELING_CANVAS,
    POLYGON_NAME,
    camvid_label_config,
    import_images,
    locate_image,
    screenshot,
)
from model.data import CAMVID_CLASSES

pytestmark = pytest.mark.e2e

IMAGES = ["0001TP_006690.png", "0001TP_006720.png"]


def test_project_import_download_and_labeling_screenshot(label_studio, camvid_dir, artifacts_dir):
    client = label_studio.client()
    project = client.projects.create(title="Harness check", label_config=camvid_label_config())
    parsed = client.projects.get(id=project.id).parsed_label_config
    for name, tag in ((KEYPOINT_NAME, "KeyPointLabels"), (BRUSH_NAME, "BrushLabels"), (POLYGON_NAME, "PolygonLabels")):
        assert parsed[name]["type"] == tag and parsed[name]["to_name"] == [IMAGE_NAME], parsed[name]
        assert parsed[name]["labels"] == list(CAMVID_CLASSES), parsed[name]["labels"]
    paths = [camvid_dir / "train" / name for name in IMAGES]

    task_ids = import_images(label_studio, project.id, paths)

    tasks = {task.id: task for task in client.tasks.list(project=project.id)}
    assert sorted(tasks) == sorted(task_ids)
    for task_id, path in zip(task_ids, paths):
        url = tasks[task_id].data["image"]
        assert url.startswith("/data/upload/") and url.endswith(path.name), url
        # The file needs the token (a backend downloads it the same way) and comes back as sent.
        assert httpx.get(label_studio.absolute(url), timeout=30).status_code == 401
        assert label_studio.download(url) == path.read_bytes()

    shot = screenshot(
        label_studio.labeling_url(project.id, task_ids[0]),
        artifacts_dir / "label-studio-labeling.png",
        label_studio.username,
        label_studio.password,
        wait_selector=LABELING_CANVAS,
    )

    pixels = cv2.imread(str(shot))
    assert pixels is not None and pixels.shape == (1000, 1600, 3), None if pixels is None else pixels.shape
    assert pixels.std() > 20, f"{shot} looks blank (std {pixels.std():.1f})"
    score, (x, y, width, height) = locate_image(shot, paths[0])
    assert score > 0.8, f"the CamVid photo is not visible in {shot} (best match {score:.2f})"
    assert width > 480, f"the photo is drawn {width} px wide, smaller than the image itself"
