"""cammsr/ops/params_edit.py: a new catalog goes in at the end of `catalogs:`; no other byte of the file moves."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cammsr.ops.params_edit import (
    ParamsEditError,
    add_catalog_text,
    unified_diff,
    validate_params_text,
    write_if_unchanged,
)

# A params file in the committed file's layout: header comments, a comment line inside `catalogs:`,
# end-of-line comments, quoted strings, a flow list, blank lines between sections, nulls spelled `null`.
TEXT = """\
# params: one file, validated at load.

project:
  # every stage
  device: cpu             # (auto|cpu|cuda)
  seed: 0

catalogs:
  # dvc repro ingest@demo
  demo:
    reviews: file:data/sources/demo/reviews_Demo_5.json.gz
    meta: "file:data/sources/demo/meta_Demo.json.gz"
    images: true
    source_dep: data/sources/demo   # what DVC watches

features:
  text:
    template: "{title}. {brand}."   # (str) fed to the model
    revision: null

evaluate:
  ks: [5, 10, 20]         # (list[int]) cut-offs
"""
ENTRY = {"reviews": "https://h/r.json.gz", "meta": None, "images": False, "source_dep": "https://h/r.json.gz"}
ADDED = ["  # onboarded", "  web:", "    reviews: https://h/r.json.gz", "    meta: null", "    images: false",
         "    source_dep: https://h/r.json.gz"]


def test_the_entry_is_inserted_after_the_last_catalog_and_nothing_else_changes():
    new = add_catalog_text(TEXT, "web", ENTRY, comment="onboarded")
    old_lines, new_lines = TEXT.splitlines(), new.splitlines()
    at = old_lines.index("    source_dep: data/sources/demo   # what DVC watches") + 1  # the last catalog line
    assert new_lines == old_lines[:at] + ADDED + old_lines[at:]  # the blank line before `features:` stays after
    assert yaml.safe_load(new)["catalogs"]["web"] == ENTRY
    assert yaml.safe_load(new)["catalogs"]["demo"] == yaml.safe_load(TEXT)["catalogs"]["demo"]


def test_catalogs_as_the_last_section_and_no_comment():
    text = "evaluate:\n  ks: [5, 10]\ncatalogs:\n  demo:\n    reviews: file:a.json\n"
    new = add_catalog_text(text, "web", {"reviews": "file:b.json", "images": True})
    assert new == text + "  web:\n    reviews: file:b.json\n    images: true\n"


def test_four_space_indentation_is_kept():
    text = "catalogs:\n    demo:\n        reviews: file:a.json\n\ntrain:\n    epochs: 3\n"
    new = add_catalog_text(text, "web", {"reviews": "file:b.json"})
    assert new == "catalogs:\n    demo:\n        reviews: file:a.json\n    web:\n        reviews: file:b.json\n\n" \
                  "train:\n    epochs: 3\n"


@pytest.mark.parametrize(("text", "line"), [
    ("catalogs:\n    demo:\n        reviews: file:a.json\ntrain:\n  epochs: 3\n", "  epochs: 3"),  # mixed indents
    ("catalogs:\n  demo:\n    reviews: file:a.json\nevaluate:\n  ks: [5,10]\n", "  ks: [5,10]"),  # flow spacing
    ("catalogs:\n  demo:\n    reviews: file:a.json\n    meta: ~\n", "    meta: ~"),  # another spelling of null
])
def test_an_edit_that_would_rewrite_an_existing_line_is_refused(text, line):
    with pytest.raises(ParamsEditError) as err:
        add_catalog_text(text, "web", {"reviews": "file:b.json"}, source="p.yaml")
    assert str(err.value) == (f"p.yaml: adding the catalog would also rewrite 1 existing line(s), e.g. {line!r}; "
                              "add the entry by hand instead")


def test_refusals_name_the_file_and_the_key():
    with pytest.raises(ParamsEditError, match=r"^p\.yaml: catalogs\.demo exists already"):
        add_catalog_text(TEXT, "demo", ENTRY, source="p.yaml")
    invalid = r"(?s)^p\.yaml: the edited params would be invalid: .*catalogs\.typo\.imgaes"
    with pytest.raises(ParamsEditError, match=invalid):
        add_catalog_text(TEXT, "typo", {"reviews": "x", "imgaes": True}, source="p.yaml")
    with pytest.raises(ParamsEditError, match=r"^p\.yaml: expected a non-empty `catalogs:` mapping to add 'web' to"):
        add_catalog_text("project:\n  seed: 0\n", "web", ENTRY, source="p.yaml")
    with pytest.raises(ParamsEditError, match="invalid"):
        validate_params_text("catalogs: [1, 2]\n")
    assert list(validate_params_text(TEXT).catalogs) == ["demo"]


def test_the_diff_shows_only_added_lines_with_both_names():
    new = add_catalog_text(TEXT, "web", ENTRY, comment="onboarded")
    diff = unified_diff(TEXT, new, "params.yaml")
    lines = diff.splitlines()
    assert lines[:2] == ["--- params.yaml (now)", "+++ params.yaml (after onboarding)"]
    assert [ln[1:] for ln in lines[3:] if ln.startswith("+")] == ADDED
    assert not [ln for ln in lines[2:] if ln.startswith("-")]
    assert unified_diff(TEXT, TEXT, "params.yaml") == ""


def test_write_if_unchanged_writes_or_refuses_and_leaves_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(TEXT)
    new = add_catalog_text(TEXT, "web", ENTRY)
    write_if_unchanged(path, TEXT, new)
    assert path.read_text() == new and [p.name for p in tmp_path.iterdir()] == ["params.yaml"]

    someone_else = new + "# edited meanwhile\n"
    path.write_text(someone_else)
    with pytest.raises(ParamsEditError, match=r"params\.yaml: changed while onboarding; nothing written"):
        write_if_unchanged(path, new, add_catalog_text(new, "toys", {"reviews": "file:t.json"}))
    assert path.read_text() == someone_else


def test_the_working_params_yaml_takes_a_new_catalog_without_rewriting_a_line():
    """The committed file's layout must stay one ruamel writes back as it was, or `cammsr onboard` refuses it.

    Whatever catalogs it lists: the new name is one it does not have.
    """
    text = (Path(__file__).resolve().parents[3] / "params.yaml").read_text()
    name = "onboard-test-" + "x" * 8
    assert name not in yaml.safe_load(text)["catalogs"]
    old_lines, new_lines = text.splitlines(), add_catalog_text(text, name, ENTRY).splitlines()
    at = next((i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=False)) if a != b), len(old_lines))
    assert new_lines == old_lines[:at] + [f"  {name}:", *ADDED[2:]] + old_lines[at:]
