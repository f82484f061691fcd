"""cammsr/download.py against a loopback HTTP server: retries, resume, 304, 404, file: sources."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import httpx
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from cammsr.ingest.download import (
    DownloadError,
    NotFoundError,
    RetryPolicy,
    TooLargeError,
    download_sources,
    fetch_bytes,
    fetch_file,
    local_path,
    make_client,
    raw_name,
    read_manifest,
    resolve_reference,
)

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes
SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = RetryPolicy(retries=3, timeout_s=5.0, backoff_base_s=0.01, backoff_max_s=0.02)


@pytest.fixture
def client():
    with make_client(FAST) as c:
        yield c


def _cut_short(body: bytes, sent: int, status: int = 200, extra: dict | None = None) -> Response:
    """A response that promises ``len(body)`` bytes, sends ``sent`` and closes (a dropped connection)."""

    def chunks():
        yield body[:sent]

    headers = {"Content-Length": str(len(body)), **(extra or {})}
    return Response(chunks(), status=status, headers=headers, direct_passthrough=True)


def test_500_then_200_is_retried(httpserver: HTTPServer, client, tmp_path: Path) -> None:
    httpserver.expect_ordered_request("/f.gz").respond_with_data("boom", status=500)
    httpserver.expect_ordered_request("/f.gz").respond_with_data(PAYLOAD)
    result = fetch_file(httpserver.url_for("/f.gz"), tmp_path / "f.gz", client=client, policy=FAST)
    assert (tmp_path / "f.gz").read_bytes() == PAYLOAD
    assert result.entry.sha256 == SHA and result.entry.bytes == len(PAYLOAD) and result.changed
    assert len(httpserver.log) == 2


def test_retries_run_out_with_an_error_naming_the_url(httpserver: HTTPServer, client, tmp_path: Path) -> None:
    httpserver.expect_request("/down").respond_with_data("busy", status=503)
    url = httpserver.url_for("/down")
    with pytest.raises(DownloadError, match="gave up after 4 attempts") as err:
        fetch_file(url, tmp_path / "down", client=client, policy=FAST)
    assert url in str(err.value)
    assert len(httpserver.log) == FAST.retries + 1
    assert not (tmp_path / "down").exists()


def test_dropped_body_resumes_with_range(httpserver: HTTPServer, client, tmp_path: Path) -> None:
    cut = 30_000
    httpserver.expect_ordered_request("/big.gz").respond_with_response(
        _cut_short(PAYLOAD, cut, extra={"ETag": '"v1"'})
    )

    def rest(request: Request) -> Response:
        assert request.headers["Range"] == f"bytes={cut}-"
        return Response(PAYLOAD[cut:], status=206, headers={
            "Content-Range": f"bytes {cut}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}", "ETag": '"v1"'})

    httpserver.expect_ordered_request("/big.gz").respond_with_handler(rest)
    result = fetch_file(httpserver.url_for("/big.gz"), tmp_path / "big.gz", client=client, policy=FAST)

    assert (tmp_path / "big.gz").read_bytes() == PAYLOAD
    assert result.entry.sha256 == SHA and result.entry.etag == '"v1"'
    assert result.bytes_transferred == len(PAYLOAD) and len(httpserver.log) == 2
    second = httpserver.log[1][0]
    assert second.headers["Range"] == f"bytes={cut}-" and second.headers["If-Range"] == '"v1"'
    assert not list(tmp_path.glob("*.part*"))


def test_part_left_by_an_earlier_run_is_resumed(httpserver: HTTPServer, client, tmp_path: Path) -> None:
    (tmp_path / "f.gz.part").write_bytes(PAYLOAD[:1000])
    httpserver.expect_request("/f.gz", headers={"Range": "bytes=1000-"}).respond_with_data(
        PAYLOAD[1000:], status=206, headers={"Content-Range": f"bytes 1000-{len(PAYLOAD) - 1}/{len(PAYLOAD)}"}
    )
    result = fetch_file(httpserver.url_for("/f.gz"), tmp_path / "f.gz", client=client, policy=FAST)
    assert result.entry.sha256 == SHA and result.bytes_transferred == len(PAYLOAD) - 1000


def test_server_ignoring_range_restarts_cleanly(httpserver: HTTPServer, client, tmp_path: Path) -> None:
    (tmp_path / "f.gz.part").write_bytes(b"stale bytes of another version")
    httpserver.expect_request("/f.gz").respond_with_data(PAYLOAD, status=200)
    result = fetch_file(httpserver.url_for("/f.gz"), tmp_path / "f.gz", client=client, policy=FAST)
    assert httpserver.log[0][0].headers["Range"] == "bytes=30-"
    assert (tmp_path / "f.gz").read_bytes() == PAYLOAD and result.entry.sha256 == SHA
    assert result.bytes_transferred == len(PAYLOAD)


def test_304_does_no_work(httpserver: HTTPServer, client, tmp_path: Path) -> None:
    validators = {"ETag": '"abc"', "Last-Modified": "Wed, 21 Oct 2015 07:28:00 GMT"}
    httpserver.expect_ordered_request("/f.gz").respond_with_data(PAYLOAD, headers=validators)
    httpserver.expect_ordered_request(
        "/f.gz", headers={"If-None-Match": '"abc"', "If-Modified-Since": validators["Last-Modified"]}
    ).respond_with_data("", status=304)
    raw, manifest = tmp_path / "raw", tmp_path / "raw" / "manifest.json"
    url = httpserver.url_for("/f.gz")
    [first] = download_sources([url], raw, manifest, policy=FAST)
    mtime = first.path.stat().st_mtime_ns
    [second] = download_sources([url], raw, manifest, policy=FAST)

    assert not second.changed and second.bytes_transferred == 0
    assert second.path.stat().st_mtime_ns == mtime and second.path.read_bytes() == PAYLOAD
    assert len(httpserver.log) == 2 and httpserver.log[1][1].status_code == 304
    entry = json.loads(manifest.read_text())[raw_name(url)]
    assert entry["etag"] == '"abc"' and entry["sha256"] == SHA and entry["bytes"] == len(PAYLOAD)
    assert set(entry) >= {"url", "etag", "last_modified", "sha256", "bytes", "fetched_at"}


def test_404_is_a_clear_error_and_leaves_nothing(httpserver: HTTPServer, client, tmp_path: Path) -> None:
    (tmp_path / "gone.gz.part").write_bytes(b"half of an older attempt")
    httpserver.expect_request("/gone.gz").respond_with_data("nope", status=404)
    url = httpserver.url_for("/gone.gz")
    with pytest.raises(NotFoundError, match="404") as err:
        fetch_file(url, tmp_path / "gone.gz", client=client, policy=FAST)
    assert url in str(err.value)
    assert len(httpserver.log) == 1  # a 4xx is not retried
    assert list(tmp_path.iterdir()) == []


def test_fetch_bytes_refuses_too_large_bodies(httpserver: HTTPServer, client) -> None:
    httpserver.expect_request("/img").respond_with_data(PAYLOAD)
    with pytest.raises(TooLargeError):
        fetch_bytes(httpserver.url_for("/img"), client=client, policy=FAST, max_bytes=1000)
    assert fetch_bytes(httpserver.url_for("/img"), client=client, policy=FAST) == PAYLOAD


def test_timeouts_are_retried() -> None:
    def slow(_: Request) -> Response:
        time.sleep(0.5)
        return Response(b"late")

    server = HTTPServer(threaded=True)  # the slow handler must not block the retry
    server.start()
    try:
        server.expect_ordered_request("/slow").respond_with_handler(slow)
        server.expect_ordered_request("/slow").respond_with_data(b"fast")
        policy = RetryPolicy(retries=1, timeout_s=0.1, backoff_base_s=0.01)
        with make_client(policy) as c:
            assert fetch_bytes(server.url_for("/slow"), client=c, policy=policy) == b"fast"  # 2nd answer
    finally:
        server.clear()
        server.stop()


def test_file_sources_are_copied_once(tmp_path: Path) -> None:
    src = tmp_path / "src" / "reviews_X_5.json.gz"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    raw, manifest = tmp_path / "cat" / "raw", tmp_path / "cat" / "raw" / "manifest.json"
    url = "file:src/reviews_X_5.json.gz"
    [first] = download_sources([url], raw, manifest, policy=FAST, root=tmp_path)
    assert first.changed and first.path.read_bytes() == PAYLOAD and first.entry.sha256 == SHA
    mtime = first.path.stat().st_mtime_ns

    [same] = download_sources([url], raw, manifest, policy=FAST, root=tmp_path)
    os.utime(src, ns=(1_000_000_000, 1_000_000_000))  # touched: new mtime, same bytes
    [touched] = download_sources([url], raw, manifest, policy=FAST, root=tmp_path)
    assert not same.changed and not touched.changed and first.path.stat().st_mtime_ns == mtime
    assert read_manifest(manifest)[first.name].source_mtime_ns == 1_000_000_000

    src.write_bytes(PAYLOAD[::-1])
    [edited] = download_sources([url], raw, manifest, policy=FAST, root=tmp_path)
    assert edited.changed and edited.path.read_bytes() == PAYLOAD[::-1]


def test_missing_local_file_and_dropped_urls(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}\n")
    raw, manifest = tmp_path / "raw", tmp_path / "raw" / "manifest.json"
    [a] = download_sources([(tmp_path / "a.json").as_uri()], raw, manifest, policy=FAST)
    with pytest.raises(NotFoundError, match="no such file"):
        download_sources(["file:nothere.json"], raw, manifest, policy=FAST, root=tmp_path)
    assert not a.path.exists() and read_manifest(manifest) == {}  # no longer in the catalog: dropped
    assert sorted(p.name for p in raw.iterdir()) == ["manifest.json"]


def test_names_and_urls(tmp_path: Path) -> None:
    name = raw_name("http://h/x/../../etc/pass wd?q=1")
    assert "/" not in name and name.endswith("-pass_wd") and len(name.split("-")[0]) == 16
    assert raw_name("https://h/") == hashlib.sha1(b"https://h/").hexdigest()[:16]
    assert local_path("file:data/x.gz", tmp_path) == tmp_path / "data/x.gz"
    assert local_path("file:///abs/x.gz", tmp_path) == Path("/abs/x.gz")
    assert local_path("data/x.gz", tmp_path) == tmp_path / "data/x.gz"
    assert local_path("https://h/x.gz", tmp_path) is None
    with pytest.raises(DownloadError, match="unsupported URL scheme 'ftp'"):
        local_path("ftp://h/x.gz", tmp_path)
    meta = "file:data/sources/demo/meta_Demo.json.gz"
    assert resolve_reference(meta, "images/a.jpg") == "file:data/sources/demo/images/a.jpg"
    assert resolve_reference(meta, "../img/a.jpg") == "file:data/sources/img/a.jpg"
    assert resolve_reference("file:///d/meta.gz", "images/a.jpg") == "file:///d/images/a.jpg"
    assert resolve_reference("d/meta.gz", "images/a.jpg") == "d/images/a.jpg"
    assert resolve_reference("http://h/m/meta.gz", "/i/a.jpg") == "http://h/i/a.jpg"
    assert resolve_reference(meta, "https://cdn/a.jpg") == "https://cdn/a.jpg"
    assert resolve_reference(meta, "  ") is None


def test_unsupported_scheme_is_not_retried(tmp_path: Path) -> None:
    with make_client(FAST) as c, pytest.raises(DownloadError):
        fetch_file("gopher://h/x", tmp_path / "x", client=c, policy=FAST)
    assert isinstance(httpx.UnsupportedProtocol("x"), httpx.TransportError)  # why _is_transient excludes it
