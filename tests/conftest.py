"""Test-session setup: everything offline, Prefect on one temporary server for the whole session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (about 12 s to start) shared by every flow test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# Session fixtures that cost tens of seconds (the whole DAG once; the Prefect test server's start): a test
# using one must be marked slow, or `pytest -m "not slow"` would quietly pay for it.
SLOW_FIXTURES = frozenset({"dvc_project", "flow_project", "prefect_harness"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [item.nodeid for item in items
                if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError(f"uses {sorted(SLOW_FIXTURES)} but is not marked @pytest.mark.slow: {unmarked}")
