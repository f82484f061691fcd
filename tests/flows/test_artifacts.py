"""The markdown each flow run publishes."""

import json

from cammsr.core.summary import StageSummary
from cammsr.ops.dvc_sync import StageOutcome
from flows.artifacts import artifact_key, run_markdown


def _metrics(path):
    path.write_text(json.dumps({
        "model_name": "cammsr", "users": 3, "items": 5,
        "model": {"test": {"hr@5": 0.5, "ndcg@5": 0.25}},
        "popularity": {"test": {"hr@5": 0.2, "ndcg@5": 0.1}},
    }))
    return path


def test_stage_table_notes_and_metrics(tmp_path):
    ran = StageOutcome("ingest@demo", StageSummary("ingest", "demo", {"interactions": 12, "users": 3}, 1.25,
                                                   ["meta: none"]), skipped=False)
    skipped = StageOutcome("split@demo", StageSummary("split", "demo", {"users": 3}, 0.5, ["old note"]),
                           skipped=True)
    md = run_markdown("pipeline: demo", [ran, skipped], _metrics(tmp_path / "metrics.json"))
    lines = md.splitlines()
    assert lines[0] == "# pipeline: demo"
    assert "| ingest | ran | interactions=12 users=3 | 1.2 |" in lines
    assert "| split | up to date (dvc.lock) | users=3 | 0.5 |" in lines
    assert "- ingest: meta: none" in lines and "old note" not in md  # notes of skipped stages are old news
    assert "| demo | hr@5 | ndcg@5 |" in lines
    assert "| cammsr | 0.5000 | 0.2500 |" in lines and "| most-popular | 0.2000 | 0.1000 |" in lines


def test_no_metrics_section_without_metrics(tmp_path):
    md = run_markdown("refresh: demo", [StageSummary("fetch_sources", "demo", {"changed": 0})],
                      tmp_path / "missing.json")
    assert "| fetch_sources | ran | changed=0 |" in md and "metrics" not in md.lower()


def test_pipes_in_counts_do_not_break_the_table():
    md = run_markdown("x: y", [StageSummary("s", "y", {"why": "a|b"})])
    assert "| s | ran | why=a\\|b |" in md


def test_artifact_keys_are_prefect_safe():
    assert artifact_key("pipeline", "Toys_2023.v1") == "pipeline-toys-2023-v1"
