"""A real S3-compatible server for tests: moto's server mode (moto[server]) on loopback, in this process."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# moto and boto3 read credentials from the environment; tests must never reach a real account
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """moto's ThreadedMotoServer on 127.0.0.1 with one fresh bucket; `stop()` makes it unreachable."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        for k, v in CREDENTIALS.items():
            os.environ.setdefault(k, v)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.bucket = f"hotlora-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=self.bucket)
        self.running = True

    def client(self) -> Any:
        from hotlora.adapters.s3protocol import default_client

        return default_client(self.endpoint)

    def url(self, prefix: str = "adapters") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        out = self.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for o in out.get("Contents", []))

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False


@contextmanager
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()
