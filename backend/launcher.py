"""Start a training run as a process of its own, follow it, and say why it failed.

``TrainingProcess(manifest, procs).start()`` runs ``python -m backend.train_job MANIFEST``
(one process), or the same under ``torchrun --standalone --nproc-per-node N`` (N ranks on
this machine), or the command in ``SEGAL_TRAIN_COMMAND`` (a cluster launcher, README
"Training as a job"). Its stdout and stderr go to the run folder's ``train.log``; its
progress comes back through ``progress.jsonl`` (``records()``).

No orphans: the child is started in a session of its own (so ``stop()`` reaches it and what
it started through its process group) with ``PR_SET_PDEATHSIG`` (Linux), so it gets SIGTERM
when the thread that started it ends, i.e. when the backend dies, however it dies; the
backend's training thread waits for the child, so the signal never comes earlier. torchrun
starts its ranks in sessions of their own: each rank sets the same signal on itself
(``die_with_parent`` in ``backend.train_job``), so a SIGKILLed torchrun takes its ranks with it.
A restarted backend also kills what a recorded pid file names (``backend.runs``).

Standard library only: the training command imports this module in every rank.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

LOG_NAME = "train.log"
LAUNCHER_PID_NAME = "launcher.pid"
JOB_MODULE = "backend.train_job"
_PR_SET_PDEATHSIG = 1
_ERROR_PREFIX = "segal-train: error: "  # backend.train_job.ERROR_PREFIX (not imported: it pulls in torch)
_TORCHRUN_WORKER_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")
_TORCHRUN_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_TAIL_LINES = 6
_TAIL_CHARS = 800

try:  # loaded before any fork: the child between fork and exec must not load libraries
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> bool:
    """Ask Linux to send `sig` to this process when its parent (thread) exits; False elsewhere."""
    if _prctl is None:
        return False
    return _prctl(_PR_SET_PDEATHSIG, int(sig)) == 0


def _child_setup(parent_pid: int, nice: int) -> None:
    """In the child, between fork and exec: lower its CPU priority by `nice` (what it starts
    inherits it), and die with the backend (Linux); if the backend died in between, go now."""
    if nice:
        os.nice(nice)
    if _prctl is not None:
        die_with_parent()
        if os.getppid() != parent_pid:
            os._exit(1)


_PLACEHOLDERS = ("manifest", "procs", "python")


def check_command_template(name: str, template: str, error=ValueError) -> str:
    """`template` stripped, or `error` naming `name` when it cannot launch a run."""
    template = template.strip()
    if not template:
        return ""
    try:
        words = shlex.split(template)
        for word in words:
            word.format(**{key: "" for key in _PLACEHOLDERS})
    except (ValueError, KeyError, IndexError) as problem:
        raise error(
            f"{name}={template[:100]!r} is not a command with {{manifest}}, {{procs}} or {{python}} in it "
            f"({type(problem).__name__}: {problem}); write e.g. 'sbatch --wait train.sbatch {{manifest}}'."
        ) from None
    if not any("{manifest}" in word for word in words):
        raise error(
            f"{name} must name the run's manifest as {{manifest}}, e.g. 'sbatch --wait train.sbatch {{manifest}}'."
        )
    return template


def training_command(manifest: Path, procs: int, command_template: str = "", module: str = JOB_MODULE) -> list[str]:
    """The argv of a run: `command_template` (``{manifest}``, ``{procs}``, ``{python}``
    replaced in each word) when given, else ``python -m module`` alone (1 process) or under
    torchrun (N)."""
    manifest = str(manifest)
    if command_template.strip():
        values = {"manifest": manifest, "procs": str(procs), "python": sys.executable}
        return [word.format(**values) for word in shlex.split(command_template)]
    if procs <= 1:
        return [sys.executable, "-m", module, manifest]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
        "-m", module, manifest,
    ]  # fmt: skip


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class TrainingProcess:
    """One run's process: start, follow its progress records, wait, stop, explain a failure.

    `module` and `log_name` serve the pool-scoring job too (``backend.score_job``), and
    `extra_env` adds variables to the inherited environment (the scoring job's API key).
    `nice` (SEGAL_JOB_NICE) is added to the process's nice value: on a CPU the job and the
    server's requests share the cores, and a forward loop in a process at the same priority
    made a /predict about 5x slower on 2 cores (README, "Requests first"); a niced job still
    takes every cycle the requests leave."""

    def __init__(
        self, manifest: Path, procs: int = 1, command_template: str = "", cpu: bool = True,
        module: str = JOB_MODULE, log_name: str = LOG_NAME, extra_env: dict[str, str] | None = None,
        kind: str = "training", nice: int = 0,
    ):  # fmt: skip
        self.manifest = Path(manifest).resolve()
        self.folder = self.manifest.parent
        self.procs = procs
        self.argv = training_command(self.manifest, procs, command_template, module)
        self.cpu = cpu
        self.extra_env = dict(extra_env or {})
        self.kind = kind  # "training" or "scoring", in failure messages
        self.nice = nice
        self.log_path = self.folder / log_name
        self.progress_path = self.folder / "progress.jsonl"
        self.process: subprocess.Popen | None = None
        self._offset = 0
        self._partial = b""
        self.failed_event: dict | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        if self.procs > 1 and self.cpu and "OMP_NUM_THREADS" not in os.environ:
            # torchrun would give every rank 1 thread; share the cores out instead
            env["OMP_NUM_THREADS"] = str(max(1, _cpu_count() // self.procs))
        if self.procs > 1 and self.cpu and "NUMBA_NUM_THREADS" not in os.environ:
            # numba's parallel kernels (BalEnt) take every core by default, and its OpenMP layer
            # then raises torch's thread count in that rank too: 2 ranks ran 15x slower on 2 cores
            env["NUMBA_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
        return env

    def start(self) -> TrainingProcess:
        parent = os.getpid()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                start_new_session=True, close_fds=True,
                preexec_fn=(lambda: _child_setup(parent, self.nice)) if _prctl is not None or self.nice else None,
            )  # fmt: skip
        record = {"pid": self.process.pid, "host": socket.gethostname(), "argv": self.argv, "started": time.time()}
        (self.folder / LAUNCHER_PID_NAME).write_text(json.dumps(record))
        return self

    def records(self) -> list[dict]:
        """The progress records written since the last call (whole lines only)."""
        try:
            with open(self.progress_path, "rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an unfinished line: the rest comes with the next read
        found = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                if record.get("event") == "failed" and self.failed_event is None:
                    self.failed_event = record
                found.append(record)
        return found

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the run's process group (torchrun passes it on to its ranks), SIGKILL after `grace` s."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            self.resume()  # a paused process acts on SIGTERM only once it runs again
            if self.wait(grace) is not None:
                break
        return self.process.returncode

    def pause(self) -> None:
        """Stop the job where it is (SIGSTOP to its process group and its ranks), e.g. while the
        server answers a request (``backend.gate``); ``resume`` continues it."""
        self._signal_job(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_job(signal.SIGCONT)

    def _signal_job(self, sig: signal.Signals) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        from .runs import recorded_processes  # stdlib only, like this module

        for pid in recorded_processes(self.folder):  # torchrun's ranks run in sessions of their own
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def log_tail(self, lines: int = 40) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def failure(self, returncode: int) -> str:
        """Why the run failed, in one message: how the process ended, and the training's own
        error line if it wrote one, else the last lines of its output."""
        self.records()  # a "failed" record written just before the exit
        if returncode < 0:
            name = _signal_name(-returncode)
            how = f"was killed by {name}"
            if -returncode == signal.SIGKILL:
                how += " (the kernel's out-of-memory killer sends SIGKILL too: see `dmesg`)"
        else:
            how = f"exited with code {returncode}"
        tail = self.log_tail()
        root_rank, root_code = _torchrun_root_cause(tail)
        if root_code is not None and root_code < 0:  # the others' errors only follow from it
            reason = f"rank {root_rank} was killed by {_signal_name(-root_code)}"
            if -root_code == signal.SIGKILL:
                reason += " (the kernel's out-of-memory killer sends SIGKILL too: see `dmesg`)"
            return f"the {self.kind} process {how}: {reason}"
        reason = self.failed_event.get("error") if self.failed_event else None
        if not reason:
            reason = next((line.split(_ERROR_PREFIX, 1)[1] for line in reversed(tail) if _ERROR_PREFIX in line), None)
        if not reason:
            reason = "last lines of its output: " + " | ".join(line.strip() for line in tail[-_TAIL_LINES:])
            reason = reason[-_TAIL_CHARS:] if tail else "it wrote no output"
        return f"the {self.kind} process {how}: {reason}"


def _torchrun_root_cause(lines: list[str]) -> tuple[str | None, int | None]:
    """(rank, exit code) of the "Root Cause (first observed failure)" in torchrun's report."""
    starts = [index for index, line in enumerate(lines) if "Root Cause" in line]
    if not starts:
        return None, None
    rank, code = None, None
    for line in lines[starts[-1] :]:
        if rank is None and (match := _TORCHRUN_RANK.search(line)):
            rank = match.group(1)
        if code is None and (match := _TORCHRUN_WORKER_EXIT.search(line)):
            code = int(match.group(1))
    return rank, code


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
