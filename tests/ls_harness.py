"""A real Label Studio, background services and a headless browser for end-to-end tests.

The end-to-end tests run against the genuine article, not a mock: Label Studio 1.23.2 from its
own virtual env (``.venv-label-studio``, installed by ``scripts/setup-test-services.sh``; it
pins versions that conflict with the project's ``.venv``), started on loopback with a fresh
data dir, and Debian's Chromium driven by selenium for screenshots of the labeling UI.

Every process is started in its own session (process group) and stopped by its PID: SIGTERM to
the group, then SIGKILL after a grace period. Nothing is ever stopped by name. An atexit hook
stops whatever a failing test session left running, and on Linux each process also gets SIGTERM
if the test process is killed outright (CI timeouts), so no server outlives the run.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit
from xml.sax.saxutils import quoteattr

import cv2
import httpx
import numpy as np

from model.data import CAMVID_CLASSES

REPO = Path(__file__).resolve().parents[1]
LS_VENV = REPO / ".venv-label-studio"
LS_VERSION = "1.23.2"
ARTIFACTS = REPO / "test-artifacts"  # screenshots and logs worth looking at after a run (git-ignored)
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SETUP_HINT = "run `./run.sh test` or `scripts/setup-test-services.sh` once to install it"

# Label colors for CAMVID_CLASSES, in the same order: the SegNet CamVid palette.
CAMVID_COLORS = (
    "#808080", "#800000", "#c0c080", "#804080", "#3c28de", "#808000",
    "#c08080", "#404080", "#400080", "#404000", "#0080c0",
)  # fmt: skip
# Names used by camvid_label_config(): the Image object and its three controls (from_name).
IMAGE_NAME, KEYPOINT_NAME, BRUSH_NAME, POLYGON_NAME = "image", "point", "brush", "polygon"
# On the labeling page the image and its regions are drawn on Konva canvases; wait for them.
LABELING_CANVAS = ".konvajs-content canvas"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it, so parallel runs do not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"


def _die_with_parent() -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent dies (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the atexit hook still covers a normal exit


class BackgroundProcess:
    """A command running in its own process group, logging to a file, stopped by its PID.

    Used for Label Studio and for the project's backend server alike. ``start()`` returns at
    once; pair it with ``wait_for_http`` to wait until the service answers.
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str | None = None,
    ):
        self.argv = [str(arg) for arg in argv]
        self.log_path = Path(log_path)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> BackgroundProcess:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        if not Path(self.argv[0]).exists() and shutil.which(self.argv[0]) is None:
            raise FileNotFoundError(f"cannot start {self.name}: {self.argv[0]} does not exist")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # A new session makes the PID also the process group id, so stop() reaches every
            # child (servers that fork workers) without looking anything up by name.
            self.process = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        atexit.register(self.stop)
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` s; returns the exit code."""
        process = self.process
        if process is None:
            return None
        atexit.unregister(self.stop)
        if process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                process.wait(timeout)
        # The leader may exit before its children: make sure none of the group outlives it.
        self._signal_group(signal.SIGKILL)
        return process.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the whole group is gone already

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def __enter__(self) -> BackgroundProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def wait_for_http(
    url: str,
    timeout: float,
    process: BackgroundProcess | None = None,
    headers: Mapping[str, str] | None = None,
    interval: float = 0.5,
) -> httpx.Response:
    """Poll ``url`` until it answers 200; fail fast (with the log tail) if ``process`` dies.

    Raises TimeoutError naming the last error seen, so a slow machine and a broken server give
    different messages.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        if process is not None and not process.running:
            code = process.process.returncode if process.process else None
            raise RuntimeError(
                f"{process.name} exited (code {code}) before {url} answered; "
                f"last lines of {process.log_path}:\n{process.log_tail()}"
            )
        try:
            response = httpx.get(url, headers=headers, timeout=5)
            if response.status_code == 200:
                return response
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as error:
            last = f"{type(error).__name__}: {error}"
        if time.monotonic() > deadline:
            tail = f"; last lines of {process.log_path}:\n{process.log_tail()}" if process else ""
            raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s ({last}){tail}")
        time.sleep(interval)


def start_service(
    argv: Sequence[str | os.PathLike],
    log_path: Path,
    health_url: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120.0,
    name: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> BackgroundProcess:
    """Start a server (e.g. ``.venv/bin/segal-backend``) and wait until ``health_url`` answers 200
    (sent with `headers`, e.g. basic auth).

    If it does not come up, it is stopped again before the error propagates, so a failed start
    never leaves a process behind. The caller stops it with ``.stop()``.
    """
    process = BackgroundProcess(argv, log_path, env=env, cwd=cwd, name=name).start()
    try:
        wait_for_http(health_url, timeout, process, headers)
    except BaseException:
        process.stop()
        raise
    return process


class LabelStudioServer:
    """Label Studio on 127.0.0.1 with a fresh data dir, one admin user and a known API token.

    The environment makes a loopback ML backend usable (no SSRF / local-IP blocking), turns
    on the legacy ``Token`` auth for the API token, keeps it offline (no version check, no
    analytics) and keeps it out of $HOME (its config and user id go under the data dir).
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        venv: Path = LS_VENV,
        username: str = "e2e@example.com",
        password: str | None = None,
        token: str | None = None,
    ):
        self.venv = Path(venv)
        self._own_data_dir = data_dir is None  # a temp dir made by start(), removed by stop()
        self.data_dir = Path(data_dir) if data_dir else None
        self.port = port
        self.username = username
        self.password = password or secrets.token_urlsafe(12)
        self.token = token or secrets.token_hex(20)  # any string over 5 chars becomes the token
        self.process: BackgroundProcess | None = None
        self._clients: list = []  # sdk clients handed out; their connections are closed by stop()

    @property
    def executable(self) -> Path:
        return self.venv / "bin" / "label-studio"

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("LabelStudioServer has no port before start()")
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._data("label-studio.log")

    @property
    def document_root(self) -> Path:
        """LOCAL_FILES_DOCUMENT_ROOT: files under it can be served through local-files storage."""
        return self._data("local-files")

    def _data(self, name: str) -> Path:
        if self.data_dir is None:
            raise RuntimeError("LabelStudioServer has no data dir before start()")
        return self.data_dir / name

    @property
    def auth_headers(self) -> dict[str, str]:
        """Headers for API calls and for downloading task files (``/data/upload/...``)."""
        return {"Authorization": f"Token {self.token}"}

    def environment(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("LABEL_STUDIO_")}
        env.update(
            LABEL_STUDIO_USERNAME=self.username,
            LABEL_STUDIO_PASSWORD=self.password,
            LABEL_STUDIO_USER_TOKEN=self.token,
            LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",  # else the Token header gets 401
            ML_BLOCK_LOCAL_IP="false",  # else a backend on 127.0.0.1 is refused
            SSRF_PROTECTION_ENABLED="false",  # else webhooks to 127.0.0.1 are dropped
            LATEST_VERSION_CHECK="false",  # else it calls pypi.org at start
            COLLECT_ANALYTICS="false",
            LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
            LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(self.document_root),
            XDG_CONFIG_HOME=str(self._data("xdg") / "config"),
            XDG_DATA_HOME=str(self._data("xdg") / "data"),
            XDG_CACHE_HOME=str(self._data("xdg") / "cache"),
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self, timeout: float = 180.0) -> LabelStudioServer:
        """Start and wait for ``/health``; a cold start (migrations) takes 30-45 s here."""
        if not self.executable.exists():
            raise FileNotFoundError(f"Label Studio is not installed ({self.executable} is missing): {SETUP_HINT}")
        self.port = self.port or free_port()
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="label-studio-"))
        self.document_root.mkdir(parents=True, exist_ok=True)
        argv = [
            self.executable, "start", "--no-browser",
            "--internal-host", "127.0.0.1", "--host", self.url, "--port", str(self.port),
            "--data-dir", self.data_dir,
        ]  # fmt: skip
        self.process = BackgroundProcess(argv, self.log_path, env=self.environment(), name="label-studio").start()
        try:
            wait_for_http(f"{self.url}/health", timeout, process=self.process)
            # /health answers before the admin user and its token are guaranteed to exist.
            wait_for_http(f"{self.url}/api/projects/?page_size=1", 30, self.process, self.auth_headers)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.close_clients()
        if self.process is not None:
            self.process.stop()
        if self._own_data_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def client(self):
        """A label-studio-sdk 2.x client authenticated with the legacy API token.

        The server keeps a reference and closes its connections in ``stop()`` (or
        ``close_clients()``): a client left to the garbage collector warns "unclosed socket"
        in whatever test happens to run then.
        """
        from label_studio_sdk import LabelStudio

        client = LabelStudio(base_url=self.url, api_key=self.token)
        self._clients.append(client)
        return client

    def close_clients(self) -> None:
        while self._clients:
            self._clients.pop()._client_wrapper.httpx_client.httpx_client.close()

    def labeling_url(self, project_id: int, task_id: int) -> str:
        """The Data Manager with one task open in the labeling UI."""
        return f"{self.url}/projects/{project_id}/data?task={task_id}"

    def absolute(self, url: str) -> str:
        """Task data holds relative URLs (``/data/upload/1/x.png``); make one fetchable."""
        return url if urlsplit(url).scheme else f"{self.url}{url}"

    def download(self, url: str) -> bytes:
        """Fetch a task file the way a backend does: with the ``Token`` header."""
        response = httpx.get(self.absolute(url), headers=self.auth_headers, timeout=30)
        response.raise_for_status()
        return response.content

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def camvid_label_config(
    classes: Sequence[str] = CAMVID_CLASSES,
    colors: Sequence[str] | None = CAMVID_COLORS,
    image_key: str = "image",
) -> str:
    """A labeling config with one Image and KeyPointLabels, BrushLabels, PolygonLabels over it.

    All three controls share the class list, so the backend sees one class order; the control
    names are the module's ``*_NAME`` constants. Colors are used only when given for every class.
    """
    use_colors = colors is not None and len(colors) == len(classes)

    def labels(indent: str) -> str:
        lines = []
        for i, name in enumerate(classes):
            color = f" background={quoteattr(colors[i])}" if use_colors else ""
            lines.append(f"{indent}<Label value={quoteattr(name)}{color}/>")
        return "\n".join(lines)

    controls = [("KeyPointLabels", KEYPOINT_NAME), ("BrushLabels", BRUSH_NAME), ("PolygonLabels", POLYGON_NAME)]
    body = "\n".join(
        f'  <{tag} name="{name}" toName="{IMAGE_NAME}">\n{labels("    ")}\n  </{tag}>' for tag, name in controls
    )
    return f'<View>\n  <Image name="{IMAGE_NAME}" value="${image_key}" zoom="true"/>\n{body}\n</View>'


def _api_target(target, token: str | None) -> tuple[str, dict[str, str]]:
    """Base URL and auth headers from a LabelStudioServer, an sdk client, or a URL plus token."""
    if isinstance(target, LabelStudioServer):
        return target.url, target.auth_headers
    if isinstance(target, str):
        if not token:
            raise ValueError("import_images(url, ...) needs token=<API token>")
        return target.rstrip("/"), {"Authorization": f"Token {token}"}
    wrapper = getattr(target, "_client_wrapper", None)  # label_studio_sdk.LabelStudio
    if wrapper is None:
        raise TypeError(f"expected a LabelStudioServer, a label_studio_sdk client or a URL, got {type(target)}")
    headers = {k: v for k, v in wrapper.get_headers().items() if k.lower() == "authorization"}
    return wrapper.get_base_url().rstrip("/"), headers


def import_images(target, project_id: int, paths: Iterable[Path], token: str | None = None) -> list[int]:
    """Upload image files as new tasks of a project; returns the created task ids in order.

    One multipart POST to ``/api/projects/{id}/import``, each file under its own form field
    name: Label Studio keeps one file per field name, so two files both sent as ``file``
    would import one task.
    """
    base, headers = _api_target(target, token)
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("import_images needs at least one file")
    handles = [open(path, "rb") for path in paths]
    try:
        files = {f"file{i}": (path.name, handle) for i, (path, handle) in enumerate(zip(paths, handles))}
        response = httpx.post(
            f"{base}/api/projects/{project_id}/import",
            params={"return_task_ids": "true"}, files=files, headers=headers, timeout=120,
        )  # fmt: skip
    finally:
        for handle in handles:
            handle.close()
    if response.status_code != 201:
        raise RuntimeError(f"import into project {project_id}: HTTP {response.status_code} {response.text[:500]}")
    task_ids = response.json().get("task_ids", [])
    if len(task_ids) != len(paths):
        raise RuntimeError(f"imported {len(paths)} files, Label Studio created tasks {task_ids}: {response.text[:500]}")
    return task_ids


def screenshot(
    url: str,
    path: Path,
    username: str,
    password: str,
    wait_selector: str | None = None,
    timeout: float = 90.0,
    window_size: tuple[int, int] = (1600, 1000),
    settle: float = 2.0,
) -> Path:
    """Log in to Label Studio in headless Chromium, open ``url`` and save a PNG of the viewport.

    Uses Debian's /usr/bin/chromium with its own /usr/bin/chromedriver: naming the driver makes
    selenium skip Selenium Manager, which would try to download one. Waits for the page, then
    for ``wait_selector`` (CSS) if given and for every <img> on the page to finish loading,
    then ``settle`` seconds for canvases to paint.
    """
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    for binary in (CHROMIUM, CHROMEDRIVER):
        if not Path(binary).exists():
            raise FileNotFoundError(f"{binary} is missing: {SETUP_HINT}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", f"--window-size={window_size[0]},{window_size[1]}",
    ):  # fmt: skip
        options.add_argument(flag)
    # Chromium writes crash-report settings and a dconf cache under $HOME unless told otherwise.
    env = dict(os.environ, XDG_CONFIG_HOME=f"{profile}/xdg-config", XDG_CACHE_HOME=f"{profile}/xdg-cache")
    log = open(path.with_suffix(".chromedriver.log"), "a", encoding="utf-8")  # ours to close, not selenium's
    try:
        service = Service(executable_path=CHROMEDRIVER, log_output=log, env=env)
        driver = webdriver.Chrome(service=service, options=options)
    except BaseException:
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
        raise
    try:
        # --window-size sizes the window, and headless keeps room for browser chrome in it:
        # grow the window by the difference so that the page itself gets ``window_size``.
        inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        driver.set_window_size(2 * window_size[0] - inner[0], 2 * window_size[1] - inner[1])
        driver.set_page_load_timeout(timeout)
        wait = WebDriverWait(driver, timeout)
        # The login form is a plain Django form (email, password, CSRF token in a hidden input
        # and a cookie), so filling it in a real browser handles CSRF by itself.
        driver.get(f"{origin}/user/login/")
        wait.until(ec.presence_of_element_located((By.NAME, "email"))).send_keys(username)
        driver.find_element(By.NAME, "password").send_keys(password)
        driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
        try:
            wait.until(lambda d: "/user/login" not in urlsplit(d.current_url).path)
        except TimeoutException:
            errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".error, .field_errors, .errorlist")]
            raise RuntimeError(f"login to {origin} as {username} failed; the page says: {errors}") from None
        driver.get(url)
        wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
        if "/user/login" in urlsplit(driver.current_url).path:
            raise RuntimeError(f"{url} sent the browser back to the login page (session not accepted)")
        if wait_selector:
            try:
                wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, wait_selector)))
            except TimeoutException:
                driver.save_screenshot(str(path.with_suffix(".timeout.png")))
                raise TimeoutError(
                    f"{wait_selector!r} did not show on {url} within {timeout:.0f} s "
                    f"(page title {driver.title!r}; see {path.with_suffix('.timeout.png')})"
                ) from None
        unloaded = "return Array.from(document.images).filter(i => i.src && !(i.complete && i.naturalWidth > 0))"
        try:
            wait.until(lambda d: not d.execute_script(unloaded + ".length"))
        except TimeoutException:
            broken = driver.execute_script(unloaded + ".map(i => i.src)")
            raise TimeoutError(f"images on {url} did not load within {timeout:.0f} s: {broken}") from None
        time.sleep(settle)
        if not driver.save_screenshot(str(path)):
            raise RuntimeError(f"chromium could not save a screenshot of {url} to {path}")
    finally:
        driver.quit()
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
    return path


def locate_image(screenshot_path: Path, image_path: Path, scales: Sequence[float] | None = None):
    """Find a photo, shown scaled, in a screenshot: ``(score, (x, y, width, height))``.

    Template matching (normalized correlation, grayscale) over a range of display scales; a
    score near 1 means the photo is on screen, and the box is where, in screenshot pixels
    (for instance to crop the region where predictions are drawn).
    """
    shot = cv2.imread(str(screenshot_path), cv2.IMREAD_GRAYSCALE)
    photo = cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE)
    for name, array in ((screenshot_path, shot), (image_path, photo)):
        if array is None:
            raise FileNotFoundError(f"cannot read an image from {name}")
    best: tuple[float, tuple[int, int, int, int]] = (-1.0, (0, 0, 0, 0))
    for scale in np.linspace(0.5, 3.0, 51) if scales is None else scales:
        width, height = round(photo.shape[1] * scale), round(photo.shape[0] * scale)
        if width > shot.shape[1] or height > shot.shape[0] or min(width, height) < 8:
            continue
        template = cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)
        _, score, _, (x, y) = cv2.minMaxLoc(cv2.matchTemplate(shot, template, cv2.TM_CCOEFF_NORMED))
        if score > best[0]:
            best = (float(score), (x, y, width, height))
    return best
