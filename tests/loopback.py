"""Real HTTP servers on 127.0.0.1 for the hardening tests: they record every request, so a
test can tell whether (and with which Authorization header) a host was contacted.

`RecordingServer` serves files from a dict and a few hostile behaviours:
  /trickle/<name>   the file's headers at once, then its body one byte every `trickle_delay` s
  /slow-headers     the status line and headers one byte at a time, never finishing
  /redirect?to=URL  a 302 to URL
"""

from __future__ import annotations

import http.server
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np


def png_bytes(height: int, width: int, seed: int = 0, channels: int = 3, dtype=np.uint8) -> bytes:
    """A real PNG of noise (cv2 writes 1, 3 or 4 channels, 8 or 16 bit)."""
    high = 256 if dtype == np.uint8 else 65536
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    ok, encoded = cv2.imencode(".png", rng.integers(0, high, shape, dtype=dtype))
    assert ok
    return encoded.tobytes()


@dataclass
class Request:
    path: str
    headers: dict[str, str]


@dataclass
class RecordingServer:
    files: dict[str, bytes] = field(default_factory=dict)
    trickle_delay: float = 0.1
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self):
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.requests.append(Request(self.path, {k.lower(): v for k, v in self.headers.items()}))
                path = urlsplit(self.path).path
                try:
                    if path.startswith("/trickle/"):
                        self._trickle(owner.files[path.removeprefix("/trickle")])
                    elif path == "/slow-headers":
                        self._slow_headers()
                    elif path == "/redirect":
                        target = parse_qs(urlsplit(self.path).query)["to"][0]
                        self._answer(302, b"", {"Location": target})
                    elif path in owner.files:
                        self._answer(200, owner.files[path], {"Content-Type": "image/png"})
                    else:
                        self._answer(404, b"not found", {})
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the backend gave up on us: that is what the tests want

            do_POST = do_GET

            def _answer(self, status, body, headers):
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _trickle(self, body):
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.flush()
                for index in range(len(body)):
                    self.wfile.write(body[index : index + 1])
                    self.wfile.flush()
                    time.sleep(owner.trickle_delay)

            def _slow_headers(self):
                for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 100_000:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(owner.trickle_delay)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [request.path for request in self.requests]

    def authorizations(self) -> list[str | None]:
        return [request.headers.get("authorization") for request in self.requests]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> RecordingServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
