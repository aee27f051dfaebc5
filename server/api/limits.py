"""What keeps one large request from hurting the others: a bound on a request's head (its request line and
headers) in the HTTP parser, a body-size limit answered before the body is read in full, and tokenization in a
small worker pool (off the event loop) with a per-request budget.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotlora.server.api.errors import APIError

T = TypeVar("T")
DEFAULT_MAX_BODY_BYTES = 8 << 20
# A request's line and headers, in bytes. uvicorn bounds them with h11 (16 KiB, h11's default) but not with
# httptools, which would buffer any amount (measured: 197 MB of headers on one connection, answered 200).
MAX_HEAD_BYTES = 32 << 10
TOKENIZER_WORKERS = 2


def too_large(limit: int, flag: str = "--max-body-bytes") -> APIError:
    return APIError(
        413, f"the request body is larger than the server's limit of {limit} bytes ({flag})", code="request_too_large"
    )


async def _send_error(send: Send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Pure ASGI middleware: a body above `limit()` bytes is answered 413 as soon as that is known (at once
    from Content-Length, else while the chunks arrive), never read in full. Paths under `exempt` stream
    their own bodies with their own limits (adapter uploads)."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int], exempt: tuple[str, ...] = ("/admin/",)) -> None:
        self.app, self.limit, self.exempt = app, limit, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _send_error(send, too_large(limit))
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                await self.app(scope, _replay([], message, receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_error(send, too_large(limit))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(chunks, None, receive), send)


def http_protocol() -> Any:
    """uvicorn's `http` setting: its httptools protocol with MAX_HEAD_BYTES enforced (http_head.BoundedHead), or
    "h11" (which bounds heads itself) where httptools is missing."""
    try:
        from hotlora.server.api.http_head import BoundedHead
    except ImportError:
        return "h11"
    return BoundedHead


def _replay(chunks: list[bytes], first: Message | None, receive: Receive) -> Receive:
    """A receive() that hands out the body already read (or the message already received), then the
    client's own messages (its disconnect)."""
    pending: list[Message] = (
        [first] if first is not None else [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
    )

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


class TokenizerPool:
    """Tokenization and chat templating on worker threads: the fast tokenizers release the GIL, so the
    event loop keeps answering while a long prompt is encoded. One request runs as one job (so it holds
    one worker at most), and each prompt is bounded in characters before any work is done."""

    def __init__(self, workers: int = TOKENIZER_WORKERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hotlora-tokenize")
        self.max_chars = 0  # per prompt; set once the tokenizer and the context length are known

    def configure(self, tokenizer: Any, max_model_len: int) -> None:
        """A prompt of more characters than max_model_len x (the longest token's characters) cannot fit
        the context whatever it holds; twice that is refused before it is tokenized."""
        longest = 16
        if tokenizer is not None:
            longest = max(longest, *(len(t) for t in tokenizer.get_vocab()))
        self.max_chars = 2 * max_model_len * longest

    def check(self, texts: list[str], max_model_len: int, param: str) -> None:
        for text in texts:
            if self.max_chars and len(text) > self.max_chars:
                raise APIError(
                    400,
                    f"This model's maximum context length is {max_model_len} tokens; a prompt of {len(text)} "
                    f"characters cannot fit it (at most {self.max_chars} characters are tokenized)",
                    param=param,
                    code="context_length_exceeded",
                )

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
