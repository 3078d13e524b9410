"""Process-wide settings for a process that runs the network on a CPU's cores.

``prepare_process()`` is called first thing by every entry point that runs the network (the
server's worker, ``segal-train``, ``segal-score``, the simulation, the benchmarks):

- freed memory stays in the process (``model.malloc``);
- numpy's and scipy's OpenBLAS run on the calling thread only. Their worker threads spin for
  a while after every BLAS call (OpenBLAS's thread timeout, about 0.1 s), on the cores torch
  computes on: measured here (2 cores), the plain forward right after a /predict that had
  placed its regions (a numpy matrix product) took 112 ms against 59 ms for the one after
  it. The BLAS calls of this project are small (the region projector's placement, KMeans
  over a few hundred points) and gain nothing from a second thread. torch's own kernels do
  not use these libraries. ``OPENBLAS_NUM_THREADS`` in the environment wins.
"""

from __future__ import annotations

import os

from .malloc import keep_freed_memory

BLAS_THREADS_SETTING = "OPENBLAS_NUM_THREADS"


def single_threaded_numpy_blas() -> bool:
    """Limit the loaded OpenBLAS copies (numpy's, scipy's) to one thread; True when done."""
    if os.environ.get(BLAS_THREADS_SETTING, "").strip():
        return False
    import numpy  # noqa: F401 - loads its OpenBLAS, so that threadpoolctl finds it
    from threadpoolctl import threadpool_limits

    try:
        import scipy.linalg  # noqa: F401 - scipy brings a second OpenBLAS copy
    except ImportError:
        pass
    threadpool_limits(limits=1, user_api="blas")  # not as a context manager: for the process
    return True


def prepare_process() -> None:
    """Apply the settings above to this process (call it once, first thing)."""
    keep_freed_memory()
    single_threaded_numpy_blas()
