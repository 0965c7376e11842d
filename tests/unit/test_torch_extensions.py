"""TORCH_EXTENSIONS_DIR: a per-venv default, and stale torch build locks removed under a flock
that dies with its holder (the DeepSpeed op build itself runs in test_expert_parallel.py)."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moedream import torch_extensions as te


def test_the_default_cache_lives_in_the_running_venv(monkeypatch):
    monkeypatch.setattr(sys, "prefix", "/some/venv")
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    assert te.default_dir() == Path("/some/venv/torch_extensions")


def test_outside_a_venv_the_cache_is_keyed_by_the_torch_version(monkeypatch):
    import torch

    monkeypatch.setattr(sys, "prefix", sys.base_prefix)
    assert te.default_dir().name == f"torch-{torch.__version__}"


def test_an_unset_variable_gets_the_default_and_a_set_one_is_kept(monkeypatch, tmp_path):
    monkeypatch.delenv(te.ENV, raising=False)
    monkeypatch.setattr(te, "default_dir", lambda: tmp_path / "default")
    assert te.torch_extensions_dir() == tmp_path / "default"
    assert (tmp_path / "default").is_dir()
    assert os.environ[te.ENV] == str(tmp_path / "default")  # inherited by child processes
    monkeypatch.setenv(te.ENV, str(tmp_path / "mine"))
    assert te.torch_extensions_dir() == tmp_path / "mine"


def test_stale_torch_build_locks_are_removed_with_a_log_line(tmp_path, caplog):
    (tmp_path / "deepspeed_shm_comm").mkdir()
    lock = tmp_path / "deepspeed_shm_comm" / te.TORCH_BUILD_LOCK
    lock.touch()
    kept = tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    kept.touch()
    with caplog.at_level(logging.WARNING, logger=te.__name__):
        assert te.remove_stale_build_locks(tmp_path) == [lock]
    assert not lock.exists() and kept.exists()
    assert "stale torch extension build lock" in caplog.text and str(lock) in caplog.text


def _try_flock(folder: Path) -> bool:
    with open(folder / te.FLOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def test_the_build_flock_excludes_others_and_dies_with_its_holder(tmp_path):
    """A process killed while holding the flock (as a killed build would be) releases it."""
    holder = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from moedream.torch_extensions import build_flock
        with build_flock(Path({str(tmp_path)!r})):
            print("held", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert not _try_flock(tmp_path)
    finally:
        proc.kill()
        proc.wait()
    assert _try_flock(tmp_path)


def test_the_flock_is_released_on_error(tmp_path):
    with pytest.raises(RuntimeError), te.build_flock(tmp_path):
        raise RuntimeError("build failed")
    assert _try_flock(tmp_path)
