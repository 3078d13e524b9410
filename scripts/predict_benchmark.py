"""/predict of one 480x360 CamVid task with a trained model, against one plain forward.

    ./run.sh bench-predict [--repeats 9]

Trains the default network briefly on the benchmark's 8 labeled images (scripts/train_benchmark.py),
fits the region projector on its memory bank and publishes it as a project's version, the
way a training run does. Then, in rounds, times in one process: a plain forward of the served
model (eval, no dropout sampling) and /predict through the backend's
WSGI app (JSON in and out, the image served over HTTP on loopback, its bytes and superpixels
cached after the first request; a new task id per request, so the network runs every time)
with a keypoints-only and a keypoints + brush label config, and one task asked again with a
click as context, whose network outputs are cached. Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from train_benchmark import CAMVID, REPO, default_model, labeled_set

sys.path.insert(0, str(REPO / "tests"))

from loopback import RecordingServer  # noqa: E402
from ls_harness import camvid_label_config  # noqa: E402
from pool_benchmark import KEYPOINTS_ONLY  # noqa: E402

from backend.app import create_app  # noqa: E402
from backend.config import Settings  # noqa: E402
from backend.service import ActiveLearningBackend  # noqa: E402
from model.data import CAMVID_CLASSES, load_image  # noqa: E402
from model.grid import GRIDS  # noqa: E402
from model.process import prepare_process  # noqa: E402
from model.regions import RegionProjector, warm_up_umap  # noqa: E402
from model.training import TrainConfig, train  # noqa: E402

def trained_version(backend: ActiveLearningBackend, project: str) -> None:
    items = labeled_set()
    samples = [(item.image, item.sparse) for item in items]
    model = default_model(backend.settings, 0)
    result = train(model, samples, TrainConfig(steps=30, crop_size=(360, 480), precision="auto", teacher_tolerance=None))
    vectors, _ = result.memory_bank.vectors()
    projector = RegionProjector.fit(vectors.numpy(), seed=0)
    backend.store.publish(project, result.teacher, tuple(CAMVID_CLASSES), extra={},
                          memory_bank=result.memory_bank, projector=projector)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    prepare_process()  # as the backend's processes do (model/process.py)
    image_path = sorted((CAMVID / "val").glob("*.png"))[0]
    labels = "".join(f'<Label value="{name}"/>' for name in CAMVID_CLASSES)
    configs = {"keypoints only": KEYPOINTS_ONLY.format(labels=labels), "keypoints + brush regions": camvid_label_config()}
    with tempfile.TemporaryDirectory(prefix="segal-predict-bench-") as work, RecordingServer(
        {"/frame.png": image_path.read_bytes()}
    ) as images:
        environment = {"MODEL_DIR": str(Path(work) / "models"), "SEGAL_ALLOWED_HOSTS": "127.0.0.1",
                       "SEGAL_SCORE_POOL": "off"}  # fmt: skip
        settings = Settings.from_env(environment)
        backend = ActiveLearningBackend(settings)
        trained_version(backend, "1")
        warm_up_umap()  # the start-up compilation on both cores must not overlap the timed requests
        served = backend.store.current("1")
        clients = {}  # one app per SEGAL_POINT_GRID, serving the same saved version
        for grid in GRIDS:
            grid_settings = Settings.from_env({**environment, "SEGAL_POINT_GRID": grid})
            clients[grid] = create_app(grid_settings, ActiveLearningBackend(grid_settings)).test_client()
        frame = load_image(image_path)[None]  # [1, 3, 360, 480], the task's own image
        task_ids = itertools.count(1)

        def forward():
            with torch.inference_mode():
                served.model(frame)

        def predict(config, grid, task_id=None, context=None):
            # a new task id each time: the network runs (its outputs are cached per task and
            # model for re-requests); the image's bytes and superpixels come from their caches
            task = {"id": next(task_ids) if task_id is None else task_id, "data": {"image": f"{images.url}/frame.png"}}
            request = {"tasks": [task], "project": "1.0", "label_config": config, "params": {"context": context}}
            response = clients[grid].post("/predict", json=request)
            body = response.get_json()
            assert response.status_code == 200 and body["results"][0]["result"], body
            return body["results"][0]["result"]

        # the same task asked again with the annotator's click on its best keypoint (interactive
        # pre-annotations): the network's outputs are reused, the click excluded
        regions_config = configs["keypoints + brush regions"]
        first = predict(regions_config, "image", task_id=0)
        click = {"result": [next(r for r in first if r["type"] == "keypointlabels")]}

        # the reference twice: the first follows a regions request, whose work must not slow it
        # (numpy's BLAS threads spinning on torch's cores did, before model/process.py)
        timed = {"plain forward": forward, "plain forward, again": forward}
        timed |= {
            f"/predict, {name}, {grid} grid": (lambda c=config, g=grid: predict(c, g))
            for name, config in configs.items()
            for grid in GRIDS
        }
        timed["/predict again with a click, keypoints + brush regions (cached outputs)"] = lambda: predict(
            regions_config, "image", task_id=0, context=click
        )
        for run in timed.values():  # warm: allocator, image cache, first transform
            run()
            run()
        times: dict[str, list[float]] = {name: [] for name in timed}
        for _ in range(args.repeats):
            for name, run in timed.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    plain = medians["plain forward"]
    print(f"one 480x360 CamVid task (a new task id per request unless cached), trained model, "
          f"{settings.mc_samples} MC samples, {settings.points_per_task} "
          f"points, {settings.regions_per_task} regions, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats} interleaved rounds; points scored on every pixel (image grid) or on the "
          "decoder's nodes (SEGAL_POINT_GRID)")
    for name, median in medians.items():
        print(f"  {name:<72} {median * 1000:7.0f} ms   {median / plain:5.2f}x plain forward")


if __name__ == "__main__":
    main()
