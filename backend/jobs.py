"""What the background jobs (training, pool scoring) share."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def wait_for_job(current_thread: Callable[[], threading.Thread | None], timeout: float | None = None) -> None:
    """Block until the job thread that `current_thread()` names has ended, or `timeout` s.

    The thread is asked for again after each join: a job that queues a follow-up may run it
    in a new thread.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        thread = current_thread()
        if thread is None or not thread.is_alive():
            return
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if deadline is not None and time.monotonic() >= deadline:
            return
