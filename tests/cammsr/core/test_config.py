from pathlib import Path

import pytest
import yaml

from cammsr.core.config import ParamsError, load_params

REPO = Path(__file__).resolve().parents[3]


def test_repo_params_load():
    p = load_params(REPO / "params.yaml")
    assert "demo" in p.catalogs and p.evaluate.ks == [5, 10, 20]


def _write(tmp_path, mutate):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = _write(tmp_path, lambda r: r["train"].update(lr_rate=0.1))
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert "train.lr_rate" in str(e.value) and str(path) in str(e.value)


def test_wrong_type_is_an_error_naming_the_key(tmp_path):
    path = _write(tmp_path, lambda r: r["train"].update(epochs="many"))
    with pytest.raises(ParamsError, match=r"train\.epochs"):
        load_params(path)
    path = _write(tmp_path, lambda r: r["catalogs"]["demo"].update(images="sometimes"))
    with pytest.raises(ParamsError, match=r"catalogs\.demo\.images"):
        load_params(path)


def test_missing_file_and_unknown_catalog(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(KeyError, match="known: \\['demo'\\]"):
        load_params(REPO / "params.yaml").catalog("beauty")
