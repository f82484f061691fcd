"""Smoke tests of the fault matrix's own parts (fast; the matrix itself runs the CLI: `python -m benchmarks.faults`)."""

import gzip
import json

import httpx
import pytest

from benchmarks.fault_server import FaultServer
from benchmarks.faults import CASES, HEAVY, expected_rows


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


def test_the_server_misbehaves_in_the_order_asked(server):
    body = bytes(range(256)) * 40
    url = server.route("/f", body, faults=["503", "429:7", "short:0.5", "norange"])
    with httpx.Client() as client:
        assert client.get(url).status_code == 503
        slow = client.get(url)
        assert slow.status_code == 429 and slow.headers["Retry-After"] == "7"
        with pytest.raises(httpx.RemoteProtocolError):  # promised the whole body, sent half
            client.get(url)
        whole = client.get(url, headers={"Range": "bytes=100-"})
        assert whole.status_code == 200 and whole.content == body  # Range ignored
        part = client.get(url, headers={"Range": "bytes=100-"})
        assert part.status_code == 206 and part.content == body[100:]
        assert client.get(server.url("/nothing")).status_code == 404
    assert server.routes["/f"].requests == 5


def test_a_swap_serves_the_new_version_with_its_etag_and_ignores_if_range(server):
    url = server.route("/f", b"a" * 100, faults=["swap"], swap_to=b"b" * 100)
    old = server.routes["/f"].etag
    with httpx.Client() as client:
        res = client.get(url, headers={"Range": "bytes=40-", "If-Range": old})
    assert res.status_code == 206 and res.content == b"b" * 60 and res.headers["ETag"] != old


def test_expected_rows_counts_valid_reviews_once():
    rows = [{"reviewerID": "u", "asin": "i", "unixReviewTime": 1_400_000_000},
            {"reviewerID": "u", "asin": "i", "unixReviewTime": 1_400_000_000},  # exact duplicate
            {"reviewerID": "u", "asin": "j", "unixReviewTime": 1_400_000_000_000},  # milliseconds
            {"reviewerID": "", "asin": "j", "unixReviewTime": 1_400_000_000},
            {"reviewerID": "v", "asin": "j", "unixReviewTime": 1_400_000_001}]
    data = "".join(json.dumps(r) + "\n" for r in rows) + "[" * 50_000 + "\nnot json\n"
    assert expected_rows(gzip.compress(data.encode())) == 2


def test_every_case_has_a_unique_name_and_the_heavy_ones_exist():
    names = [name for name, _ in CASES]
    assert len(names) == len(set(names)) and set(HEAVY) <= set(names)
