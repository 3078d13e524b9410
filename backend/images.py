"""Fetching task images: Label Studio uploads, local-files storage, plain http(s).

Relative URLs (``/data/upload/...``, ``/data/local-files/?d=...``) belong to Label Studio
and are fetched from ``LABEL_STUDIO_URL`` with the API key. Absolute URLs are fetched only
from the Label Studio host or a host listed in ``SEGAL_ALLOWED_HOSTS`` (``*`` allows any):
a backend that downloads whatever URL a task names can be pointed at internal services.
Every URL goes through one policy (``backend.urls``) and the HTTP client is handed the
checked pieces, so what was checked is what is contacted. The key is sent to the Label
Studio origin (scheme, host and port) only; redirects are never followed.

Untrusted images are bounded before they cost anything: the bytes (``SEGAL_MAX_IMAGE_MB``),
the total download time (``SEGAL_DOWNLOAD_TIMEOUT``, one deadline across connect and every
read, so a server trickling a byte a second cannot hold a thread), the downloads running at
once (``SEGAL_MAX_DOWNLOADS``, so slow servers cannot take every request thread), and the
pixels (``SEGAL_MAX_IMAGE_MEGAPIXELS``, read from the file header before anything is decoded,
so a small compressed "bomb" never reaches the decoder).

Downloads are cached on disk by URL (written to a temporary name, then renamed), so every
prediction and every training run after the first reads the local copy. The cache is best
effort: when it cannot be written the prediction still uses the downloaded bytes.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import json
import logging
import os
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import cv2
import numpy as np
import torch
from PIL import Image

from model.files import remove_interrupted_writes

from .config import Settings
from .urls import Target, UnsafeURL, host_allowed, parse_target, shorten

log = logging.getLogger(__name__)

ACCESS_TOKEN_SECONDS = 240  # personal access tokens give 5-minute access tokens; renew early
# Formats whose header PIL reads and that OpenCV decodes by the same signature: the size read
# from the header is then the size the decoder allocates.
DECODABLE_FORMATS = {"PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000", "SUN", "DIB"}


class ImageFetchError(RuntimeError):
    """The image could not be obtained; the message says why and what to change."""


@dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def http_request(
    target: Target,
    *,
    deadline: float,
    max_bytes: int,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> _Answer:
    """One HTTP request to exactly `target`, finished by `deadline` (``time.monotonic()``).

    A watchdog shuts the socket at the deadline, so no single read (headers included) can
    outlast it. Only a 200 answer's body is read, at most `max_bytes` of it.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ImageFetchError(f"No time left to download {shorten(target.url)}.")
    if target.scheme == "https":
        connection = http.client.HTTPSConnection(target.host, target.port, timeout=remaining, context=_tls_context())
    else:
        connection = http.client.HTTPConnection(target.host, target.port, timeout=remaining)
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        sock = connection.sock
        if sock is not None:
            try:  # the plain socket's shutdown also wakes a read blocked inside TLS
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    watchdog = threading.Timer(remaining, cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request(method, target.path, body=body, headers={"User-Agent": "segal", **(headers or {})})
        response = connection.getresponse()
        answer = _Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, b"")
        if response.status != 200:
            return answer
        declared = answer.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise ImageFetchError(_too_large(target, max_bytes))
        chunks, size = [], 0
        while True:
            chunk = response.read1(1 << 16)
            if expired.is_set():
                raise TimeoutError
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise ImageFetchError(_too_large(target, max_bytes))
            chunks.append(chunk)
        answer.body = b"".join(chunks)
        return answer
    except ImageFetchError:
        raise
    except Exception as error:  # noqa: BLE001 - sockets, TLS and http.client raise many kinds
        if expired.is_set() or isinstance(error, TimeoutError):
            raise ImageFetchError(
                f"{shorten(target.url)} did not answer in full within the download time limit "
                "(SEGAL_DOWNLOAD_TIMEOUT)."
            ) from None
        raise ImageFetchError(f"Could not reach {shorten(target.url)}: {type(error).__name__}: {str(error)[:200]}") from None
    finally:
        watchdog.cancel()
        connection.close()


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # certificates and host names verified; one context, reused


def _too_large(target: Target, max_bytes: int) -> str:
    return f"{shorten(target.url)} is larger than {max_bytes / 2**20:g} MiB (SEGAL_MAX_IMAGE_MB)."


class ImageFetcher:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.cache_dir = settings.image_cache_dir
        self._access: tuple[str, float] | None = None  # (bearer token, expiry) for a personal access token
        self._lock = threading.Lock()
        self._downloads = threading.BoundedSemaphore(settings.max_downloads)
        remove_interrupted_writes(self.cache_dir)

    # -- URLs and hosts -------------------------------------------------------------------

    def label_studio(self) -> Target | None:
        """Label Studio's origin, or None when the backend does not know it (yet)."""
        if not self.settings.label_studio_url:
            return None
        try:
            return parse_target(self.settings.label_studio_url)
        except UnsafeURL:
            return None

    def resolve(self, url) -> Target:
        """The checked target of a task's image URL (relative ones are Label Studio's)."""
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError("The task has no image URL.")
        url = url.strip()
        if url.startswith("/") and not url.startswith("//"):
            if not self.settings.label_studio_url:
                raise ImageFetchError(
                    f"The image {shorten(url)} is stored in Label Studio; set LABEL_STUDIO_URL (and "
                    "LABEL_STUDIO_API_KEY) so the backend can download it."
                )
            url = urljoin(self.settings.label_studio_url + "/", url.lstrip("/"))
        elif not url.lower().startswith(("http://", "https://")):
            raise ImageFetchError(
                f"Unsupported image URL {shorten(url)}: use Label Studio uploads, local-files storage or http(s). "
                "Cloud storage URLs (s3://, gs://, azure-blob://) need presigned http(s) URLs in the task."
            )
        try:
            return parse_target(url)
        except UnsafeURL as error:
            raise ImageFetchError(f"Refusing the image URL: {error}") from None

    def _is_label_studio(self, target: Target) -> bool:
        base = self.label_studio()
        return base is not None and target.same_origin(base)

    def _check_allowed(self, target: Target) -> None:
        if self._is_label_studio(target) or host_allowed(target, self.settings.allowed_hosts):
            return
        raise ImageFetchError(
            f"Refusing to download {shorten(target.url)}: host {target.host!r} is neither the Label Studio host "
            f"({self.settings.label_studio_url or 'LABEL_STUDIO_URL not set'}) nor in SEGAL_ALLOWED_HOSTS."
        )

    # -- authentication -------------------------------------------------------------------

    def auth_headers(self) -> dict[str, str]:
        """Headers for Label Studio: legacy token, or a personal access token exchanged.

        Only for the Label Studio origin the key belongs to (``settings.label_studio_url``,
        from the environment or learned with that key from /setup): callers check the origin.
        """
        key = self.settings.label_studio_api_key
        base = self.label_studio()
        if not key or base is None:
            return {}
        if key.count(".") != 2:  # a legacy token; personal access tokens are JWTs
            return {"Authorization": f"Token {key}"}
        with self._lock:
            if self._access is None or self._access[1] < time.monotonic():
                refresh = parse_target(urljoin(base.url.rstrip("/") + "/", "api/token/refresh/"))
                answer = http_request(
                    refresh, method="POST", deadline=time.monotonic() + self.settings.download_timeout,
                    max_bytes=1 << 20, headers={"Content-Type": "application/json"},
                    body=json.dumps({"refresh": key}).encode(),
                )  # fmt: skip
                access = _json_field(answer.body, "access") if answer.status == 200 else None
                if access is None:
                    raise ImageFetchError(
                        f"Label Studio refused LABEL_STUDIO_API_KEY as a personal access token "
                        f"(HTTP {answer.status}); check the key in Account & Settings."
                    )
                self._access = (access, time.monotonic() + ACCESS_TOKEN_SECONDS)
            return {"Authorization": f"Bearer {self._access[0]}"}

    # -- download and decode --------------------------------------------------------------

    def _cache_path(self, target: Target) -> Path:
        return self.cache_dir / hashlib.sha256(target.url.encode()).hexdigest()

    def _read_cache(self, path: Path) -> bytes | None:
        try:
            if path.is_file() and path.stat().st_size <= self.settings.max_image_bytes:
                return path.read_bytes()
        except OSError as error:
            log.warning("image cache %s unreadable (%s); downloading again", path, error)
        return None

    def _write_cache(self, path: Path, data: bytes) -> None:
        """Best effort: a full disk or a broken cache folder costs a download next time, not this prediction."""
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_bytes(data)
            os.replace(temporary, path)
        except OSError as error:
            log.warning("could not cache a downloaded image in %s (%s); predicting without the cache", path.parent, error)
            try:
                temporary.unlink(missing_ok=True)
            except OSError:
                pass

    def fetch_bytes(self, url) -> bytes:
        target = self.resolve(url)
        self._check_allowed(target)
        cache = self._cache_path(target)
        cached = self._read_cache(cache)
        if cached is not None:
            return cached
        timeout = self.settings.download_timeout
        if not self._downloads.acquire(timeout=timeout):
            raise ImageFetchError(
                f"{self.settings.max_downloads} downloads were already running for {timeout:g} s "
                "(SEGAL_MAX_DOWNLOADS); try again later."
            )
        try:
            headers = self.auth_headers() if self._is_label_studio(target) else {}
            answer = http_request(
                target, deadline=time.monotonic() + timeout, max_bytes=self.settings.max_image_bytes,
                headers={"Accept": "image/*,*/*;q=0.8", **headers},  # Label Studio answers 406 to image/* alone
            )  # fmt: skip
        finally:
            self._downloads.release()
        if answer.status in (401, 403):
            raise ImageFetchError(f"{shorten(target.url)} answered HTTP {answer.status}: check LABEL_STUDIO_API_KEY.")
        if 300 <= answer.status < 400:
            raise ImageFetchError(
                f"{shorten(target.url)} redirects to {shorten(answer.headers.get('location'))}; put the final URL in "
                "the task (redirects are not followed, so that only allowed hosts are ever contacted)."
            )
        if answer.status != 200:
            raise ImageFetchError(f"{shorten(target.url)} answered HTTP {answer.status}.")
        self._write_cache(cache, answer.body)
        return answer.body

    def fetch(self, url) -> torch.Tensor:
        """The image as RGB float ``[3, H, W]`` in [0, 1]."""
        return rgb_to_tensor(self.fetch_rgb(url))

    def fetch_rgb(self, url) -> np.ndarray:
        """The image as RGB uint8 ``[H, W, 3]`` (no torch: safe in prefetch threads)."""
        return decode_rgb(self.fetch_bytes(url), url, self.settings.max_image_pixels)


def _json_field(body: bytes, name: str):
    try:
        value = json.loads(body).get(name)
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) and value else None


def image_size(data: bytes, name="image") -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        # reads the header only; PIL itself refuses sizes over 2 x Image.MAX_IMAGE_PIXELS
        with Image.open(io.BytesIO(data)) as image:
            size, kind = image.size, image.format
    except Image.DecompressionBombError as error:
        raise ImageFetchError(f"{shorten(name)} is too large (SEGAL_MAX_IMAGE_MEGAPIXELS): {error}") from None
    except Exception:  # noqa: BLE001 - PIL raises many kinds for a file it cannot identify
        raise ImageFetchError(
            f"{shorten(name)} is not a readable image (empty, truncated or not PNG, JPEG, WebP, BMP or TIFF)."
        ) from None
    if kind not in DECODABLE_FORMATS:
        raise ImageFetchError(f"{shorten(name)} is a {kind} image; use PNG, JPEG, WebP, BMP or TIFF.")
    return size


def decode_image(data: bytes, name="image", max_pixels: int = 40_000_000) -> torch.Tensor:
    """RGB float ``[3, H, W]`` in [0, 1] from PNG/JPEG/... bytes (see ``decode_rgb``)."""
    return rgb_to_tensor(decode_rgb(data, name, max_pixels))


def rgb_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> RGB float ``[3, H, W]`` in [0, 1]."""
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)


def decode_rgb(data: bytes, name="image", max_pixels: int = 40_000_000) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` from PNG/JPEG/... bytes: 16-bit, grayscale, palette and RGBA images
    become 8-bit RGB (alpha dropped). Refuses more than `max_pixels` before decoding. No torch
    here, so prefetch threads can call it without starting torch thread pools of their own."""
    if not data:
        raise ImageFetchError(f"{shorten(name)} is empty.")
    width, height = image_size(data, name)
    if width * height > max_pixels:
        raise ImageFetchError(
            f"{shorten(name)} is {width}x{height} pixels ({width * height / 1e6:.1f} MP), over the limit of "
            f"{max_pixels / 1e6:g} MP (SEGAL_MAX_IMAGE_MEGAPIXELS)."
        )
    try:
        array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as error:
        raise ImageFetchError(f"{shorten(name)} could not be decoded: {shorten(str(error))}") from None
    if array is None or array.ndim != 3 or array.shape[2] != 3:
        raise ImageFetchError(f"{shorten(name)} is not a readable image (truncated or corrupt).")
    if array.shape[0] * array.shape[1] > max_pixels:  # the decoder saw another size than the header said
        raise ImageFetchError(f"{shorten(name)} decodes to more pixels than its header says.")
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
