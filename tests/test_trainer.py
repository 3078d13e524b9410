"""Training jobs: background runs, coalescing, failures, what counts as a label.

The annotations come from an in-memory project source (the data Label Studio's API would
return); the images come over real HTTP, the training is real. The same jobs run against
a real Label Studio in tests/test_e2e_label_studio.py.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from backend.convert import keypoint_region
from backend.label_config import parse_label_config
from backend.service import ActiveLearningBackend
from backend.trainer import ProjectSource
from model.data import CAMVID_CLASSES, IGNORE_INDEX, SegmentationFolder
from model.precision import bf16_is_native

from test_backend import FULL_CONFIG, IMAGES, make_settings

CLASSES = list(CAMVID_CLASSES)


class InMemorySource(ProjectSource):
    """A project as Label Studio's API returns it: config and tasks with annotations."""

    def __init__(self, tasks):
        super().__init__(client_factory=None)
        self.tasks = tasks

    def label_config(self, project):
        return FULL_CONFIG

    def annotated_tasks(self, project):
        return self.tasks


def clicks(camvid_dir, name, count, seed, cancelled=False):
    """An annotation of `count` ground-truth keypoints on one CamVid image."""
    folder = SegmentationFolder(camvid_dir, "train")
    dense = folder[folder.names.index(name)][1].numpy()
    rng = np.random.default_rng(seed)
    rows, cols = np.nonzero(dense != IGNORE_INDEX)
    picks = rng.choice(len(rows), count, replace=False)
    result = [
        keypoint_region(int(rows[i]), int(cols[i]), label=CLASSES[dense[rows[i], cols[i]]], score=1.0,
                        from_name="keypointlabels", to_name="image", width=480, height=360)
        for i in picks
    ]
    return {"result": result, "was_cancelled": cancelled, "updated_at": f"2026-01-0{seed % 9 + 1}"}


def backend_with(tmp_path, tasks, **env):
    defaults = {"SEGAL_TRAIN_STEPS": 2, "SEGAL_TRAIN_BATCH_SIZE": 2, "SEGAL_TRAIN_CROP": 128, "SEGAL_MAX_SIDE": 240}
    settings = make_settings(tmp_path, **{**defaults, **env})
    backend = ActiveLearningBackend(settings)
    backend.trainer.source = InMemorySource(tasks)
    return backend


def test_requests_during_a_run_become_one_follow_up(tmp_path, image_server, camvid_dir):
    tasks = [{"id": 1, "data": {"image": f"{image_server}/train/{IMAGES[0]}"}, "annotations": [clicks(camvid_dir, IMAGES[0], 20, 1)]}]
    backend = backend_with(tmp_path, tasks)
    first = backend.fit("START_TRAINING", {"project": {"id": 4}})
    assert first["status"] == "training" and first["training"]["status"] == "running"
    for _ in range(3):  # arrive while the first run is going
        backend.fit("START_TRAINING", {"project": {"id": 4}})
    backend.trainer.wait("4", timeout=300)
    state = backend.trainer.states()["4"]
    assert state["status"] == "succeeded", state["error"]
    assert state["runs"] == 2 and state["version"] == 2 and not state["follow_up_queued"]
    assert state["labeled_pixels"] == 20 and state["step"] == state["total_steps"] == 2
    assert state["nice"] == min(19, os.nice(0) + 19)  # SEGAL_JOB_NICE's default reached the process
    assert backend.store.current("4").name == "segal-v2"
    files = sorted(p.name for p in (tmp_path / "models" / "4").iterdir())
    assert [name for name in files if name.endswith(".pt")] == ["model-v1.pt", "model-v2.pt"]
    # a projector file only ever sits next to its checkpoint (v1's bank was too small for one)
    assert all(name.replace(".umap", ".pt") in files for name in files if name.endswith(".umap"))


def test_a_failed_run_keeps_the_previous_version_serving(tmp_path, image_server, camvid_dir):
    tasks = [{"id": 1, "data": {"image": f"{image_server}/train/{IMAGES[0]}"}, "annotations": [clicks(camvid_dir, IMAGES[0], 10, 2)]}]
    backend = backend_with(tmp_path, tasks)
    backend.fit("START_TRAINING", {"project": {"id": 6}})
    backend.trainer.wait("6", timeout=300)
    assert backend.store.current("6").version == 1
    backend.trainer.source.tasks = [{"id": 1, "data": {"image": f"{image_server}/train/{IMAGES[0]}"}, "annotations": []}]
    backend.fit("START_TRAINING", {"project": {"id": 6}})
    backend.trainer.wait("6", timeout=300)
    state = backend.trainer.states()["6"]
    assert state["status"] == "failed" and "no usable annotation" in state["error"]
    assert backend.store.current("6").name == "segal-v1"
    assert backend.status()["projects"]["6"]["training"]["status"] == "failed"


def test_cancelled_annotations_and_broken_regions_do_not_train(tmp_path, image_server, camvid_dir):
    good = clicks(camvid_dir, IMAGES[0], 15, 3)
    broken = {"from_name": "keypointlabels", "to_name": "image", "type": "keypointlabels",
              "value": {"x": 150.0, "y": 20.0, "keypointlabels": ["Road"]}}
    unknown = {"from_name": "keypointlabels", "to_name": "image", "type": "keypointlabels",
               "value": {"x": 10.0, "y": 20.0, "keypointlabels": ["Unicorn"]}}
    good["result"] += [broken, unknown]
    tasks = [
        {"id": 1, "data": {"image": f"{image_server}/train/{IMAGES[0]}"}, "annotations": [good]},
        {"id": 2, "data": {"image": f"{image_server}/train/{IMAGES[1]}"},
         "annotations": [clicks(camvid_dir, IMAGES[1], 30, 4, cancelled=True)]},
        {"id": 3, "data": {"image": "http://192.0.2.1/unreachable.png"}, "annotations": [clicks(camvid_dir, IMAGES[1], 5, 5)]},
    ]
    backend = backend_with(tmp_path, tasks)
    samples, skipped = backend.trainer.collect("8", parse_label_config(FULL_CONFIG))
    assert len(samples) == 1 and skipped == 2
    image, labels = samples[0]
    assert image.shape[-2:] == (180, 240)  # SEGAL_MAX_SIDE=240 working resolution
    assert int((labels != IGNORE_INDEX).sum()) <= 15 and labels.dtype == torch.int64


def test_train_every_n_annotation_events(tmp_path, image_server, camvid_dir):
    tasks = [{"id": 1, "data": {"image": f"{image_server}/train/{IMAGES[0]}"}, "annotations": [clicks(camvid_dir, IMAGES[0], 10, 6)]}]
    backend = backend_with(tmp_path, tasks, SEGAL_TRAIN_EVERY=2)
    assert backend.fit("ANNOTATION_CREATED", {"project": {"id": 2}})["status"] == "noted"
    assert backend.fit("ANNOTATION_UPDATED", {"project": {"id": 2}})["status"] == "training"
    backend.trainer.wait("2", timeout=300)
    assert backend.trainer.states()["2"]["status"] == "succeeded"
    assert backend.trainer.states()["2"]["annotations_since_training"] == 0


def test_training_publishes_a_projector_and_regions_come_from_clusters(tmp_path, image_server, camvid_dir):
    """Paper 004 end to end in the backend: contrastive training fills the memory bank, the
    UMAP fitted on it is published with the model, and the regions of a task are one per
    KMeans cluster, brushed, never already labeled; a restart serves the same projector."""
    annotated = {"id": 1, "data": {"image": f"{image_server}/train/{IMAGES[0]}"}, "annotations": [clicks(camvid_dir, IMAGES[0], 80, 5)]}
    backend = backend_with(tmp_path, [annotated], SEGAL_TRAIN_STEPS=6, SEGAL_REGIONS_PER_TASK=4, SEGAL_MC_SAMPLES=4)
    backend.fit("START_TRAINING", {"project": {"id": 6}})
    backend.trainer.wait("6", timeout=600)
    state = backend.trainer.states()["6"]
    assert state["status"] == "succeeded", state["error"]
    served = backend.store.current("6")
    assert served.projector is not None and served.memory_bank is not None and len(served.memory_bank) >= 10
    assert served.extra["memory_bank_vectors"] == len(served.memory_bank)
    # the teacher of 6 steps may lag its student: the version says which was served, and why
    teacher, student = served.extra["teacher_accuracy"], served.extra["student_accuracy"]
    assert served.extra["served"] == ("student" if teacher < student - 0.05 else "ema_teacher"), served.extra
    assert (tmp_path / "models" / "6" / "model-v1.umap").is_file()
    assert backend.status()["projects"]["6"]["region_selection"] == "umap-kmeans"

    schema = parse_label_config(FULL_CONFIG)
    results, errors = backend.predictor.predict("6", schema, [annotated])
    assert not errors
    regions = [r for r in results[0]["result"] if r["type"] == "brushlabels"]
    assert len(regions) == 4
    # best first by informativeness (acquisition.value); a region's score is its label's confidence
    scores = [r["acquisition"]["value"] for r in regions]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))
    assert all(0.0 < r["score"] <= 1.0 for r in regions)
    assert all(r["value"]["brushlabels"][0] in CLASSES for r in regions)

    restarted = ActiveLearningBackend(backend.settings)
    reloaded = restarted.store.current("6")
    assert reloaded.projector is not None
    probe = np.random.default_rng(0).standard_normal((5, reloaded.projector.dim)).astype(np.float32)
    np.testing.assert_array_equal(reloaded.projector.transform(probe), served.projector.transform(probe))
    again, _ = restarted.predictor.predict("6", schema, [annotated])
    assert again[0]["result"] == results[0]["result"], "same model, same task: the same proposals"

    # the task asked again with the annotator's click on its best keypoint as context
    # (interactive pre-annotations): the network's outputs come from the cache, and the answer
    # is a fresh computation's, without the clicked pixel
    passes = []
    network_pass = restarted.predictor._model_outputs
    restarted.predictor._model_outputs = lambda *args: passes.append(1) or network_pass(*args)
    click = next(r for r in results[0]["result"] if r["type"] == "keypointlabels")
    context = {"result": [click]}
    cached, _ = restarted.predictor.predict("6", schema, [annotated], context)
    assert passes == [] and len(restarted.predictor.model_outputs) == 1
    fresh, _ = ActiveLearningBackend(backend.settings).predictor.predict("6", schema, [annotated], context)
    assert cached[0]["result"] == fresh[0]["result"] and cached[0]["score"] == fresh[0]["score"]
    asked = [r["value"] for r in cached[0]["result"] if r["type"] == "keypointlabels"]
    assert click["value"] not in asked and cached[0]["result"] != results[0]["result"]

    # summed BalEnt as the informativeness: still one region per cluster, best first, JSON-safe
    balent = ActiveLearningBackend(dataclasses.replace(backend.settings, region_score="balent"))
    by_balent, errors = balent.predictor.predict("6", schema, [annotated])
    assert not errors
    scores = [r["acquisition"]["value"] for r in by_balent[0]["result"] if r["type"] == "brushlabels"]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True) and all(np.isfinite(scores))
    assert scores != [r["acquisition"]["value"] for r in regions]
    # with keypoints on the decoder grid the regions' BalEnt is scored apart (at every pixel it
    # is the keypoints' own map, reused): the same regions and values either way
    apart = ActiveLearningBackend(dataclasses.replace(backend.settings, region_score="balent", point_grid="decoder"))
    by_apart, _ = apart.predictor.predict("6", schema, [annotated])
    apart_scores = [r["acquisition"]["value"] for r in by_apart[0]["result"] if r["type"] == "brushlabels"]
    np.testing.assert_allclose(apart_scores, scores, rtol=1e-12)

    # SEGAL_MC_PRECISION: auto takes the MC samples' masked product in bf16 where the CPU has it
    # natively; the moments stay far within the sampling's noise of fp32's (README, "MC precision")
    auto = ActiveLearningBackend(backend.settings)
    exact = ActiveLearningBackend(dataclasses.replace(backend.settings, mc_precision="fp32"))
    native = bf16_is_native(torch.device("cpu"))
    assert auto.predictor.logit_precision == ("bf16" if native else "fp32") and exact.predictor.logit_precision == "fp32"
    work = auto.predictor.load(schema, annotated)
    means = [
        each.predictor._model_outputs(reloaded.model, work.image, torch.Generator().manual_seed(0), False).coarse.mean
        for each in (auto, exact)
    ]  # [C, h/4, w/4] each, the same dropout masks
    change = float((means[0] - means[1]).abs().max())
    assert change < 1e-3 and (change > 0) == native, change
    by_exact, errors = exact.predictor.predict("6", schema, [annotated])
    assert not errors and len([r for r in by_exact[0]["result"] if r["type"] == "brushlabels"]) == 4
