"""`make fuzz`: schemathesis against /openapi.json of a fresh server (the default model, --quant none, a
short context), admin routes included through the bearer token. Fails on any 5xx and on any response
that contradicts the schema. Not collected by pytest (a long, random run): run it on its own."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HOTLORA_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "hotlora"))

from server_harness import TOKEN, ServerThread, server_settings

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-examples", type=int, default=25, help="examples per operation")
    parser.add_argument("--max-time", type=int, default=240, help="seconds for the whole run")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as store:
        settings = server_settings(Path(store), Path(os.environ["HOTLORA_CACHE"]), max_model_len=128)
        srv = ServerThread(settings).start()
        try:
            t0 = time.monotonic()
            cmd = [
                str(Path(sys.executable).parent / "schemathesis"), "run", srv.url + "/openapi.json",
                "-H", f"Authorization: Bearer {TOKEN}", "--checks", CHECKS,
                "--max-examples", str(args.max_examples), "--max-time", str(args.max_time),
                "--seed", str(args.seed), "--request-timeout", "120", "--workers", "1",
            ]
            code = subprocess.call(cmd)
            print(f"schemathesis: exit {code} after {time.monotonic() - t0:.0f} s")
            return code
        finally:
            srv.stop()


if __name__ == "__main__":
    sys.exit(main())
