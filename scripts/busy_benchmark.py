"""/predict while the backend works in the background: alone, beside a training process, beside a pool job.

    ./run.sh bench-busy [--requests 12]

An annotator keeps labeling while a training run and, after it, the pool job use the same
cores. This times what they wait for: a /predict of one 480x360 CamVid task (keypoints +
brush regions, a trained model, a new task id each time), asked every 0.5 s like clicks, in
one process:

- alone;
- beside a real training process (``backend.runs.run_training``, the backend's default
  schedule on the benchmark's 8 labeled images): at nice 0 as before, at SEGAL_JOB_NICE's
  default, and paused while the requests compute (``backend.gate``, the backend's default);
- beside a real pool job through a Label Studio (200 CamVid tasks), with the requests-first
  gate (``backend.gate``) and without it.

Prints median and worst latency and the ratio to the requests alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from predict_benchmark import trained_version
from pool_benchmark import make_project
from train_benchmark import CAMVID, REPO, labeled_set

sys.path.insert(0, str(REPO / "tests"))

from loopback import RecordingServer  # noqa: E402
from ls_harness import LabelStudioServer, camvid_label_config  # noqa: E402

from backend.app import create_app  # noqa: E402
from backend.config import Settings  # noqa: E402
from backend.label_config import parse_label_config  # noqa: E402
from backend.runs import TrainingFailed, run_training  # noqa: E402
from backend.service import ActiveLearningBackend  # noqa: E402
from backend.trainer import train_config  # noqa: E402
from model.data import CAMVID_CLASSES  # noqa: E402
from model.network import ModelConfig  # noqa: E402
from model.process import prepare_process  # noqa: E402
from model.regions import warm_up_umap  # noqa: E402

CLICK_SECONDS = 0.5  # between the end of one request and the next
POOL_TASKS = 200


class Requests:
    """/predict of a new task on the same val frame, through the backend's WSGI app."""

    def __init__(self, backend: ActiveLearningBackend, image_url: str):
        self.client = create_app(backend.settings, backend).test_client()
        self.image_url = image_url
        self.ids = itertools.count(10_000)
        self.config = camvid_label_config()

    def one(self) -> float:
        task = {"id": next(self.ids), "data": {"image": self.image_url}}
        start = time.perf_counter()
        response = self.client.post("/predict", json={"tasks": [task], "project": "1.0", "label_config": self.config})
        assert response.status_code == 200, response.get_json()
        return time.perf_counter() - start

    def clicks(self, count: int) -> list[float]:
        times = []
        for _ in range(count):
            times.append(self.one())
            time.sleep(CLICK_SECONDS)
        return times


def beside_training(backend: ActiveLearningBackend, requests: Requests, count: int, nice: int,
                    pause: bool) -> list[float]:  # fmt: skip
    """The requests while a training process runs at `nice` (stopped after them); `pause`: it is
    paused while they compute (``backend.gate``, what the backend does on a CPU)."""
    settings = backend.settings
    samples = [(item.image, item.sparse) for item in labeled_set()]
    config = train_config(settings, samples, warm_start=False)
    config = dataclasses.replace(config, steps=100_000)  # long enough to outlast the requests
    started, running = threading.Event(), {}

    def on_record(record: dict) -> None:
        if record.get("event") == "step":
            started.set()

    def train() -> None:
        try:
            run_training(
                backend.store.project_dir("999"), classes=tuple(CAMVID_CLASSES),
                model_config=ModelConfig(num_classes=len(CAMVID_CLASSES)), train_config=config, samples=samples,
                device="cpu", init_checkpoint=None, procs=1, nice=nice, on_record=on_record,
                gate=backend.predictor.gate if pause else None,
                on_start=lambda process: running.setdefault("process", process),
            )  # fmt: skip
        except TrainingFailed:
            pass  # stopped below

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    while not started.wait(1.0):
        if not thread.is_alive():
            raise RuntimeError("the training ended before its first step")
    try:
        return requests.clicks(count)
    finally:
        running["process"].stop()
        thread.join()


def beside_pool_job(backend, requests: Requests, count: int, project: int, config: str, gate: bool) -> tuple:
    """The requests while the pool job scores `project`; `gate` False: the job does not wait for them."""
    pid = str(project)
    backend.schemas[pid] = parse_label_config(config)
    predictor = backend.predictor
    original = predictor.gate.wait_for_requests
    if not gate:
        predictor.gate.wait_for_requests = lambda cancelled=None: 0.0
    # in a thread of this process, as the backend runs it (SEGAL_SCORE_POOL is off here so that
    # nothing else starts a job); the cancel flag is the one a training run's start sets
    job = threading.Thread(target=backend.pool.run, args=(pid, "benchmark"))
    try:
        job.start()
        time.sleep(2.0)  # the job is past its first page
        times = requests.clicks(count)
        running = job.is_alive()
        backend.pool._project(pid).cancel.set()
        job.join(60)
    finally:
        predictor.gate.wait_for_requests = original
    return times, running, backend.pool.states()[pid]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=12, help="timed requests per phase (default 12)")
    args = parser.parse_args(argv)
    prepare_process()
    image_path = sorted((CAMVID / "val").glob("*.png"))[0]
    pool_images = sorted((CAMVID / "train").glob("*.png"))[:POOL_TASKS]
    config = camvid_label_config()
    rows = []
    with tempfile.TemporaryDirectory(prefix="segal-busy-bench-") as work, RecordingServer(
        {"/frame.png": image_path.read_bytes()}
    ) as images, LabelStudioServer() as ls:
        settings = Settings.from_env({
            "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token, "MODEL_DIR": str(Path(work) / "models"),
            "SEGAL_ALLOWED_HOSTS": "127.0.0.1", "SEGAL_SCORE_POOL": "off",
        })  # fmt: skip
        backend = ActiveLearningBackend(settings)
        trained_version(backend, "1")
        warm_up_umap()
        requests = Requests(backend, f"{images.url}/frame.png")
        for _ in range(3):
            requests.one()  # warm: caches, allocator
        client = ls.client()
        projects = [make_project(ls, client, config, pool_images, f"pool {name}") for name in ("gate", "no gate")]
        served = backend.store.current("1")
        for project in projects:  # the trained version serves the pool projects too
            backend.store.publish(str(project), served.model, tuple(CAMVID_CLASSES), extra={},
                                  memory_bank=served.memory_bank, projector=served.projector)  # fmt: skip
        alone = requests.clicks(args.requests)
        rows.append(("alone", alone, ""))
        for nice, pause in ((0, False), (settings.job_nice, False), (settings.job_nice, True)):
            name = f"beside a training process at nice {nice}" + (", paused" if pause else "")
            rows.append((name, beside_training(backend, requests, args.requests, nice, pause), ""))
        for project, gate in zip(projects, (True, False)):
            times, running, state = beside_pool_job(backend, requests, args.requests, project, config, gate)
            note = f"job scored {state['done']} tasks, paused {state['request_wait_seconds']:.1f} s"
            note += "" if running else f" (the job ENDED before the last request: {state['status']} {state['error']})"
            rows.append((f"beside the pool job, {'with' if gate else 'without'} the gate", times, note))
        rows.append(("alone, again", requests.clicks(args.requests), ""))
    reference = statistics.median(alone)
    print(f"/predict of one 480x360 CamVid task, keypoints + brush regions, trained model; {args.requests} requests "
          f"{CLICK_SECONDS} s apart per phase")
    for name, times, note in rows:
        median = statistics.median(times)
        print(f"  {name:<44} median {median * 1000:6.0f} ms  {median / reference:5.2f}x   "
              f"worst {max(times) * 1000:6.0f} ms  {note}")


if __name__ == "__main__":
    main()
