"""uvicorn's httptools protocol with a bound on what a client can make it buffer outside a request's body.

uvicorn bounds a request's head (request line and headers) when it parses with h11 (16 KiB) but not with httptools,
which would keep any amount (197 MB of headers on one connection were answered 200). BoundedHead counts, before the
parser sees them:
- a request's head, up to the blank line that ends it (found across reads; empty lines before a request line are
  skipped, as the parser skips them), for each request of a keep-alive connection;
- a chunked body's framing (chunk extensions, trailers): the bytes of reads in which no chunk and no request ended
  that the parser did not pass on as body.
Past limits.MAX_HEAD_BYTES it answers 431 in OpenAI's shape and closes, having held at most the bound plus one read;
while an earlier answer is still owed (pipelining) it stops reading and closes after that answer instead of writing
into it or in its place.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hotlora.server.api.errors import APIError
from hotlora.server.api.limits import MAX_HEAD_BYTES


class BoundedHead(HttpToolsProtocol):
    head = 0  # bytes of the current request's head so far; -1 while its body arrives
    tail = b""  # the last 3 bytes of the head seen, for a blank line split across reads
    frame = 0  # a chunked body's non-body bytes since its last complete chunk
    fed = 0  # body bytes the parser passed on during the current read
    ended = False  # a request ended during the current read
    chunked = False  # a chunk of a body ended during the current read
    refused = False

    def on_headers_complete(self) -> None:
        self.head, self.frame = -1, 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.fed += len(body)
        super().on_body(body)

    def on_chunk_complete(self) -> None:
        self.frame, self.chunked = 0, True

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.head, self.tail, self.ended = 0, b"", True

    def data_received(self, data: bytes) -> None:
        if self.refused or self.transport.is_closing():
            return
        if self.head >= 0 and not self._head_fits(data):
            return
        in_body, self.fed, self.ended, self.chunked = self.head < 0, 0, False, False
        super().data_received(data)
        if self.refused or self.transport.is_closing():
            return
        if self.ended:  # a request ended inside this read: what follows it begins the next head
            if self.head == 0:
                self.tail = data[-3:]
        elif in_body and self.head < 0 and not self.chunked:  # within one chunk: what the parser kept back is framing
            self.frame += len(data) - self.fed
            if self.frame > MAX_HEAD_BYTES:
                self._refuse("a chunked body's extensions or trailers are", own_body=True)

    def _head_fits(self, data: bytes) -> bool:
        seen = self.tail + data
        start = len(seen) - len(seen.lstrip(b"\r\n")) if self.head == 0 and not self.tail else 0
        end = seen.find(b"\r\n\r\n", start)
        self.head += len(data) if end < 0 else end + 4 - len(self.tail)
        self.tail = seen[-3:]
        if self.head > MAX_HEAD_BYTES:
            self._refuse("the request line and headers are")
            return False
        return True

    def _refuse(self, what: str, own_body: bool = False) -> None:
        """431 and close, unless an answer is owed on this connection: then a new request's head closes the
        connection after the last answer owed, and the body of the request being read closes it at once."""
        self.refused = True
        cycle = self.cycle
        earlier = bool(self.pipeline) or (not own_body and cycle is not None and not cycle.response_complete)
        if own_body and (earlier or cycle.response_started):
            self.transport.close()
            return
        if earlier:
            cycle.keep_alive = False  # the last answer owed closes the connection; nothing more is read
            self.transport.pause_reading()
            return
        err = APIError(431, f"{what} larger than the server's limit of {MAX_HEAD_BYTES} bytes",
                       code="request_header_fields_too_large")
        body = json.dumps(err.body()).encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()
