"""cammsr/core/atomic.py: a reader sees the old file or the new one, never a torn one, and no temp file stays."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cammsr.core.atomic import atomic_path, write_bytes_atomic, write_json_atomic, write_parquet_atomic


class Boom(Exception):
    """Stands in for whatever stops a writer halfway (a bug, a full disk, a kill turned into an exception)."""


def test_success_replaces_the_target_and_leaves_only_it(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        assert tmp.name.startswith(".out.bin.") and tmp.name.endswith(".tmp")  # hidden, beside the target
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing visible until the block ends
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_failure_inside_the_block_keeps_the_old_file_byte_identical(tmp_path):
    target = tmp_path / "table.parquet"
    old = bytes(range(256)) * 10
    target.write_bytes(old)
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of a new file")
        raise Boom
    assert target.read_bytes() == old
    assert target.stat().st_mtime_ns == 1_000_000_000  # not even rewritten with the same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]  # the temp file is gone


def test_a_failure_before_anything_existed_leaves_nothing(tmp_path):
    target = tmp_path / "deep" / "er" / "x.json"
    with pytest.raises(Boom), atomic_path(target, suffix=".json"):
        raise Boom
    assert list((tmp_path / "deep" / "er").iterdir()) == []  # the folders are made, no file appears


def test_bytes_writer_round_trips(tmp_path):
    target = tmp_path / "sub" / "b.bin"
    write_bytes_atomic(target, b"\x00\xff" * 3)
    assert target.read_bytes() == b"\x00\xff\x00\xff\x00\xff"
    write_bytes_atomic(target, b"")
    assert target.read_bytes() == b""
    assert [p.name for p in target.parent.iterdir()] == ["b.bin"]


def test_json_writer_is_sorted_indented_and_stringifies_what_json_cannot(tmp_path):
    target = tmp_path / "s.json"
    write_json_atomic(target, {"b": 1, "a": [1.5, None], "path": tmp_path})
    text = target.read_text()
    assert text == '{\n  "a": [\n    1.5,\n    null\n  ],\n  "b": 1,\n  "path": "' + str(tmp_path) + '"\n}\n'
    assert json.loads(text) == {"a": [1.5, None], "b": 1, "path": str(tmp_path)}


def test_parquet_writer_round_trips_schema_values_and_metadata(tmp_path):
    schema = pa.schema([("item_id", pa.string()), ("v", pa.list_(pa.float32(), 2))], metadata={b"dim": b"2"})
    table = pa.table({"item_id": ["a", None], "v": [[1.0, 2.5], [0.0, -1.0]]}, schema=schema)
    target = tmp_path / "t.parquet"
    write_parquet_atomic(target, table)
    back = pq.read_table(target)
    assert back.equals(table) and back.schema.metadata[b"dim"] == b"2"
    assert pq.ParquetFile(target).metadata.row_group(0).column(0).compression == "ZSTD"
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_a_writer_that_fails_midway_keeps_the_old_json(tmp_path):
    target = tmp_path / "s.json"
    write_json_atomic(target, {"ok": True})
    before = target.read_bytes()
    with pytest.raises(TypeError):
        write_json_atomic(target, {(1, 2): "a tuple key"})  # default=str covers values, not keys
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


# ------------------------------------------------------------------------------ the stage's temp folder, modes


def test_inside_a_stage_temp_files_go_to_its_folder_which_the_next_run_clears(tmp_path):
    from cammsr.core.atomic import stage_temp_dir

    folder = tmp_path / "cat" / ".tmp" / "ingest"
    folder.mkdir(parents=True)
    (folder / ".interactions.parquet.dead00.parquet").write_bytes(b"left by a killed run")
    target = tmp_path / "cat" / "images" / "ab" / "x.png"
    with stage_temp_dir(folder):
        assert list(folder.iterdir()) == []  # cleared on entry
        with stage_temp_dir(folder), atomic_path(target) as tmp:  # re-entrant: the runner and the stage both may
            assert tmp.parent == folder
            tmp.write_bytes(b"img")
        assert folder.is_dir()
    assert target.read_bytes() == b"img"
    assert not (tmp_path / "cat" / ".tmp").exists()  # removed, the shared .tmp/ too once empty


def test_atomic_writes_get_the_mode_of_a_plain_write(tmp_path):
    old = os.umask(0o027)
    try:
        write_bytes_atomic(tmp_path / "new", b"x")
        assert oct((tmp_path / "new").stat().st_mode & 0o777) == "0o640"  # 0666 minus the umask, not 0600
        (tmp_path / "kept").write_bytes(b"x")
        os.chmod(tmp_path / "kept", 0o664)
        write_bytes_atomic(tmp_path / "kept", b"y")
        assert oct((tmp_path / "kept").stat().st_mode & 0o777) == "0o664"  # a file's own mode survives
        (tmp_path / "cached").write_bytes(b"x")
        os.chmod(tmp_path / "cached", 0o444)  # a read-only DVC cache link is not copied as read-only
        write_bytes_atomic(tmp_path / "cached", b"y")
        assert oct((tmp_path / "cached").stat().st_mode & 0o777) == "0o640"
    finally:
        os.umask(old)
