"""Downloads against a loopback server that misbehaves in every way a real one does: the file that lands is
byte for byte the source (sha256), or the error is clear and comes after the retry budget. Never a splice."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from cammsr.core.config import IngestParams
from cammsr.ingest.download import (
    DownloadError,
    RetryPolicy,
    _retry_after,
    fetch_bytes,
    fetch_file,
    make_client,
)
from cammsr.ingest.images import fetch_images

V1 = bytes(range(256)) * 800  # 204,800 bytes
V2 = bytes(reversed(range(256))) * 800  # the same size: only the content tells them apart
FAST = RetryPolicy(retries=3, timeout_s=2.0, backoff_base_s=0.01, backoff_max_s=0.02)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(url: str, dest: Path, policy: RetryPolicy = FAST):
    with make_client(policy) as client:
        return fetch_file(url, dest, client=client, policy=policy)


def partial(body: bytes, sent: int, headers: dict[str, str] | None = None, then_sleep: float = 0.0) -> Response:
    """Promise ``len(body)`` bytes, send ``sent``, then (after ``then_sleep``) close."""

    def chunks():
        yield body[:sent]
        if then_sleep:
            time.sleep(then_sleep)

    return Response(chunks(), headers={"Content-Length": str(len(body)), **(headers or {})},
                    direct_passthrough=True)


def ranged(body: bytes, request: Request, etag: str) -> Response:
    start = int(request.headers["Range"].removeprefix("bytes=").rstrip("-"))
    return Response(body[start:], status=206, headers={
        "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}", "ETag": etag})


@pytest.fixture
def threaded():
    server = HTTPServer(threaded=True)  # a handler that stalls must not block the retry
    server.start()
    yield server
    server.clear()
    server.stop()


def test_a_burst_of_5xx_is_outlasted(httpserver: HTTPServer, tmp_path):
    for status in (500, 502, 503):
        httpserver.expect_ordered_request("/f").respond_with_data("busy", status=status)
    httpserver.expect_ordered_request("/f").respond_with_data(V1)
    result = fetch(httpserver.url_for("/f"), tmp_path / "f")
    assert result.entry.sha256 == sha(V1) == sha((tmp_path / "f").read_bytes())


def test_429_waits_what_retry_after_asks(httpserver: HTTPServer, tmp_path):
    httpserver.expect_ordered_request("/f").respond_with_data("slow down", status=429, headers={"Retry-After": "1"})
    httpserver.expect_ordered_request("/f").respond_with_data(V1)
    started = time.monotonic()
    result = fetch(httpserver.url_for("/f"), tmp_path / "f")
    assert time.monotonic() - started >= 1.0  # not the policy's 0.01 s backoff
    assert result.entry.sha256 == sha(V1)


def test_retry_after_as_a_date_and_its_cap():
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= _retry_after(soon) <= 30
    assert _retry_after("7") == 7 and _retry_after(None) is None and _retry_after("soon-ish") is None
    policy = RetryPolicy(backoff_base_s=0.01, backoff_max_s=0.02, retry_after_max_s=5)

    class Asked(Exception):
        retry_after = 3600.0

    state = type("S", (), {"attempt_number": 1, "outcome": type("O", (), {"exception": lambda self: Asked()})()})()
    assert policy.wait()(state) == 5  # a server cannot park the pipeline for an hour


def test_a_slow_drip_times_out_and_resumes(threaded: HTTPServer, tmp_path):
    cut = 50_000
    threaded.expect_ordered_request("/f").respond_with_response(partial(V1, cut, {"ETag": '"v1"'}, then_sleep=3))
    threaded.expect_ordered_request("/f").respond_with_handler(lambda r: ranged(V1, r, '"v1"'))
    policy = RetryPolicy(retries=2, timeout_s=0.5, backoff_base_s=0.01, backoff_max_s=0.02)
    result = fetch(threaded.url_for("/f"), tmp_path / "f", policy)
    assert result.entry.sha256 == sha(V1) and (tmp_path / "f").read_bytes() == V1
    assert threaded.log[1][0].headers["Range"] == f"bytes={cut}-"


def test_a_body_shorter_than_content_length_resumes(httpserver: HTTPServer, tmp_path):
    httpserver.expect_ordered_request("/f").respond_with_response(partial(V1, 70_000, {"ETag": '"v1"'}))
    httpserver.expect_ordered_request("/f").respond_with_handler(lambda r: ranged(V1, r, '"v1"'))
    result = fetch(httpserver.url_for("/f"), tmp_path / "f")
    assert result.entry.sha256 == sha(V1) and result.bytes_transferred == len(V1)


class ResettingServer:
    """Raw sockets: the first connection gets headers and part of the body, then a TCP reset (RST, not FIN);
    later ones get the rest as a 206 (or the whole file when they ask for no range)."""

    def __init__(self, body: bytes, cut: int) -> None:
        self.body, self.cut, self.requests = body, cut, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/f"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for n in range(3):
            conn, _ = self.sock.accept()
            request = conn.recv(65536).decode("latin-1")
            self.requests.append(request)
            head = "ETag: \"v1\"\r\nConnection: close\r\n"
            if n == 0:
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(self.body)}\r\n{head}\r\n".encode()
                             + self.body[: self.cut])
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()  # linger 0: the peer sees ECONNRESET
                continue
            start = int(request.split("Range: bytes=")[1].split("-")[0]) if "Range:" in request else 0
            conn.sendall(f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(self.body) - start}\r\n"
                         f"Content-Range: bytes {start}-{len(self.body) - 1}/{len(self.body)}\r\n{head}\r\n".encode()
                         + self.body[start:])
            conn.close()
            return

    def close(self) -> None:
        self.sock.close()


def test_a_connection_reset_mid_body_resumes(tmp_path):
    server = ResettingServer(V1, 60_000)
    try:
        result = fetch(server.url, tmp_path / "f")
    finally:
        server.close()
    assert result.entry.sha256 == sha(V1) and (tmp_path / "f").read_bytes() == V1
    assert len(server.requests) == 2 and "Range: bytes=" in server.requests[1]


def test_a_file_changed_between_attempts_restarts_and_is_never_spliced(httpserver: HTTPServer, tmp_path):
    """The server ignores If-Range and answers the resume with bytes of the new version: detected by its ETag."""
    cut = 100_000
    httpserver.expect_ordered_request("/f").respond_with_response(partial(V1, cut, {"ETag": '"v1"'}))
    httpserver.expect_ordered_request("/f").respond_with_handler(lambda r: ranged(V2, r, '"v2"'))
    httpserver.expect_ordered_request("/f").respond_with_data(V2, headers={"ETag": '"v2"'})
    result = fetch(httpserver.url_for("/f"), tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == V2 and result.entry.sha256 == sha(V2) and result.entry.etag == '"v2"'
    assert "Range" not in httpserver.log[2][0].headers  # restarted from zero


def test_a_resume_whose_length_disagrees_restarts(httpserver: HTTPServer, tmp_path):
    """No validator to compare, but the file grew: the Content-Range total is not what the first answer said."""
    cut = 100_000
    httpserver.expect_ordered_request("/f").respond_with_response(partial(V1, cut))
    longer = V2 + b"more"
    httpserver.expect_ordered_request("/f").respond_with_handler(
        lambda r: Response(longer[cut:], status=206, headers={
            "Content-Range": f"bytes {cut}-{len(longer) - 1}/{len(longer)}"}))
    httpserver.expect_ordered_request("/f").respond_with_data(longer)
    result = fetch(httpserver.url_for("/f"), tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == longer and result.entry.sha256 == sha(longer)


def test_range_not_supported_restarts_from_zero(httpserver: HTTPServer, tmp_path):
    httpserver.expect_ordered_request("/f").respond_with_response(partial(V1, 80_000, {"ETag": '"v1"'}))
    httpserver.expect_ordered_request("/f").respond_with_data(V1, headers={"ETag": '"v1"'})  # 200, whole file
    result = fetch(httpserver.url_for("/f"), tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == V1 and result.entry.sha256 == sha(V1)
    assert httpserver.log[1][0].headers["Range"] == "bytes=80000-"


def test_a_server_that_stays_down_is_a_clear_fault_after_the_budget(httpserver: HTTPServer, tmp_path):
    httpserver.expect_request("/f").respond_with_data("down", status=503)
    url = httpserver.url_for("/f")
    with pytest.raises(DownloadError) as err:
        fetch(url, tmp_path / "f")
    assert str(err.value) == f"{url}: gave up after 4 attempts: TransientError('HTTP 503')"
    assert err.value.exit_code == 1 and len(httpserver.log) == 4 and not (tmp_path / "f").exists()


def test_a_redirect_loop_is_a_plain_error(httpserver: HTTPServer, tmp_path, caplog):
    httpserver.expect_request("/loop").respond_with_response(Response(status=302, headers={"Location": "/loop"}))
    url = httpserver.url_for("/loop")
    with make_client(FAST) as client, pytest.raises(DownloadError, match="too many redirects"):
        fetch_bytes(url, client=client, policy=FAST)
    with pytest.raises(DownloadError, match=r"too many redirects \(a redirect loop\?\)") as err:
        fetch(url, tmp_path / "f")
    assert err.value.exit_code == 2
    with caplog.at_level(logging.WARNING):
        table, _ = fetch_images([("A", url)], tmp_path / "cat", tmp_path / "none.parquet", IngestParams(),
                                policy=FAST)
    assert table["status"].to_pylist() == ["failed: network error: too many redirects (a redirect loop?)"]
    assert "unexpected error" not in caplog.text and "Traceback" not in caplog.text
