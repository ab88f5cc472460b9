"""Container health check: GET /monitoring/health on this container's app.

The image runs either app, so this asks the gateway's port and then the admin's (GATEWAY_PORT,
ADMIN_PORT, defaults 6789 and 6790) and succeeds when one of them answers 200. Standard library
only: the slim image has no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def healthy(port: str) -> bool:
    url = f"http://127.0.0.1:{port}/monitoring/health"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main() -> int:
    ports = (os.environ.get("GATEWAY_PORT") or "6789", os.environ.get("ADMIN_PORT") or "6790")
    return 0 if any(healthy(port) for port in ports) else 1


if __name__ == "__main__":
    sys.exit(main())
