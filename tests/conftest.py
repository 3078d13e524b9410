"""Shared fixtures. Real CamVid is part of the test setup: a missing copy fails, never skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CAMVID = REPO.parent / "shared" / "datasets" / "camvid"


@pytest.fixture(scope="session")
def camvid_dir() -> Path:
    """CamVid root (train/, trainannot/, val/, valannot/): $CAMVID_DIR or <repo>/../shared/datasets/camvid."""
    root = Path(os.environ.get("CAMVID_DIR", DEFAULT_CAMVID))
    if not (root / "train").is_dir() or not (root / "trainannot").is_dir():
        pytest.fail(
            f"CamVid not found at {root} (needs train/ and trainannot/). Set CAMVID_DIR to the folder "
            "holding the SegNet-layout CamVid split; these tests need the real data.",
            pytrace=False,
        )
    return root
