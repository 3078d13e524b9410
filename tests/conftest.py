"""Shared fixtures. Real CamVid is part of the test setup: a missing copy fails, never skips."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "e2e: end-to-end test against a real Label Studio (and a headless Chromium) that the tests "
        "start themselves; slow (the first one pays a 30-45 s Label Studio cold start)",
    )


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """<repo>/test-artifacts (git-ignored): screenshots and service logs to look at after a run."""
    from ls_harness import ARTIFACTS

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory, artifacts_dir: Path):
    """One real Label Studio for the whole session, on a free loopback port with a fresh data dir.

    Not installed is a failure, not a skip: the e2e tests are part of the suite. Its log is
    copied to test-artifacts/label-studio.log when the session ends.
    """
    from ls_harness import SETUP_HINT, LabelStudioServer

    server = LabelStudioServer(data_dir=tmp_path_factory.mktemp("label-studio"))
    if not server.executable.exists():
        pytest.fail(f"Label Studio is not installed ({server.executable} is missing): {SETUP_HINT}.", pytrace=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.copyfile(server.log_path, artifacts_dir / "label-studio.log")


@pytest.fixture(scope="session")
def image_server(camvid_dir):
    """CamVid served over real HTTP on loopback."""
    handler = functools.partial(_QuietHandler, directory=str(camvid_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
