"""The stage registry is the one declaration of the DAG: dvc.yaml, the CLI and the params agree with it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from cammsr.core.config import CatalogParams, load_params
from cammsr.core.paths import CatalogPaths
from cammsr.core.summary import StageSummary
from cammsr.ops import dvc_yaml
from cammsr.ops.code_deps import code_deps, imported_modules, source_folder
from cammsr.ops.registry import DEMO_SOURCE_DIR, STAGES, StageContext, StageSpec, spec, upstream

REPO = Path(__file__).resolve().parents[3]
DEMO = CatalogParams(reviews="file:reviews.json", meta="file:meta.json", source_dep=DEMO_SOURCE_DIR)


def test_committed_dvc_yaml_is_what_the_registry_renders():
    diff = dvc_yaml.check(REPO / "dvc.yaml")
    assert not diff, "dvc.yaml differs from the registry; run `cammsr dvc-yaml`:\n" + "\n".join(diff[:60])


def test_check_reports_a_hand_edit(tmp_path):
    path = tmp_path / "dvc.yaml"
    dvc_yaml.write(path)
    assert dvc_yaml.check(path) == []
    path.write_text(path.read_text().replace("cammsr/data\n", "", 1))
    assert any(line.startswith("+") and "cammsr/data" in line for line in dvc_yaml.check(path))


class Recorder:
    """Wraps params; records the dotted path of every section or value read (``train``, ``ingest.retries``)."""

    def __init__(self, value, path: str, seen: set[str]):
        self._value, self._path, self._seen = value, path, seen

    def _child(self, value, path: str):
        self._seen.add(path)
        return Recorder(value, path, self._seen) if isinstance(value, BaseModel | dict) else value

    def __getattr__(self, name: str):
        return self._child(getattr(self._value, name), f"{self._path}.{name}" if self._path else name)

    def __getitem__(self, key: str):
        return self._child(self._value[key], f"{self._path}.{key}")


def _read_paths(stage: StageSpec, tmp_path: Path) -> set[str]:
    """The params paths a stage's call reads, with its entry function replaced by a stub."""
    params = load_params(REPO / "params.yaml").model_copy(update={"catalogs": {"demo": DEMO}})
    seen: set[str] = set()

    def stub(*args, **kwargs):
        if stage.name == "demo_source":  # the call turns generate_demo's result into a summary
            return SimpleNamespace(n_users=0, n_items=0, n_reviews=0, n_images=0, seconds=0.0)
        return StageSummary(stage.name, "demo")

    stage.call(stub, Recorder(params, "", seen), StageContext("demo", CatalogPaths.of("demo", tmp_path), tmp_path))
    # a section read only to reach a value inside it is not a use of the whole section
    return {p for p in seen if not any(q.startswith(p + ".") for q in seen)}


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_params_a_stage_reads_are_exactly_the_ones_it_declares(stage, tmp_path):
    read = _read_paths(stage, tmp_path)
    declared = {p.replace("{catalog}", "demo") for p in stage.params}
    covered = declared | set(stage.untracked)
    assert all(any(r == d or r.startswith(d + ".") for d in covered) for r in read), (read, covered)
    assert all(any(r == d or r.startswith(d + ".") for r in read) for d in declared), (read, declared)


def test_edges_come_from_inputs_and_outputs():
    paths = CatalogPaths.of("demo", "data")
    edges = {s.name: upstream(s, paths, DEMO_SOURCE_DIR) for s in STAGES}
    assert edges == {
        "demo_source": [],
        "ingest": ["demo_source"],
        "encode_text": ["ingest"],
        "encode_image": ["ingest"],
        "split": ["ingest"],
        "split_features": ["encode_text", "encode_image", "split"],
        "train": ["split", "split_features"],
        "evaluate": ["split", "split_features", "train"],
        "recommend": ["ingest", "encode_text", "encode_image", "split", "train"],
    }
    assert upstream(spec("ingest"), paths, "https://example.org/reviews.json.gz") == []


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_code_deps_cover_every_module_the_stage_imports(stage):
    s = spec(stage)
    deps = code_deps(s.module)
    for module in imported_modules(s.module):
        assert source_folder(module) in deps, module
    assert "cammsr/ops" not in deps and "flows" not in deps  # drivers are not a stage's code


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_each_cli_command_runs_its_own_stage(stage, monkeypatch, tmp_path):
    from cammsr import cli
    from cammsr.ops import stages

    calls = []
    monkeypatch.setattr(stages, "run_stage_now",
                        lambda name, catalog, project, **opts: calls.append((name, catalog)) or
                        StageSummary(name, catalog))
    monkeypatch.setattr("cammsr.evaluate.report.metrics_table", lambda *a: "")
    s = spec(stage)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"catalogs": {"demo": DEMO.model_dump()}}))
    argv = s.cli.split()[1:] + (["--catalog", "demo"] if s.per_catalog else [])
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.app, argv)
    assert result.exit_code == 0, result.output
    assert calls == [(stage, "demo")]
