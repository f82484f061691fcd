from pathlib import Path

import pytest

from cammsr.core.config import Params, ParamsError, load_params
from tests.params_builder import params_dict, write_params

REPO = Path(__file__).resolve().parents[3]


def test_the_working_params_yaml_loads():
    """The one test of the repo's own params.yaml: it validates, whatever catalogs or values a user put in it
    (every other test builds its own params)."""
    p = load_params(REPO / "params.yaml")
    assert p.catalogs, "params.yaml lists no catalog"


def _write(tmp_path, mutate):
    raw = params_dict()
    mutate(raw)
    return write_params(tmp_path / "params.yaml", raw)


def test_the_tests_own_params_load():
    p = Params.model_validate(params_dict({"a": {"reviews": "file:a.json"}}, {"train": {"epochs": 3}}))
    assert list(p.catalogs) == ["a"] and p.train.epochs == 3 and p.evaluate.ks == [5, 10, 20]


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = _write(tmp_path, lambda r: r["train"].update(lr_rate=0.1))
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert "train.lr_rate" in str(e.value) and str(path) in str(e.value)


def test_wrong_type_is_an_error_naming_the_key(tmp_path):
    path = _write(tmp_path, lambda r: r["train"].update(epochs="many"))
    with pytest.raises(ParamsError, match=r"train\.epochs: .*\(found 'many'\)"):
        load_params(path)
    path = _write(tmp_path, lambda r: r["catalogs"]["demo"].update(images="sometimes"))
    with pytest.raises(ParamsError, match=r"catalogs\.demo\.images"):
        load_params(path)


def test_missing_file_bad_yaml_and_unknown_catalog(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="expected a mapping at the top level, found list"):
        load_params(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("train: [1,\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "broken.yaml")
    path = write_params(tmp_path / "params.yaml", params_dict({"toys": {"reviews": "file:t.json"},
                                                               "books": {"reviews": "file:b.json"}}))
    with pytest.raises(KeyError, match=r"known: \['books', 'toys'\]"):
        load_params(path).catalog("beauty")
