"""Add a catalog to params.yaml without disturbing anything else in it (ruamel.yaml round trip).

Comments, key order, quoting, flow lists and blank lines all survive: the only change to the file is
the new entry at the end of ``catalogs:``. The new text is validated against the params schema
before it is written, and written atomically, and only if the file did not change since it was read.
"""

from __future__ import annotations

import copy
import difflib
import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.util import load_yaml_guess_indent

from cammsr.core.atomic import write_bytes_atomic
from cammsr.core.config import Params
from cammsr.core.errors import BadInput

ONBOARD_COMMENT = "onboarded by `cammsr onboard`"  # the comment line above every entry onboarding adds


class ParamsEditError(BadInput, ValueError):
    """The edit cannot be made (catalog exists, file changed meanwhile, result invalid); names the file."""


def _yaml(text: str) -> YAML:
    """A round-trip YAML that writes ``text``'s own indentation back (guessed by ruamel)."""
    _, indent, dash_offset = load_yaml_guess_indent(text)
    indent, dash_offset = indent or 2, dash_offset or 0
    y = YAML()  # round-trip mode
    y.preserve_quotes = True
    y.width = 4096  # never re-wrap long lines (the params comments are long)
    y.indent(mapping=indent, sequence=indent + dash_offset, offset=dash_offset)
    # ruamel writes a bare `key:` for None; params.yaml spells it `null`
    y.representer.add_representer(type(None),
                                  lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def _last_leaf(mapping: CommentedMap) -> tuple[CommentedMap, Any]:
    """The innermost mapping and key at the very end of ``mapping`` (where trailing blank lines live)."""
    node, key = mapping, list(mapping)[-1]
    while isinstance(node[key], CommentedMap) and len(node[key]):
        node, key = node[key], list(node[key])[-1]
    return node, key


def _commented(value: Any) -> Any:
    """Mappings (nested ones too) as CommentedMap, so `_last_leaf` reaches the real last line of an entry."""
    if isinstance(value, Mapping):
        return CommentedMap((k, _commented(v)) for k, v in value.items())
    return value


def _move_trailing_lines(catalogs: CommentedMap, new: CommentedMap) -> None:
    """Move the blank/comment lines after the last catalog (they separate it from the next section).

    ruamel attaches them to the last key of the last catalog; left there, the new entry would come
    after them. The end-of-line comment of that key stays where it is.
    """
    node, key = _last_leaf(catalogs)
    token = node.ca.items.get(key, [None, None, None, None])[2]
    if token is None or "\n" not in token.value:
        return
    own_line, rest = token.value.split("\n", 1)
    if not rest:
        return
    token.value = own_line + "\n"
    moved = copy.copy(token)
    moved.value = "\n" + rest  # end the new entry's last line, then the lines that followed the old one
    leaf, leaf_key = _last_leaf(new)
    leaf.ca.items[leaf_key] = [None, None, moved, None]


def add_catalog_text(text: str, name: str, entry: Mapping[str, Any], *, comment: str | None = None,
                     source: str = "params.yaml") -> str:
    """``text`` (a params.yaml) with catalog ``name`` appended to ``catalogs:``.

    Args:
        text: the current file contents.
        name: the new catalog's key; must not exist yet.
        entry: its fields (reviews, meta, images, source_dep), written in this order.
        comment: an optional comment line put above the entry.
        source: the file name used in error messages.

    Raises:
        ParamsEditError: ``catalogs`` is missing, ``name`` exists, or the result does not validate.
    """
    y = _yaml(text)
    data = y.load(text)
    catalogs = data.get("catalogs") if isinstance(data, Mapping) else None
    if not isinstance(catalogs, CommentedMap) or not len(catalogs):
        raise ParamsEditError(f"{source}: expected a non-empty `catalogs:` mapping to add {name!r} to")
    if name in catalogs:
        raise ParamsEditError(f"{source}: catalogs.{name} exists already; pick another name or remove it first")
    new = _commented(entry)  # nested too: the blank lines after the entry must follow its innermost last key
    _move_trailing_lines(catalogs, new)
    catalogs[name] = new
    if comment:
        catalogs.yaml_set_comment_before_after_key(name, before=comment, indent=2)
    buf = io.StringIO()
    y.dump(data, buf)
    out = buf.getvalue()
    _check_only_added(text, out, source)
    validate_params_text(out, source)
    return out


def _check_only_added(old: str, new: str, source: str) -> None:
    """Refuse an edit that would change any existing line (a layout ruamel cannot write back as it was)."""
    changed = [line for line in difflib.ndiff(old.splitlines(), new.splitlines()) if line.startswith("- ")]
    if changed:
        raise ParamsEditError(f"{source}: adding the catalog would also rewrite {len(changed)} existing line(s), "
                              f"e.g. {changed[0][2:]!r}; add the entry by hand instead")


def validate_params_text(text: str, source: str = "params.yaml") -> Params:
    """Parse and validate params text; errors name the file and the key."""
    try:
        return Params.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as exc:
        raise ParamsEditError(f"{source}: the edited params would be invalid: {exc}") from exc


def remove_catalog_text(text: str, name: str, *, source: str = "params.yaml") -> str:
    """``text`` without the lines `add_catalog_text` added for catalog ``name`` (its comment and entry).

    Raises:
        ParamsEditError: ``name`` is not a catalog here, its entry does not carry onboarding's comment,
            or taking its lines out would not leave exactly the other params (then remove it by hand).
    """
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"catalogs:\s*(#.*)?$", line)), None)
    if start is None:
        raise ParamsEditError(f"{source}: no top-level `catalogs:` mapping")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i][0].isspace()),
               len(lines))  # the next top-level key
    keys = [i for i in range(start + 1, end) if lines[i].strip() and not lines[i].lstrip().startswith("#")]
    indent = len(lines[keys[0]]) - len(lines[keys[0]].lstrip()) if keys else 0
    key = next((i for i in keys if len(lines[i]) - len(lines[i].lstrip()) == indent
                and re.match(rf"\s*{re.escape(name)}:\s*(#.*)?$", lines[i])), None)
    if key is None:
        raise ParamsEditError(f"{source}: catalogs.{name} is not there; nothing to undo")
    if not lines[key - 1].strip().startswith(f"# {ONBOARD_COMMENT}"):
        raise ParamsEditError(f"{source}: catalogs.{name} was not added by `cammsr onboard` (no "
                              f"'# {ONBOARD_COMMENT}' line above it); remove it by hand if you mean to")
    stop = key + 1
    while stop < end and lines[stop].strip() and len(lines[stop]) - len(lines[stop].lstrip()) > indent:
        stop += 1
    out = "".join(lines[: key - 1] + lines[stop:])
    before, after = yaml.safe_load(text), yaml.safe_load(out)
    expected = copy.deepcopy(before)
    del expected["catalogs"][name]
    if after != expected:
        raise ParamsEditError(f"{source}: catalogs.{name} cannot be cut out cleanly (was its entry edited?); "
                              f"remove it by hand")
    if not expected["catalogs"]:
        raise ParamsEditError(f"{source}: catalogs.{name} is the only catalog; params.yaml needs one, so it stays")
    validate_params_text(out, source)
    return out


def unified_diff(old: str, new: str, path: str | Path) -> str:
    """A ``diff -u`` of two versions of ``path`` (what ``--dry-run`` prints)."""
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{path} (now)",
                                        f"{path} (after onboarding)"))


def write_if_unchanged(path: str | Path, expected: str, new: str) -> None:
    """Atomically replace ``path`` with ``new`` if it still holds ``expected``.

    Raises:
        ParamsEditError: the file changed since ``expected`` was read (someone else edited it).
    """
    path = Path(path)
    if path.read_text() != expected:
        raise ParamsEditError(f"{path}: changed while onboarding; nothing written, run the command again")
    write_bytes_atomic(path, new.encode())
