"""Requests first: the server's background work gives way while a request computes.

On a CPU the server's requests and its background work share the cores and the memory
system. Measured on 2 cores (``./run.sh bench-busy``, README "Requests first"), a /predict
took 1.65-1.74x its time alone beside a training process at nice 0, as long at nice 19
(and 2.3x in a probe under SCHED_IDLE: what slows it is not only its share of CPU time), and
1.6-2.0x beside the pool job's thread. So the background work stops while a request
computes (1.2x and 1.3-1.4x then):

- ``/predict`` holds ``RequestGate.request()`` while it works;
- the pool job and the score-scale fit, threads of the server, call
  ``wait_for_requests()`` before each task's network pass: a request that arrives
  mid-task shares the machine only with the rest of that task;
- a training or scoring process on the CPU is registered with ``pausing(process)``: it is
  stopped (SIGSTOP) when the first request begins and continued (SIGCONT) when the last one
  ends, so it loses only the requests' time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

CHECK_CANCEL_SECONDS = 0.25  # how often a waiting job looks at its cancel flag


class Pausable(Protocol):
    def pause(self) -> None: ...

    def resume(self) -> None: ...


class RequestGate:
    def __init__(self) -> None:
        self._requests = 0
        self._idle = threading.Condition()
        self._jobs: list[Pausable] = []

    @contextmanager
    def request(self) -> Iterator[None]:
        """Hold while a request computes (requests never wait for one another here)."""
        with self._idle:
            self._requests += 1
            if self._requests == 1:
                for job in self._jobs:
                    job.pause()
        try:
            yield
        finally:
            with self._idle:
                self._requests -= 1
                if self._requests == 0:
                    for job in self._jobs:
                        job.resume()
                    self._idle.notify_all()

    @property
    def busy(self) -> bool:
        return self._requests > 0

    def wait_for_requests(self, cancelled: threading.Event | None = None) -> float:
        """Block until no request computes (or `cancelled` is set); the seconds waited (0.0
        when none did)."""
        with self._idle:
            if not self._requests:
                return 0.0
            start = time.monotonic()
            while self._requests and not (cancelled is not None and cancelled.is_set()):
                self._idle.wait(CHECK_CANCEL_SECONDS)
            return time.monotonic() - start

    @contextmanager
    def pausing(self, job: Pausable) -> Iterator[None]:
        """Inside the block, `job` is paused while requests compute (at once, if one does now);
        it is left running when the block ends, whatever happened."""
        with self._idle:
            self._jobs.append(job)
            if self._requests:
                job.pause()
        try:
            yield
        finally:
            with self._idle:
                self._jobs.remove(job)
            job.resume()
