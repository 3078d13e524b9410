"""model.process: numpy's and scipy's OpenBLAS on one thread, unless the environment says otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json
import numpy as np, scipy.linalg
from threadpoolctl import threadpool_info
from model.process import prepare_process

def blas_threads():
    return sorted(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")

before = blas_threads()
prepare_process()
after = blas_threads()
a = np.random.default_rng(0).random((300, 300))
print(json.dumps({"before": before, "after": after, "product_ok": bool(np.allclose(a @ np.eye(300), a))}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env={**clean, **env}, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_numpy_blas_runs_on_one_thread():
    result = _probe(OPENBLAS_NUM_THREADS="")  # empty: as unset
    assert result["after"] and all(threads == 1 for threads in result["after"]), result
    assert result["product_ok"]


def test_openblas_setting_in_the_environment_wins():
    result = _probe(OPENBLAS_NUM_THREADS="2")
    assert result["after"] == result["before"] and max(result["after"]) == 2, result
