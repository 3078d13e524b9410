"""The image's HEALTHCHECK: exit 0 when the backend's GET /health answers {"status": "UP"}.

Plain standard library (the slim image has no curl). It asks the port in $PORT on the
loopback address, and sends BASIC_AUTH_USER / BASIC_AUTH_PASS when they are set, because
then every route, /health included, requires them.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import sys
import urllib.request


def main() -> int:
    host = os.environ.get("HOST", "").strip()
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{os.environ.get('PORT', '').strip() or '9090'}/health"
    request = urllib.request.Request(url)
    user, password = os.environ.get("BASIC_AUTH_USER", ""), os.environ.get("BASIC_AUTH_PASS", "")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = json.load(response)
        status = body.get("status") if isinstance(body, dict) else None
    except (OSError, http.client.HTTPException, ValueError) as error:  # refused, timeout, 4xx/5xx, not JSON
        print(f"{url}: {error}", file=sys.stderr)
        return 1
    if status != "UP":
        print(f"{url}: status {status!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
