"""Requests first (backend/gate.py, SEGAL_JOB_NICE in backend/launcher.py): the server's
background work waits while a /predict computes, a training process is stopped meanwhile,
and the jobs the backend starts as processes run niced. Real threads, a real /predict over
loopback HTTP, real child processes, a real training run. (The pool job's pause is tested
against Label Studio in tests/test_pool.py.)"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from backend.app import create_app
from backend.config import ConfigError, Settings
from backend.gate import RequestGate
from backend.launcher import TrainingProcess
from backend.service import ActiveLearningBackend
from loopback import RecordingServer, png_bytes
from test_backend import FULL_CONFIG, IMAGES, make_settings
from test_trainer import backend_with, clicks


def test_background_work_waits_until_every_request_has_ended():
    gate = RequestGate()
    assert gate.wait_for_requests() == 0.0  # nothing computes: no wait
    first, second = gate.request(), gate.request()
    first.__enter__()
    second.__enter__()
    waited = []
    worker = threading.Thread(target=lambda: waited.append(gate.wait_for_requests()))
    worker.start()
    time.sleep(0.3)
    first.__exit__(None, None, None)
    time.sleep(0.3)
    assert worker.is_alive()  # one request still computes
    second.__exit__(None, None, None)
    worker.join(5)
    assert not worker.is_alive() and waited[0] >= 0.55 and not gate.busy


def test_a_cancelled_job_stops_waiting():
    gate = RequestGate()
    cancelled = threading.Event()
    with gate.request():
        waited = []
        worker = threading.Thread(target=lambda: waited.append(gate.wait_for_requests(cancelled)))
        worker.start()
        time.sleep(0.2)
        cancelled.set()
        worker.join(5)
        assert not worker.is_alive() and gate.busy  # it left while the request still ran


def test_a_predict_holds_the_gate_while_it_works(tmp_path):
    """The image arrives a byte at a time: the request is under way for seconds, and the gate
    says so until it answers."""
    image = png_bytes(12, 16, seed=1)  # about 700 bytes: a second and a half
    with RecordingServer({"/slow.png": image}, trickle_delay=0.002) as server:
        backend = ActiveLearningBackend(make_settings(tmp_path))
        client = create_app(backend.settings, backend).test_client()
        answers = []
        body = {"tasks": [{"id": 1, "data": {"image": f"{server.url}/trickle/slow.png"}}], "project": "5.1",
                "label_config": FULL_CONFIG}  # fmt: skip
        request = threading.Thread(target=lambda: answers.append(client.post("/predict", json=body)))
        assert not backend.predictor.gate.busy
        request.start()
        deadline = time.monotonic() + 10
        while not backend.predictor.gate.busy and time.monotonic() < deadline:
            time.sleep(0.005)
        busy_while_downloading = backend.predictor.gate.busy and request.is_alive()
        request.join(60)
    assert busy_while_downloading
    assert answers[0].status_code == 200 and answers[0].get_json()["results"][0]["result"]
    assert not backend.predictor.gate.busy


def _child_nice(tmp_path, nice: int) -> int:
    """The nice value a TrainingProcess child runs at (it writes os.nice(0) next to its manifest)."""
    manifest = tmp_path / f"nice-{nice}" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text("{}")
    command = "{python} -c \"import os, sys; open(sys.argv[1] + '.nice', 'w').write(str(os.nice(0)))\" {manifest}"
    process = TrainingProcess(manifest, command_template=command, nice=nice).start()
    assert process.wait(60) == 0, process.log_tail()
    return int((manifest.parent / "manifest.json.nice").read_text())


def test_jobs_run_niced(tmp_path):
    own = os.nice(0)
    assert _child_nice(tmp_path, 0) == own
    assert _child_nice(tmp_path, 7) == min(19, own + 7)
    assert Settings.from_env({}).job_nice == 19
    assert Settings.from_env({"SEGAL_JOB_NICE": "0"}).job_nice == 0


@pytest.mark.parametrize("value", ["-5", "20", "low"])
def test_job_nice_outside_0_to_19_is_refused(value):
    with pytest.raises(ConfigError, match="SEGAL_JOB_NICE"):
        Settings.from_env({"SEGAL_JOB_NICE": value})


def _state(pid: int) -> str:
    """The process's state letter from /proc (R running, S sleeping, T stopped...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _spinning_process(tmp_path) -> TrainingProcess:
    manifest = tmp_path / "spin" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text("{}")
    command = "{python} -c \"while True: pass\" {manifest}"
    return TrainingProcess(manifest, command_template=command).start()


def _wait_for_state(pid: int, states: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while _state(pid) not in states and time.monotonic() < deadline:
        time.sleep(0.01)
    return _state(pid)


def test_a_job_process_is_stopped_while_requests_compute(tmp_path):
    gate = RequestGate()
    process = _spinning_process(tmp_path)
    try:
        assert _wait_for_state(process.pid, "R") == "R"
        with gate.pausing(process):
            assert _state(process.pid) == "R"  # no request: it runs
            with gate.request():
                assert _wait_for_state(process.pid, "T") == "T"
                with gate.request():  # a second request at once: still stopped after the first ends
                    pass
                assert _state(process.pid) == "T"
            assert _wait_for_state(process.pid, "R") == "R"
            with gate.request():
                assert _wait_for_state(process.pid, "T") == "T"
                stopping = time.monotonic()
                assert process.stop(grace=5) == -15  # a stopped job still ends on SIGTERM, at once
                assert time.monotonic() - stopping < 2.0
    finally:
        process.stop(grace=1)


def test_a_job_registered_during_a_request_starts_stopped_and_is_never_left_stopped(tmp_path):
    gate = RequestGate()
    process = _spinning_process(tmp_path)
    try:
        with gate.request():
            with gate.pausing(process):
                assert _wait_for_state(process.pid, "T") == "T"
            # the job left the gate while a request still computes: it runs again
            assert _wait_for_state(process.pid, "R") == "R"
    finally:
        process.stop(grace=1)


def test_a_training_run_on_the_cpu_waits_for_the_requests(tmp_path, image_server, camvid_dir):
    """Through the backend's trainer: while a request holds the gate, the training process is
    stopped and makes no step; when it ends, the run goes on and publishes its version."""
    annotation = clicks(camvid_dir, IMAGES[0], 20, 1)
    tasks = [{"id": 1, "data": {"image": f"{image_server}/train/{IMAGES[0]}"}, "annotations": [annotation]}]
    backend = backend_with(tmp_path, tasks)
    with backend.predictor.gate.request():
        backend.fit("START_TRAINING", {"project": {"id": 6}})
        deadline = time.monotonic() + 120
        state = {}
        while time.monotonic() < deadline:
            state = backend.trainer.states()["6"]
            if state["pid"] is not None and _state(state["pid"]) == "T":
                break
            time.sleep(0.05)
        assert state["pid"] is not None and _state(state["pid"]) == "T", state
        time.sleep(1.0)
        assert backend.trainer.states()["6"]["step"] == 0
    backend.trainer.wait("6", timeout=300)
    state = backend.trainer.states()["6"]
    assert state["status"] == "succeeded" and state["step"] == state["total_steps"] == 2, state["error"]
