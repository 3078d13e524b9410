"""model.malloc: freed tensor memory stays in the process (glibc), and the opt-outs hold."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's"
)

# A fresh process: apply (or not), then free a 24 MiB tensor and see whether its pages stay resident.
PROBE = """
import json
import numpy as np
from model.malloc import keep_freed_memory

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

applied = keep_freed_memory()
before = rss_mib()
block = np.ones(3 * 1024 * 1024)  # 24 MiB, written
held = rss_mib()
del block
print(json.dumps({"applied": applied, "held": held - before, "after_free": rss_mib() - before}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "SEGAL_MALLOC"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env={**clean, **env}, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("setting", [None, "", "keep"])  # "": what docker/compose.yml passes when unset
def test_freed_memory_stays_resident_for_reuse(setting):
    result = _probe() if setting is None else _probe(SEGAL_MALLOC=setting)
    assert result["applied"] is True
    assert result["held"] > 20
    assert result["after_free"] > 20  # the pages were kept: the next tensor reuses them without faults


def test_glibc_defaults_return_a_freed_block():
    result = _probe(SEGAL_MALLOC="default")
    assert result["applied"] is False
    assert result["held"] > 20
    assert result["after_free"] < 4  # unmapped on free: what makes every forward fault its pages in again


def test_glibc_settings_in_the_environment_win():
    result = _probe(MALLOC_TRIM_THRESHOLD_="131072")
    assert result["applied"] is False
    assert result["after_free"] < 4


def test_an_unknown_choice_keeps_the_defaults():
    assert _probe(SEGAL_MALLOC="fast")["applied"] is False
