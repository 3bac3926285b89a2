"""An HTTP proxy on 127.0.0.1 in front of an S3 endpoint that fails chosen requests the way S3 does.

Ray workers are other processes: a fault wrapper registered in the test process (FlakyFileSystem)
does not reach them. A proxy does: the job's `storage_options.endpoint_url` points at it, every
process talks to the store through it, and it forwards each request to the real endpoint (moto)
unless a `Fault` claims it first. A fault fails the first `times` requests it matches, then lets
them through, and counts what it injected (`Fault.injected`, `FaultProxy.injected`).

Kinds of faults, as a client sees them from real S3:
  slowdown  503 with S3's SlowDown error XML (throttling)
  internal  500 with S3's InternalError error XML
  drop      the real response's status and headers (full Content-Length), half of its body, then the
            connection closes: a stream that breaks half-way

Requests are matched by operation ("get": GetObject, "list": ListObjectsV2 / ListObjects, "head",
"put"), bucket, and a substring of the key. The endpoint is addressed path-style
(`http://127.0.0.1:PORT/bucket/key`), which is what botocore does for an IP endpoint.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# Headers that belong to one connection, not to the request: never forwarded. Expect is answered
# by the proxy itself (BaseHTTPRequestHandler sends "100 Continue"), so moto never sees it.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "expect",
}

_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource>"
    "<RequestId>{request_id}</RequestId><HostId>segpipe-fault-proxy</HostId></Error>"
)
_ERRORS = {  # kind: (HTTP status, S3 error code, message), as S3 documents them
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
KINDS = (*_ERRORS, "drop")


@dataclass
class Fault:
    op: str  # "get" | "list" | "head" | "put"
    bucket: str
    kind: str  # one of KINDS
    times: int  # the first `times` matching requests fail
    key: str = ""  # a substring of the object key ("" matches every key of the bucket)
    past_start: bool = False  # only GETs whose Range starts past byte 0: the stream broke after its start
    injected: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"fault kind {self.kind!r}: expected one of {KINDS}")

    def matches(self, op: str, bucket: str, key: str, range_start: int) -> bool:
        return (
            self.injected < self.times
            and op == self.op
            and bucket == self.bucket
            and self.key in key
            and (not self.past_start or range_start > 0)
        )


def _operation(method: str, key: str, query: dict[str, list[str]]) -> str:
    if method == "GET" and not key:
        return "list" if "uploads" not in query and "location" not in query else "bucket-get"
    return {"GET": "get", "HEAD": "head", "PUT": "put", "POST": "post", "DELETE": "delete"}.get(method, method.lower())


def _range_start(header: str | None) -> int:
    """'bytes=100-199' -> 100; no Range header (or a suffix range) -> 0."""
    if not header or not header.startswith("bytes="):
        return 0
    first = header[len("bytes=") :].split(",")[0].split("-")[0].strip()
    return int(first) if first.isdigit() else 0


class FaultProxy:
    """`with FaultProxy(target_url) as proxy:` serves on `proxy.url` until the block ends."""

    def __init__(self, target_url: str, faults: list[Fault] | None = None):
        parts = urlsplit(target_url)
        self.target = (parts.hostname, parts.port)
        self.faults: list[Fault] = list(faults or [])
        self.requests: Counter = Counter()  # (op, bucket) -> requests seen, faults included
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def injected(self) -> int:
        return sum(f.injected for f in self.faults)

    def claim(self, op: str, bucket: str, key: str, range_start: int) -> Fault | None:
        """The fault that takes this request (its count goes up), or None to forward it."""
        with self._lock:
            self.requests[op, bucket] += 1
            for fault in self.faults:
                if fault.matches(op, bucket, key, range_start):
                    fault.injected += 1
                    return fault
        return None

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _handler_class(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, *args) -> None:  # one line per request otherwise
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(*proxy.target, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                return response.status, response.reason, response.getheaders(), data
            finally:
                conn.close()

        def _send(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes, cut: bool = False) -> None:
            self.send_response_only(status, reason)
            for name, value in headers:
                if name.lower() in _HOP_BY_HOP or (name.lower() == "content-length" and self.command != "HEAD"):
                    continue
                self.send_header(name, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if not cut:
                self.wfile.write(data)
                self.wfile.flush()
                return
            # half of the body, then the connection goes away under the client
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def _handle(self) -> None:
            parts = urlsplit(self.path)
            bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
            op = _operation(self.command, key, parse_qs(parts.query, keep_blank_values=True))
            body = self._body()
            fault = proxy.claim(op, bucket, key, _range_start(self.headers.get("Range")))
            if fault is not None and fault.kind in _ERRORS:
                status, code, message = _ERRORS[fault.kind]
                xml = _ERROR_XML.format(
                    code=code, message=message, resource=f"/{bucket}/{key}", request_id=uuid.uuid4().hex[:16].upper()
                ).encode()
                headers = [("Content-Type", "application/xml"), ("x-amz-request-id", "FAULTPROXY")]
                if fault.kind == "slowdown":
                    headers.append(("Retry-After", "1"))
                self._send(status, http.client.responses[status], headers, xml)
                return
            status, reason, headers, data = self._forward(body)
            self._send(status, reason, headers, data, cut=fault is not None and fault.kind == "drop" and len(data) > 1)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

    return Handler
