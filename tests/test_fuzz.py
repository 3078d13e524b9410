"""Property-based fuzz of the protocol (hypothesis): /setup, /predict and /webhook bodies built
from the shapes of the OpenAPI document (backend/openapi.py), mixed with arbitrary JSON,
hostile strings and URLs, raw bytes, and real images of awkward sizes served over loopback.

The property: no request is answered 5xx, and /health stays 200. Bounded (a fixed number of
examples, derandomized so every run sends the same requests) to stay within about a minute.
"""

from __future__ import annotations

import json
import time

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.app import create_app
from backend.config import Settings
from backend.service import ActiveLearningBackend
from loopback import RecordingServer, png_bytes
from model.network import ModelConfig, build_model

EXAMPLES = 500
LABELS = ["Road", "Car", "Sky"]
EVENTS = ["START_TRAINING", "ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "ANNOTATIONS_CREATED",
          "PROJECT_UPDATED", "TASKS_CREATED"]  # fmt: skip
IMAGES = {
    "/small.png": png_bytes(48, 64),
    "/thin.png": png_bytes(3, 400),
    "/tall.png": png_bytes(300, 2),
    "/dot.png": png_bytes(1, 1),
    "/gray16.png": png_bytes(20, 30, channels=1, dtype="uint16"),
    "/rgba.png": png_bytes(20, 20, channels=4),
    "/text.png": b"not an image at all",
}


def config(*tags: str, labels=LABELS) -> str:
    items = "".join(f'<Label value="{label}"/>' for label in labels)
    body = "".join(f'<{tag} name="{tag.lower()}" toName="image">{items}</{tag}>' for tag in tags)
    return f'<View><Image name="image" value="$image"/>{body}</View>'


CONFIGS = [config("KeyPointLabels", "BrushLabels"), config("BrushLabels"), config("PolygonLabels"),
           config("KeyPointLabels")]  # fmt: skip
HOSTILE_TEXT = ["\u0661", "1" * 300, "", " ", "\x00", "../../etc/passwd", "%00", "A" * 5000, "<!DOCTYPE x [<!ENTITY a 'b'>]>"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
texts = st.text(max_size=30) | st.sampled_from(HOSTILE_TEXT)
projects = st.sampled_from(["1.1700000000", "2.1700000000", "1", "2"]) | st.integers(-5, 10**20) | texts | json_values
percent = st.floats(-50, 150, allow_nan=False) | json_values


def image_urls(base: str):
    good = st.sampled_from([base + path for path in IMAGES])
    hostile = st.sampled_from([
        "/data/upload/1/a.png", f"{base}/missing.png", f"{base}/redirect?to={base}/small.png",
        "http://localhost:1\\@127.0.0.1/x", "http://u:p@127.0.0.1/x", "httpx://127.0.0.1/x", "file:///etc/passwd",
        "http://[::1/x", "http://127.0.0.1:99999/x", "s3://bucket/x.png", "http://exa mple.com/",
    ])  # fmt: skip
    return st.sampled_from([good, good, good, hostile, texts, json_values]).flatmap(lambda chosen: chosen)


def either(well_formed, anything=json_values):
    """Mostly the well-formed value (so requests get past the first check), sometimes anything."""
    return st.sampled_from([well_formed] * 6 + [anything]).flatmap(lambda chosen: chosen)


labels = st.lists(st.sampled_from(LABELS), min_size=1, max_size=2)
values = st.fixed_dictionaries({}, optional={
    "x": percent, "y": percent, "width": percent,
    "keypointlabels": either(labels), "brushlabels": either(labels), "polygonlabels": either(labels),
    "format": either(st.just("rle")), "rle": either(st.lists(st.integers(-5, 300), max_size=30)),
    "points": either(st.lists(st.lists(percent, min_size=2, max_size=2), max_size=6)), "closed": json_values,
})  # fmt: skip
regions = st.fixed_dictionaries(
    {"from_name": either(st.sampled_from(["keypointlabels", "brushlabels", "polygonlabels"])),
     "to_name": either(st.just("image")),
     "type": either(st.sampled_from(["keypointlabels", "brushlabels", "polygonlabels"]))},
    optional={"value": either(values), "original_width": either(st.integers(-3, 5000)),
              "original_height": either(st.integers(-3, 5000))},
)  # fmt: skip
annotation = st.fixed_dictionaries({"result": st.lists(regions, max_size=3)}, optional={"was_cancelled": st.booleans()})
well_formed_projects = st.sampled_from(["1.1700000000", "2.1700000000", "1", "2", 2])


def requests(base: str):
    task = st.fixed_dictionaries(
        {"id": st.integers(0, 10**6), "data": either(st.fixed_dictionaries({"image": image_urls(base)}))},
        optional={"annotations": either(st.lists(annotation, max_size=2))},
    )
    setup = st.fixed_dictionaries(
        {"project": either(well_formed_projects, projects), "schema": either(st.sampled_from(CONFIGS), texts)},
        optional={"hostname": texts | json_values, "access_token": texts | json_values, "extra_params": json_values},
    ).map(lambda body: ("/setup", body))  # fmt: skip
    context = st.fixed_dictionaries({}, optional={"result": either(st.lists(regions, max_size=2))})
    predict = st.fixed_dictionaries(
        {"tasks": either(st.lists(task, min_size=1, max_size=3)), "project": either(well_formed_projects, projects),
         "label_config": either(st.sampled_from(CONFIGS), texts)},
        optional={"params": either(st.fixed_dictionaries({"context": either(context)}))},
    ).map(lambda body: ("/predict", body))  # fmt: skip
    webhook = st.fixed_dictionaries(
        {"action": either(st.sampled_from(EVENTS), texts),
         "project": either(st.fixed_dictionaries({"id": well_formed_projects}), projects)},
        optional={"annotation": json_values, "task": json_values},
    ).map(lambda body: ("/webhook", body))  # fmt: skip
    raw = st.tuples(st.sampled_from(["/setup", "/predict", "/webhook"]), st.binary(max_size=64))
    anything = st.tuples(st.sampled_from(["/setup", "/predict", "/webhook"]), json_values)
    kinds = [setup, setup, predict, predict, predict, predict, webhook, webhook, raw, anything]
    return st.sampled_from(kinds).flatmap(lambda chosen: chosen)


def test_fuzz_the_protocol_never_answers_5xx(tmp_path):
    settings_ = Settings.from_env({"MODEL_DIR": str(tmp_path / "models"), "SEGAL_ALLOWED_HOSTS": "127.0.0.1",
                                   "SEGAL_SUPERPIXELS": "100", "SEGAL_MC_SAMPLES": "2", "SEGAL_DOWNLOAD_TIMEOUT": "5"})  # fmt: skip
    backend = ActiveLearningBackend(settings_)
    torch.manual_seed(0)
    # project 2 has a served model (real network, random weights): its /predict runs the forward pass
    backend.store.publish("2", build_model(ModelConfig(num_classes=3, encoder_weights=None)), tuple(LABELS), extra={})
    client = create_app(settings_, backend).test_client()
    counts = {"requests": 0, "5xx": 0}
    failures: list[str] = []
    statuses: dict[str, int] = {}

    with RecordingServer(dict(IMAGES)) as images:

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(requests(images.url))
        def send(request):
            path, body = request
            if isinstance(body, bytes):
                response = client.post(path, data=body, content_type="application/json")
            else:
                response = client.post(path, data=json.dumps(body), content_type="application/json")
            counts["requests"] += 1
            statuses[f"{path} {response.status_code}"] = statuses.get(f"{path} {response.status_code}", 0) + 1
            if response.status_code >= 500:
                counts["5xx"] += 1
                failures.append(f"{path} {str(body)[:300]} -> {response.status_code} {response.data[:200]!r}")
            health = client.get("/health")
            counts["requests"] += 1
            assert health.status_code == 200, f"/health {health.status_code} after {path} {str(body)[:300]}"
            assert response.status_code < 500, failures[-1]

        started = time.monotonic()
        send()
    print(f"fuzz: {counts['requests']} requests ({EXAMPLES} examples and a /health after each), "
          f"{counts['5xx']} answered 5xx, {time.monotonic() - started:.0f} s; by route and status: {dict(sorted(statuses.items()))}")  # fmt: skip
    assert counts["5xx"] == 0, failures
