"""Run folders and the training lock of a project, shared by every backend replica.

``<MODEL_DIR>/<project>/training.lock``: the replica that trains a project holds an exclusive
``flock`` on it for the whole run (collecting, training, publishing). A second replica with the
same ``MODEL_DIR`` finds it taken, reports "training running in another replica" and waits
for it instead of starting a second training. The kernel releases a flock when its holder
dies, however it dies, so a crashed replica never leaves the project locked. flock works on
local disks and on NFSv4, CephFS, Lustre and most cluster file systems; not on NFSv3 without
a lock daemon.

``<MODEL_DIR>/<project>/runs/<run>/``: one training run's folder (``backend.train_job``).
The trainer removes it when the run ends, keeping its log as ``last-training.log``. A folder
left behind belongs to a backend that died during a run: whoever next takes the lock removes
it, after killing the processes its pid files name, if they still run on this host with that
run folder on their command line (so a pid reused by another program is never signalled).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "training.lock"
RUNS_DIR = "runs"
LAST_LOG_NAME = "last-training.log"
STOP_GRACE_SECONDS = 5.0


class TrainingLock:
    """An exclusive, non-blocking flock on ``<project dir>/training.lock``; the holder writes
    who it is into the file, for the replicas that find it taken."""

    def __init__(self, project_dir: Path):
        self.path = Path(project_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by children (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it ("pid 12 on host-a since 10:02:03 UTC")."""
        try:
            data = json.loads(self.path.read_text())
            since = datetime.fromtimestamp(float(data["since"]), timezone.utc).strftime("%H:%M:%S UTC")
            return f"pid {int(data['pid'])} on {str(data['host'])[:60]} since {since}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def __enter__(self) -> TrainingLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


OWNER_NAME = "owner.json"  # the backend process that made a folder: {"host", "pid"}


def new_run_folder(project_dir: Path, kind: str = RUNS_DIR) -> Path:
    """``<project dir>/<kind>/<UTC time>-<pid>-<hex>/`` (kind: ``runs`` for training, ``scoring``
    for a sharded pool job), with its owner recorded."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = Path(project_dir) / kind / f"{stamp}-{os.getpid()}-{secrets.token_hex(3)}"
    folder.mkdir(parents=True)
    (folder / OWNER_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    return folder


def finish_run(folder: Path, log_name: str = "train.log", kept_name: str = LAST_LOG_NAME) -> Path | None:
    """Keep the run's log as ``<project dir>/<kept_name>``, remove the folder; returns the log's path."""
    folder = Path(folder)
    kept = folder.parent.parent / kept_name
    try:
        os.replace(folder / log_name, kept)
    except OSError:
        kept = None
    shutil.rmtree(folder, ignore_errors=True)
    return kept


def clean_stale_runs(project_dir: Path) -> int:
    """Remove the run folders a dead backend left, killing their processes first; call with the
    project's TrainingLock held (no live backend owns them then). Returns the folders removed."""
    runs = Path(project_dir) / RUNS_DIR
    try:
        folders = [path for path in runs.iterdir() if path.is_dir()]
    except OSError:
        return 0
    for folder in folders:
        _remove_stale(folder)
    return len(folders)


def _remove_stale(folder: Path) -> None:
    """Stop the processes a dead backend's job folder records, then remove the folder."""
    pids = recorded_processes(folder)
    if pids:
        log.warning("%s: stopping the processes %s left by a backend that died", folder, pids)
        _stop(pids)
    shutil.rmtree(folder, ignore_errors=True)
    log.info("removed the stale job folder %s", folder)


def clean_stale_folders(directory: Path) -> int:
    """Remove the job folders under `directory` whose owner (a backend process on this host) is
    gone, stopping the processes they record first. Folders of other hosts' backends are theirs
    to clean; a live owner's folder is its job. Returns the folders removed."""
    try:
        folders = [path for path in Path(directory).iterdir() if path.is_dir()]
    except OSError:
        return 0
    removed = 0
    for folder in folders:
        try:
            owner = json.loads((folder / OWNER_NAME).read_text())
            host, pid = owner["host"], int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            if time.time() - _mtime(folder) < STALE_UNOWNED_SECONDS:
                continue  # being made right now
            host, pid = socket.gethostname(), 0  # half made: its owner died before writing it
        if host != socket.gethostname() or (pid > 1 and _alive(pid)):
            continue
        _remove_stale(folder)
        removed += 1
    return removed


STALE_UNOWNED_SECONDS = 60.0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def recorded_processes(folder: Path) -> list[int]:
    """Pids named in the folder's pid files (the launcher's, each rank's) that are still this
    run's processes on this host."""
    pids = []
    for path in folder.glob("*.pid"):
        try:
            text = path.read_text().strip()
            record = json.loads(text) if text.startswith("{") else {"pid": int(text)}
            pid, host = int(record["pid"]), record.get("host")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if host not in (None, socket.gethostname()) or pid <= 1:
            continue
        if _runs_in(pid, folder):
            pids.append(pid)
    return sorted(set(pids))


def _runs_in(pid: int, folder: Path) -> bool:
    """Whether process `pid` has `folder` on its command line (Linux /proc); never guess elsewhere."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return str(folder.resolve()) in command


def _stop(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
                # a job paused for a request (backend.gate) acts on SIGTERM only once continued
                os.kill(pid, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)
        if not any(_alive(pid) for pid in pids):
            return


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


# -- one run, from manifest to checkpoint (imports torch: the backend only) ----------------

POLL_SECONDS = 0.5  # how often the progress file is read while the run goes


class TrainingFailed(RuntimeError):
    """The training process did not produce a model; the message says how it ended and why."""


def run_training(
    project_dir: Path,
    *,
    classes,
    model_config,
    train_config,
    samples,
    device: str,
    init_checkpoint: Path | None,
    procs: int,
    command_template: str = "",
    on_record=None,
    on_start=None,
    nice: int = 0,
    gate=None,
):
    """Train in a process of its own and load what it wrote: ``(model to serve, memory bank,
    the run's summary)``. `on_record(record)` gets each progress record ("started", "step"),
    `on_start(process)` the started ``TrainingProcess``; `nice`: its lower CPU priority
    (SEGAL_JOB_NICE); `gate`: a ``backend.gate.RequestGate`` that pauses the process while
    requests compute (a training on the server's own CPU). Raises ``TrainingFailed``."""
    from model.checkpoint import load_checkpoint

    from .launcher import TrainingProcess
    from .train_job import OUTPUT_NAME, write_manifest

    folder = new_run_folder(project_dir)
    process = None
    failure = None
    try:
        manifest = write_manifest(
            folder, classes=classes, model_config=model_config, train_config=train_config, samples=samples,
            device=device, init_checkpoint=init_checkpoint,
        )  # fmt: skip
        process = TrainingProcess(manifest, procs, command_template, cpu=device.startswith("cpu"), nice=nice).start()
        if on_start is not None:
            on_start(process)
        with gate.pausing(process) if gate is not None else contextlib.nullcontext():
            while True:
                code = process.wait(POLL_SECONDS)
                for record in process.records():
                    if on_record is not None:
                        on_record(record)
                if code is not None:
                    break
        if code != 0:
            failure = process.failure(code)
        else:
            try:
                model, meta = load_checkpoint(folder / OUTPUT_NAME, map_location=device)
            except (OSError, ValueError) as error:
                failure = f"the training process exited 0 but its checkpoint does not load: {error}"
            else:
                return model.eval(), meta["memory_bank"], meta.get("extra", {})
    finally:
        if process is not None:
            process.stop()  # only when this thread failed while the process runs
        kept = finish_run(folder)
    raise TrainingFailed(f"{failure} (log: {kept})" if kept else failure)
