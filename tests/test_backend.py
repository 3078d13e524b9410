"""The backend's protocol app on real CamVid images and a real network (no Label Studio here;
tests/test_e2e_label_studio.py runs the same app against a real one)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from backend.app import create_app
from backend.config import ConfigError, Settings
from backend.convert import brush_mask, percent_to_pixel, polygon_mask
from backend.label_config import LabelConfigError, parse_label_config
from backend.service import ActiveLearningBackend
from backend.train_job import train_config_from
from backend.trainer import train_config
from loopback import RecordingServer, png_bytes
from model.calibration import ScoreScale, squash
from model.data import CAMVID_CLASSES, IGNORE_INDEX, SegmentationFolder
from model.network import ModelConfig, build_model
from model.training import TrainConfig, train

IMAGES = ["0001TP_006690.png", "0001TP_006720.png"]
CLASSES = list(CAMVID_CLASSES)


def label_config(*controls: str) -> str:
    labels = "".join(f'<Label value="{name}"/>' for name in CLASSES)
    body = "".join(f'<{tag} name="{tag.lower()}" toName="image">{labels}</{tag}>' for tag in controls)
    return f'<View><Image name="image" value="$image"/>{body}</View>'


FULL_CONFIG = label_config("KeyPointLabels", "BrushLabels", "PolygonLabels")


def make_settings(tmp_path, **env) -> Settings:
    base = {"MODEL_DIR": str(tmp_path / "models"), "SEGAL_ALLOWED_HOSTS": "127.0.0.1", "SEGAL_SUPERPIXELS": "150"}
    return Settings.from_env({**base, **{k: str(v) for k, v in env.items()}})


def tasks_for(image_server, annotations=None):
    return [
        {"id": index + 1, "data": {"image": f"{image_server}/train/{name}"}, "annotations": (annotations or {}).get(index, [])}
        for index, name in enumerate(IMAGES)
    ]


def test_health_setup_and_config_errors(tmp_path):
    client = create_app(make_settings(tmp_path)).test_client()
    health = client.get("/health")
    assert health.status_code == 200 and health.json["status"] == "UP"
    setup = client.post("/setup", json={"project": "7.1700000000", "schema": FULL_CONFIG})
    assert setup.status_code == 200 and setup.json["model_version"] == "segal-v0-untrained"
    choices = '<View><Image name="i" value="$image"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>'
    refused = client.post("/setup", json={"project": "7.1", "schema": choices})
    assert refused.status_code == 400 and "KeyPointLabels" in refused.json["error"]
    assert client.post("/setup", json={"project": "7.1"}).status_code == 400


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/webhook", "{not json", "JSON object"),
        ("/webhook", {"project": {"id": 1}}, "action"),
        ("/webhook", {"action": "SOMETHING_NEW", "project": {"id": 1}}, "Unknown event"),
        ("/webhook", {"action": "START_TRAINING"}, "project id"),
        ("/predict", {"tasks": "x", "project": "1.1"}, "list of task objects"),
        ("/predict", {"tasks": [], "project": "1.1"}, "label_config"),
        ("/predict", {"tasks": [], "project": "one", "label_config": FULL_CONFIG}, "project id"),
    ],
)
def test_bad_requests_get_a_clear_4xx(tmp_path, path, body, message):
    client = create_app(make_settings(tmp_path)).test_client()
    if isinstance(body, str):
        response = client.post(path, data=body, content_type="application/json")
    else:
        response = client.post(path, json=body)
    assert response.status_code == 400
    assert message in response.json["error"]


def test_events_without_work_are_acknowledged(tmp_path):
    client = create_app(make_settings(tmp_path)).test_client()
    response = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 3}})
    assert response.status_code == 200 and response.json["status"] == "ignored"
    noted = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {}})
    assert noted.status_code == 200 and noted.json["status"] == "noted"  # SEGAL_TRAIN_EVERY is off


def test_basic_auth_guards_every_route(tmp_path):
    client = create_app(make_settings(tmp_path, BASIC_AUTH_USER="ann", BASIC_AUTH_PASS="s3cret")).test_client()
    assert client.get("/health").status_code == 401
    assert client.get("/health", auth=("ann", "wrong")).status_code == 401
    assert client.get("/health", auth=("ann", "s3cret")).status_code == 200


def test_empty_variables_mean_the_defaults():
    """docker/compose.yml passes every setting through, empty when the user set none."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(Settings)]
    env = {"MODEL_DIR": "", "HOST": "", "PORT": "", "SEGAL_ALLOWED_HOSTS": ""}
    env.update({f"SEGAL_{name.upper()}": "" for name in names})
    assert Settings.from_env(env) == Settings.from_env({})


def test_settings_and_label_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="SEGAL_POINTS_PER_TASK"):
        Settings.from_env({"SEGAL_POINTS_PER_TASK": "many"})
    with pytest.raises(ConfigError, match="SEGAL_ACQUISITION"):
        Settings.from_env({"SEGAL_ACQUISITION": "variance"})
    with pytest.raises(ConfigError, match="BASIC_AUTH_PASS"):
        Settings.from_env({"BASIC_AUTH_USER": "ann"})
    with pytest.raises(ConfigError, match="LABEL_STUDIO_URL"):
        Settings.from_env({"LABEL_STUDIO_URL": "localhost:8080"})
    with pytest.raises(ConfigError, match="SEGAL_TRAIN_PRECISION"):
        Settings.from_env({"SEGAL_TRAIN_PRECISION": "half"})
    with pytest.raises(ConfigError, match="SEGAL_TRAIN_CHANNELS_LAST"):
        Settings.from_env({"SEGAL_TRAIN_CHANNELS_LAST": "maybe"})
    with pytest.raises(ConfigError, match="SEGAL_TRAIN_STEPS"):
        Settings.from_env({"SEGAL_TRAIN_STEPS": "lots"})
    defaults = Settings.from_env({})
    # the data-scaled schedule, bf16 where the hardware has it, a teacher that suits a short run
    assert (defaults.train_steps, defaults.train_precision, defaults.train_channels_last) == (None, "auto", True)
    assert defaults.ema_decay == 0.9
    assert Settings.from_env({"SEGAL_TRAIN_STEPS": "300"}).train_steps == 300
    chosen = Settings.from_env({"SEGAL_TRAIN_STEPS": "120", "SEGAL_TRAIN_PRECISION": "FP32",
                                "SEGAL_TRAIN_CHANNELS_LAST": "off"})  # fmt: skip
    assert (chosen.train_steps, chosen.train_precision, chosen.train_channels_last) == (120, "fp32", False)
    assert not defaults.semi_supervised and Settings.from_env({"SEGAL_SEMI_SUPERVISED": "on"}).semi_supervised
    with pytest.raises(ConfigError, match="SEGAL_EMA_DECAY"):
        Settings.from_env({"SEGAL_SEMI_SUPERVISED": "on", "SEGAL_EMA_DECAY": "0"})
    # the option reaches the training process through the run's manifest
    samples = [(torch.rand(3, 40, 60), torch.zeros(40, 60, dtype=torch.int64))]
    semi_config = train_config(Settings.from_env({"SEGAL_SEMI_SUPERVISED": "on"}), samples, warm_start=True)
    assert semi_config.semi_supervised and train_config_from(dataclasses.asdict(semi_config)) == semi_config
    with pytest.raises(LabelConfigError, match="not valid XML"):
        parse_label_config("<View><Image")
    schema = parse_label_config(
        '<View><Image name="img" value="$photo"/>'
        '<BrushLabels name="b" toName="img"><Label value="Road"/><Label value="Car"/></BrushLabels>'
        '<KeyPointLabels name="k" toName="img"><Label value="Sky"/><Label value="Road"/></KeyPointLabels></View>'
    )
    assert schema.classes == ("Road", "Car", "Sky") and schema.image_key == "photo"


def kinds(result):
    return [region["type"] for region in result["result"]]


def test_cold_start_proposes_random_points_and_regions_avoiding_labels(tmp_path, image_server, camvid_dir):
    settings = make_settings(tmp_path, SEGAL_POINTS_PER_TASK=6, SEGAL_REGIONS_PER_TASK=4)
    client = create_app(settings).test_client()
    # the first image already has a labeled brush region (the sky of the ground truth) and a click
    truth = SegmentationFolder(camvid_dir, "train").__getitem__(0)[1].numpy()
    from backend.convert import brush_region, keypoint_region

    sky = truth == CLASSES.index("Sky")
    existing = [
        brush_region(sky, label="Sky", score=1.0, from_name="brushlabels", to_name="image"),
        keypoint_region(200, 100, label="Road", score=1.0, from_name="keypointlabels", to_name="image", width=480, height=360),
    ]
    tasks = tasks_for(image_server, {0: [{"result": existing, "was_cancelled": False}]})
    response = client.post("/predict", json={"tasks": tasks, "project": "5.1", "label_config": FULL_CONFIG})
    assert response.status_code == 200
    results = response.json["results"]
    assert len(results) == 2
    for result in results:
        assert kinds(result).count("keypointlabels") == 6
        assert kinds(result).count("brushlabels") == 4  # brush preferred over polygons when both exist
        assert result["model_version"] == "segal-v0-untrained"
        assert 0.0 <= result["score"] <= 1.0
        for region in result["result"]:
            assert region["to_name"] == "image" and np.isfinite(region["score"])
            assert region["original_width"] == 480 and region["original_height"] == 360
    labeled = sky.copy()
    labeled[200, 100] = True
    for region in results[0]["result"]:
        if region["type"] == "keypointlabels":
            row, col = percent_to_pixel(region["value"]["x"], region["value"]["y"], 480, 360)
            assert not labeled[row, col], "a proposed point lies on an already labeled pixel"
        else:
            mask = brush_mask(region["value"], 480, 360)
            assert (mask & labeled).sum() <= 0.5 * mask.sum(), "a proposed region is mostly labeled already"
    # a polygon-only config gets polygons
    polygons = client.post(
        "/predict", json={"tasks": tasks[1:], "project": "5.1", "label_config": label_config("PolygonLabels")}
    ).json["results"][0]
    assert kinds(polygons) == ["polygonlabels"] * 4
    assert all(polygon_mask(r["value"]["points"], 480, 360).any() for r in polygons["result"])


def test_unreachable_or_refused_images_are_reported(tmp_path, image_server):
    client = create_app(make_settings(tmp_path)).test_client()
    refused = [{"id": 1, "data": {"image": "http://192.0.2.1/x.png"}}]
    response = client.post("/predict", json={"tasks": refused, "project": "2.1", "label_config": FULL_CONFIG})
    assert response.status_code == 422 and "SEGAL_ALLOWED_HOSTS" in response.json["error"]
    missing = [{"id": 2, "data": {"image": f"{image_server}/train/no_such_file.png"}}]
    response = client.post("/predict", json={"tasks": missing, "project": "2.1", "label_config": FULL_CONFIG})
    assert response.status_code == 422 and "404" in response.json["error"]
    corrupt = [{"id": 3, "data": {"image": f"{image_server}/README.md"}}]
    response = client.post("/predict", json={"tasks": corrupt, "project": "2.1", "label_config": FULL_CONFIG})
    assert response.status_code == 422 and "not a readable image" in response.json["error"]
    # one bad task among good ones: an empty result for it, predictions for the rest
    mixed = refused + tasks_for(image_server)[:1]
    results = client.post("/predict", json={"tasks": mixed, "project": "2.1", "label_config": FULL_CONFIG}).json["results"]
    assert results[0]["result"] == [] and len(results[1]["result"]) > 0
    no_image = client.post("/predict", json={"tasks": [{"id": 4, "data": {}}], "project": "2.1", "label_config": FULL_CONFIG})
    assert no_image.status_code == 422 and "data.image" in no_image.json["error"]


@pytest.fixture(scope="module")
def trained_model(camvid_dir):
    """A real model trained briefly on sparse ground-truth clicks of the two test images."""
    folder = SegmentationFolder(camvid_dir, "train")
    generator = torch.Generator().manual_seed(0)
    samples = []
    for name in IMAGES:
        image, dense = folder[folder.names.index(name)]
        valid = torch.nonzero((dense != IGNORE_INDEX).reshape(-1)).squeeze(1)
        chosen = valid[torch.randperm(valid.numel(), generator=generator)[:200]]
        sparse = torch.full_like(dense, IGNORE_INDEX).reshape(-1)
        sparse[chosen] = dense.reshape(-1)[chosen]
        samples.append((image, sparse.reshape(dense.shape)))
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=len(CLASSES)))
    train(model, samples, TrainConfig(steps=8, batch_size=2, crop_size=(256, 256)))
    return model


def test_trained_model_serves_versioned_balent_points(tmp_path, image_server, trained_model):
    settings = make_settings(tmp_path, SEGAL_MC_SAMPLES=8)
    backend = ActiveLearningBackend(settings)
    backend.store.publish("9", trained_model, tuple(CLASSES), extra={})
    client = create_app(settings, backend).test_client()
    assert client.post("/setup", json={"project": "9.1", "schema": FULL_CONFIG}).json["model_version"] == "segal-v1"
    tasks = tasks_for(image_server)
    request = {"tasks": tasks, "project": "9.1", "label_config": FULL_CONFIG}
    results = client.post("/predict", json=request).json["results"]
    schema, served = parse_label_config(FULL_CONFIG), backend.store.current("9")
    for task, result in zip(tasks, results):
        assert result["model_version"] == "segal-v1"
        points = [r for r in result["result"] if r["type"] == "keypointlabels"]
        values = [p["acquisition"]["value"] for p in points]
        assert len(points) == 5 and values == sorted(values, reverse=True)  # most informative first
        assert all(p["value"]["keypointlabels"][0] in CLASSES for p in points)
        # a point's score is the model's confidence in the label it proposes
        assert all(0.0 < p["score"] <= 1.0 for p in points)
        # the task's: its mean BalEnt, the value the pool job scores and the scale is fitted on,
        # mapped to [0, 1], low = label first
        task_value = points[0]["acquisition"]["task_value"]
        assert task_value == backend.predictor.task_value(served, schema, backend.predictor.load(schema, task), task)
        assert result["score"] == pytest.approx(1.0 - squash(task_value))  # no fitted scale in this version
    # a restart serves the newest checkpoint that loads; a broken newest one is skipped
    backend.store.publish("9", trained_model, tuple(CLASSES), extra={})
    (settings.model_dir / "9" / "model-v2.pt").write_bytes(b"truncated")
    restarted = ActiveLearningBackend(settings)
    assert restarted.store.current("9").name == "segal-v1"


def test_a_score_scale_saved_for_the_old_task_value_is_not_used(tmp_path, image_server, trained_model, caplog):
    """Versions saved before the task value became the mean pixel uncertainty carry a scale of
    medians of 5 BalEntAcq values (1e3-1e5): mapping the new values through it would squeeze
    every task to the bottom. Such a scale is set aside with a warning until the next training."""
    settings = make_settings(tmp_path, SEGAL_MC_SAMPLES=8)
    current = ScoreScale.fit([-3.0, -2.0, -1.5, -1.0, -0.5])
    older = {name: value for name, value in ScoreScale.fit([2e3, 1e4, 5e4]).to_dict().items() if name != "task_value"}
    publisher = ActiveLearningBackend(settings)
    publisher.store.publish("9", trained_model, tuple(CLASSES), extra={"score_scale": older})
    publisher.store.publish("8", trained_model, tuple(CLASSES), extra={"score_scale": current.to_dict()})
    with caplog.at_level("WARNING", logger="backend.store"):
        restarted = ActiveLearningBackend(settings)
        client = create_app(settings, restarted).test_client()
        scores = {}
        for project in ("9", "8"):
            request = {"tasks": tasks_for(image_server)[:1], "project": f"{project}.1", "label_config": FULL_CONFIG}
            result = client.post("/predict", json=request).json["results"][0]
            scores[project] = (result["score"], result["result"][0]["acquisition"]["task_value"])
    assert restarted.store.current("9").score_scale is None
    assert "fitted on another task value" in caplog.text and "until the next training run" in caplog.text
    score, value = scores["9"]
    assert score == pytest.approx(1.0 - squash(value))  # the fixed map, not the stale scale
    score, value = scores["8"]
    assert score == pytest.approx(1.0 - current(value))


def test_points_on_the_decoder_grid(tmp_path, image_server, trained_model):
    """SEGAL_POINT_GRID=decoder: points at the decoder's nodes (pixel 4i + 2), labeled by the
    node's MC mean; an answered node is not asked again; the task's value is the one the score
    scale is fitted on (``task_value``)."""
    from backend.convert import keypoint_region
    from backend.label_config import parse_label_config

    settings = make_settings(tmp_path, SEGAL_MC_SAMPLES=8, SEGAL_POINT_GRID="decoder")
    backend = ActiveLearningBackend(settings)
    backend.store.publish("9", trained_model, tuple(CLASSES), extra={})
    config = label_config("KeyPointLabels")
    client = create_app(settings, backend).test_client()

    def predict(tasks):
        return client.post("/predict", json={"tasks": tasks, "project": "9.1", "label_config": config}).json["results"]

    def pixels_of(result):
        return [percent_to_pixel(p["value"]["x"], p["value"]["y"], 480, 360) for p in result["result"]]

    tasks = tasks_for(image_server)
    schema, served = parse_label_config(config), backend.store.current("9")
    for task, result in zip(tasks, predict(tasks)):
        points = result["result"]
        values = [p["acquisition"]["value"] for p in points]
        assert len(points) == 5 and values == sorted(values, reverse=True)
        assert all(row % 4 == 2 and col % 4 == 2 for row, col in pixels_of(result))
        assert all(0.0 < p["score"] <= 1.0 and p["value"]["keypointlabels"][0] in CLASSES for p in points)
        work = backend.predictor.load(schema, task)
        assert backend.predictor.task_value(served, schema, work, task) == points[0]["acquisition"]["task_value"]
    # the annotator answers the first task's best point: the next prediction asks the other four, then a new one
    first = predict(tasks[:1])[0]
    (row, col), label = pixels_of(first)[0], first["result"][0]["value"]["keypointlabels"][0]
    answer = keypoint_region(row, col, label=label, score=1.0, from_name="keypointlabels", to_name="image",
                             width=480, height=360)
    answered = tasks_for(image_server, {0: [{"result": [answer], "was_cancelled": False}]})[:1]
    again = pixels_of(predict(answered)[0])
    assert (row, col) not in again and again[:4] == pixels_of(first)[1:]


def test_redirects_are_not_followed(tmp_path, image_server):
    """An allowed host cannot bounce the backend to another one."""
    import http.server
    import threading

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(302)
            self.send_header("Location", f"{image_server}/train/{IMAGES[0]}")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = create_app(make_settings(tmp_path)).test_client()
        tasks = [{"id": 1, "data": {"image": f"http://127.0.0.1:{server.server_address[1]}/x.png"}}]
        response = client.post("/predict", json={"tasks": tasks, "project": "3.1", "label_config": FULL_CONFIG})
        assert response.status_code == 422 and "redirects to" in response.json["error"]
    finally:
        server.shutdown()


def test_settings_snapshot_for_a_job_leaves_the_secrets_out():
    import json

    settings = Settings.from_env({
        "LABEL_STUDIO_URL": "http://ls.example:8080", "LABEL_STUDIO_API_KEY": "key-0f3c9a", "MODEL_DIR": "/srv/m",
        "BASIC_AUTH_USER": "ann", "BASIC_AUTH_PASS": "pass-77d1", "SEGAL_ALLOWED_HOSTS": "img.example",
    })  # fmt: skip
    text = json.dumps(settings.snapshot())
    assert "key-0f3c9a" not in text and "pass-77d1" not in text
    back = Settings.from_snapshot(json.loads(text), api_key="key-0f3c9a")
    assert back == dataclasses.replace(settings, basic_auth_pass="")
    with pytest.raises(ConfigError, match="unknown fields"):
        Settings.from_snapshot({**json.loads(text), "a_future_setting": 1})


def test_model_output_cache_is_tied_to_the_model_object_and_bounded_in_bytes():
    from backend.predictor import ModelOutputCache, ModelOutputs
    from model.moments import MCMoments

    def outputs(classes: int) -> ModelOutputs:  # 2 x classes x 10 x 10 float64: 1600 bytes per class
        maps = torch.zeros(classes, 10, 10, dtype=torch.float64)
        return ModelOutputs(MCMoments(maps, maps.clone(), None, 20), None, torch.Generator().get_state())

    first, second = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    cache = ModelOutputCache(max_bytes=5 * 1600)
    cache.put(("segal-v1", "a"), first, outputs(2))
    assert cache.get(("segal-v1", "a"), first) is not None
    assert cache.get(("segal-v1", "a"), second) is None, "another model object under the same name"
    assert len(cache) == 0  # and the stale entry is gone
    cache.put(("segal-v1", "a"), first, outputs(2))
    cache.put(("segal-v1", "b"), first, outputs(2))
    cache.get(("segal-v1", "a"), first)  # a is now the most recent
    cache.put(("segal-v1", "c"), first, outputs(1))  # 5 x 1600 in all: fits
    assert len(cache) == 3
    cache.put(("segal-v1", "d"), first, outputs(2))  # over the budget: the least recent (b) goes
    assert cache.get(("segal-v1", "b"), first) is None and cache.get(("segal-v1", "a"), first) is not None
    cache.put(("segal-v1", "huge"), first, outputs(6))  # larger than the whole budget: not kept
    assert cache.get(("segal-v1", "huge"), first) is None and len(cache) == 3  # a, c, d


def test_a_predict_of_several_tasks_fetches_the_next_images_while_the_model_works(tmp_path):
    """While the model works on the first task of a request, the next images are downloaded;
    results stay in task order, and a task whose image fails gets its empty result."""
    files = {f"/{index}.png": png_bytes(90, 120, seed=index) for index in range(4)}
    with RecordingServer(files) as server:
        backend = ActiveLearningBackend(make_settings(tmp_path))
        tasks = [{"id": index + 1, "data": {"image": f"{server.url}/{index}.png"}} for index in range(4)]
        tasks.insert(2, {"id": 9, "data": {"image": f"{server.url}/missing.png"}})
        seen_while_first = []
        predict_task = backend.predictor.predict_task

        def watching(served, schema, task, *args, **kwargs):
            if task["id"] == 1:  # the next images' downloads must start without this task finishing
                deadline = time.monotonic() + 10
                ahead = {"/1.png", "/missing.png"}
                while time.monotonic() < deadline and not ahead <= {r.path for r in server.requests}:
                    time.sleep(0.01)
                seen_while_first.extend(r.path for r in server.requests)
            return predict_task(served, schema, task, *args, **kwargs)

        backend.predictor.predict_task = watching
        results, errors = backend.predictor.predict("3", parse_label_config(FULL_CONFIG), tasks)
    assert {"/0.png", "/1.png", "/missing.png"} <= set(seen_while_first)
    assert [len(r["result"]) > 0 for r in results] == [True, True, False, True, True]
    assert len(errors) == 1 and errors[0].startswith("task 9:") and "404" in errors[0]
    assert [r.path for r in server.requests].count("/3.png") == 1
