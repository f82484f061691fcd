"""A loopback HTTP server that misbehaves on request, and the fault shims the fault matrix runs the CLI under.

    server = FaultServer()                                  # 127.0.0.1, a free port, its own thread
    server.route("/a/reviews.json.gz", data, faults=["503", "503"])   # two 503s, then the file
    server.url("/a/reviews.json.gz")

Each request to a route takes the next fault from its list (then serves normally): ``503`` / ``500``,
``429:<seconds>`` (Retry-After), ``short:<fraction>`` (promise the whole file, send a part, close),
``reset:<fraction>`` (send a part, then a TCP reset), ``drip:<fraction>:<seconds>`` (send a part, then
stall), ``stall:<fraction>`` (send a part, then wait for `release`), ``swap`` (the file changes to
``swap_to``: answered as the new version, Range honoured but If-Range ignored), ``norange`` (answer a
Range request with the whole file, 200), ``loop`` (redirect to itself). Plain requests support Range.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a reset or a killed client is the point here
        pass


@dataclass
class Route:
    data: bytes
    faults: list[str] = field(default_factory=list)
    swap_to: bytes | None = None
    requests: int = 0

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.data).hexdigest()[:16] + '"'


class FaultServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.lock = threading.Lock()
        self.stalled = threading.Event()
        self.released = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.handle(self)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def route(self, path: str, data: bytes, faults: list[str] | None = None, swap_to: bytes | None = None) -> str:
        self.routes[path] = Route(data, list(faults or []), swap_to)
        return self.url(path)

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------------------------------ one request

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0]
        with self.lock:
            route = self.routes.get(path)
            fault = route.faults.pop(0) if route and route.faults else ""
            if route:
                route.requests += 1
        if route is None:
            return self._send(h, 404, b"not found")
        kind, _, arg = fault.partition(":")
        if kind in ("500", "503"):
            return self._send(h, int(kind), b"busy")
        if kind == "429":
            return self._send(h, 429, b"slow down", {"Retry-After": arg})
        if kind == "loop":
            return self._send(h, 302, b"", {"Location": path})
        if kind == "swap":
            assert route.swap_to is not None
            route.data = route.swap_to
        data, start = route.data, 0
        rng = h.headers.get("Range")
        if rng and kind != "norange":
            start = int(rng.split("=")[1].split("-")[0])
        body = data[start:]
        headers = {"ETag": route.etag, "Content-Length": str(len(body))}
        status = 200
        if start:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if kind in ("short", "reset", "drip", "stall"):
            cut = int(len(body) * float(arg.split(":")[0]))
            self._head(h, status, headers)
            h.wfile.write(body[:cut])
            h.wfile.flush()
            if kind == "drip":
                time.sleep(float(arg.split(":")[1]))
            elif kind == "stall":
                self.stalled.set()
                self.released.wait(120)
            elif kind == "reset":
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            if kind == "reset":
                h.connection.close()
            return None
        self._head(h, status, headers)
        h.wfile.write(body)
        return None

    @staticmethod
    def _head(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str]) -> None:
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.end_headers()

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self._head(h, status, {"Content-Length": str(len(body)), **(headers or {})})
        h.wfile.write(body)


# ------------------------------------------------------------------------------------------------- shims


def run_cli_with_failing_writes() -> None:
    """``python -m benchmarks.fault_server ERRNO N cammsr-args...``: the CLI, where every image write after
    the N-th fails with ERRNO (a disk that fills up, a folder that turns read-only)."""
    code, after, *args = sys.argv[1:]
    import cammsr.ingest.images as images

    real, count = images.write_bytes_atomic, [0]

    def write(target, data):
        count[0] += 1
        if count[0] > int(after):
            raise OSError(int(code), os.strerror(int(code)), str(target))
        return real(target, data)

    images.write_bytes_atomic = write
    from cammsr.cli import app

    sys.argv = ["cammsr", *args]
    app()


if __name__ == "__main__":
    assert errno.ENOSPC  # the shim's usual code
    run_cli_with_failing_writes()
