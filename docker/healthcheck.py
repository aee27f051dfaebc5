#!/usr/bin/env python3
"""Container health check: exit 0 when hotlora's GET /health answers 200, 1 otherwise.

Standard library only, so the image needs no curl. It reads the same HOTLORA_HOST and HOTLORA_PORT the
server reads; a wildcard bind address is probed on loopback.
"""

import os
import sys
import urllib.error
import urllib.request

WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def health_url(env: dict[str, str]) -> str:
    host = env.get("HOTLORA_HOST", "")
    host = "127.0.0.1" if host in WILDCARDS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{env.get('HOTLORA_PORT', '8000')}/health"


def main() -> int:
    url = health_url(dict(os.environ))
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
