"""Atomic writes: the target holds the old content or the new, never a partial file."""

from __future__ import annotations

import pytest

from moedream.files import atomic_path, atomic_write_text


def test_atomic_write_replaces_content_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new", durable=False)
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "shard.parquet"
    target.write_text("complete")
    with pytest.raises(RuntimeError, match="writer crashed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["shard.parquet"]


def test_temp_file_is_hidden_from_globs_of_the_target_suffix(tmp_path):
    with atomic_path(tmp_path / "a.parquet") as tmp:
        assert tmp.parent == tmp_path
        assert not list(tmp_path.glob("*.parquet"))
        tmp.write_text("x")
    assert [p.name for p in tmp_path.glob("*.parquet")] == ["a.parquet"]
