"""A fault-injecting HTTP proxy in front of the local S3 server (tests/s3_server.py).

It forwards every request to moto unchanged and can, for requests matching a method and a
path pattern, answer the next N of them with a fault instead:

    proxy.inject("503", count=8, method="GET", path=r"/_lock\\.json")   # SlowDown bursts
    proxy.inject("500", count=3)                                     # InternalError
    proxy.inject("drop", count=2, method="PUT")     # read the request, close without answering
    proxy.inject("slow", count=4, delay=0.5)        # answer late (forwarded after a sleep)
    proxy.inject("503", seconds=10, method="PUT")   # every match for 10 s from the first one

Bursts longer than the SDK's own retries are what the pipeline's own retries
(pipeline.io.store_retry) must carry: a filesystem from pyarrow's FileSystem.from_uri (what the
code before those retries used) retries one request about 30 times over about 6 s here, so
only a burst that lasts longer (`seconds=10`) beats it; the pipeline sets 3 tries a call. `proxy.log` lists every
request as (method, path, fault or None). Use `fault_proxy(server)` as a context manager, or
the `s3_fault_proxy` fixture.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}

ERRORS = {
    "503": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
    "500": (500, "Internal Server Error", "InternalError",
            "We encountered an internal error. Please try again."),
}


@dataclass
class Fault:
    kind: str  # "503", "500", "drop" or "slow"
    count: int  # how many matching requests get it
    method: str | None = None  # e.g. "GET"; None: any
    path: str | None = None  # a regex searched in the request's path and query
    delay: float = 0.0  # "slow": seconds before forwarding
    seconds: float | None = None  # instead of a count: every match for this long from the first
    until: float | None = None

    def matches(self, method: str, target: str) -> bool:
        return ((self.method is None or self.method == method)
                and (self.path is None or re.search(self.path, target) is not None))


class FaultProxy:
    """The proxy; `endpoint` is its http://127.0.0.1:PORT URL."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream).netloc
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, 100-continue, as S3 clients expect

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                fault = proxy._take(self.command, self.path)
                proxy._record(self.command, self.path, fault)
                if fault is not None and fault.kind == "drop":
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if fault is not None and fault.kind in ERRORS:
                    status, reason, code, message = ERRORS[fault.kind]
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                           f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>").encode()
                    self.send_response(status, reason)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                if fault is not None and fault.kind == "slow":
                    time.sleep(fault.delay)
                self._forward(body)

            def _forward(self, body: bytes):
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in HOP_BY_HOP and k.lower() not in ("content-length", "expect")}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    if self.command == "HEAD":  # no body, but the object's length
                        self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                    else:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def inject(self, kind: str, count: int = 0, *, method: str | None = None, path: str | None = None,
               delay: float = 0.0, seconds: float | None = None) -> Fault:
        """Answer the next `count` requests matching method and path with a fault, or every
        one for `seconds` from the first."""
        if kind not in (*ERRORS, "drop", "slow"):
            raise ValueError(f"unknown fault {kind!r}")
        fault = Fault(kind, count, method, path, delay, seconds)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.log.clear()

    def injected(self, kind: str | None = None) -> int:
        """How many requests got a fault (of one kind)."""
        with self._lock:
            return sum(1 for *_, k in self.log if k is not None and (kind is None or k == kind))

    def _take(self, method: str, target: str) -> Fault | None:
        with self._lock:
            now = time.monotonic()
            for fault in self.faults:
                if not fault.matches(method, target):
                    continue
                if fault.seconds is not None:
                    fault.until = fault.until or now + fault.seconds
                    if now < fault.until:
                        fault.count += 1  # how many it answered
                        return fault
                elif fault.count > 0:
                    fault.count -= 1
                    return fault
        return None

    def _record(self, method: str, target: str, fault: Fault | None) -> None:
        with self._lock:
            self.log.append((method, target, fault.kind if fault else None))


@contextmanager
def fault_proxy(server):
    """A FaultProxy in front of an S3Server (tests/s3_server.py), stopped afterwards."""
    proxy = FaultProxy(server.endpoint).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def s3_fault_proxy(s3_server):
    """A fault proxy for the module, in front of the session's S3 server."""
    with fault_proxy(s3_server) as proxy:
        yield proxy
