"""Fetching task images: Label Studio uploads, local-files storage, plain http(s).

Relative URLs (``/data/upload/...``, ``/data/local-files/?d=...``) belong to Label Studio
and are fetched from ``LABEL_STUDIO_URL`` with the API key. Absolute URLs are fetched only
from the Label Studio host or a host listed in ``SEGAL_ALLOWED_HOSTS`` (``*`` allows any):
a backend that downloads whatever URL a task names can be pointed at internal services.
The key is sent to the Label Studio host only.

Downloads are cached on disk by URL (written to a temporary name, then renamed), so every
prediction and every training run after the first reads the local copy.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urljoin, urlparse

import cv2
import numpy as np
import requests
import torch

from .config import Settings

MAX_IMAGE_BYTES = 200 * 1024 * 1024
TIMEOUT_SECONDS = 30
ACCESS_TOKEN_SECONDS = 240  # personal access tokens give 5-minute access tokens; renew early


class ImageFetchError(RuntimeError):
    """The image could not be obtained; the message says why and what to change."""


class ImageFetcher:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.cache_dir = settings.image_cache_dir
        self._session = requests.Session()
        self._access: tuple[str, float] | None = None  # (bearer token, expiry) for a personal access token
        self._lock = threading.Lock()

    # -- URLs and hosts -------------------------------------------------------------------

    def resolve(self, url: str) -> str:
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError("The task has no image URL.")
        url = url.strip()
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            return url
        if not parsed.scheme and url.startswith("/"):
            if not self.settings.label_studio_url:
                raise ImageFetchError(
                    f"The image {url!r} is stored in Label Studio; set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) "
                    "so the backend can download it."
                )
            return urljoin(self.settings.label_studio_url + "/", url.lstrip("/"))
        raise ImageFetchError(
            f"Unsupported image URL {url!r}: use Label Studio uploads, local-files storage or http(s). "
            "Cloud storage URLs (s3://, gs://, azure-blob://) need presigned http(s) URLs in the task."
        )

    def _is_label_studio(self, url: str) -> bool:
        base = self.settings.label_studio_url
        return bool(base) and urlparse(url).netloc.lower() == urlparse(base).netloc.lower()

    def _check_allowed(self, url: str) -> None:
        if self._is_label_studio(url):
            return
        host = (urlparse(url).hostname or "").lower()
        allowed = self.settings.allowed_hosts
        if "*" in allowed or host in allowed:
            return
        raise ImageFetchError(
            f"Refusing to download {url!r}: host {host!r} is neither the Label Studio host "
            f"({self.settings.label_studio_url or 'LABEL_STUDIO_URL not set'}) nor in SEGAL_ALLOWED_HOSTS."
        )

    # -- authentication -------------------------------------------------------------------

    def auth_headers(self) -> dict[str, str]:
        """Headers for the Label Studio API: legacy token, or a personal access token exchanged."""
        key = self.settings.label_studio_api_key
        if not key:
            return {}
        if key.count(".") != 2:  # a legacy token; personal access tokens are JWTs
            return {"Authorization": f"Token {key}"}
        with self._lock:
            if self._access is None or self._access[1] < time.monotonic():
                response = self._session.post(
                    urljoin(self.settings.label_studio_url + "/", "api/token/refresh/"),
                    json={"refresh": key},
                    timeout=TIMEOUT_SECONDS,
                )
                if response.status_code != 200:
                    raise ImageFetchError(
                        f"Label Studio refused LABEL_STUDIO_API_KEY as a personal access token "
                        f"(HTTP {response.status_code}); check the key in Account & Settings."
                    )
                self._access = (response.json()["access"], time.monotonic() + ACCESS_TOKEN_SECONDS)
            return {"Authorization": f"Bearer {self._access[0]}"}

    # -- download and decode --------------------------------------------------------------

    def _cache_path(self, url: str) -> Path:
        return self.cache_dir / hashlib.sha256(url.encode()).hexdigest()

    def fetch_bytes(self, url: str) -> bytes:
        absolute = self.resolve(url)
        self._check_allowed(absolute)
        cached = self._cache_path(absolute)
        if cached.is_file():
            return cached.read_bytes()
        headers = self.auth_headers() if self._is_label_studio(absolute) else {}
        try:
            # no redirects: an allowed host must not be able to send us on to one that is not
            response = self._session.get(
                absolute, headers=headers, timeout=TIMEOUT_SECONDS, stream=True, allow_redirects=False
            )
        except requests.RequestException as error:
            raise ImageFetchError(f"Could not reach {absolute!r}: {error}") from error
        with response:
            if response.status_code in (401, 403):
                raise ImageFetchError(
                    f"{absolute!r} answered HTTP {response.status_code}: check LABEL_STUDIO_API_KEY."
                )
            if response.is_redirect:
                raise ImageFetchError(
                    f"{absolute!r} redirects to {response.headers.get('location')!r}; put the final URL in the "
                    "task (redirects are not followed, so that only allowed hosts are ever contacted)."
                )
            if response.status_code != 200:
                raise ImageFetchError(f"{absolute!r} answered HTTP {response.status_code}.")
            chunks, size = [], 0
            for chunk in response.iter_content(1 << 20):
                size += len(chunk)
                if size > MAX_IMAGE_BYTES:
                    raise ImageFetchError(f"{absolute!r} is larger than {MAX_IMAGE_BYTES >> 20} MiB.")
                chunks.append(chunk)
        data = b"".join(chunks)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        temporary = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, cached)
        return data

    def fetch(self, url: str) -> torch.Tensor:
        """The image as RGB float ``[3, H, W]`` in [0, 1]."""
        return decode_image(self.fetch_bytes(url), url)


def decode_image(data: bytes, name: str = "image") -> torch.Tensor:
    array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
    if array is None:
        raise ImageFetchError(f"{name!r} is not a readable image (empty, truncated or another file type).")
    rgb = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
