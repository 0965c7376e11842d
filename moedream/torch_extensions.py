"""Where DeepSpeed's JIT-compiled ops are built and cached (TORCH_EXTENSIONS_DIR), and loading them.

DeepSpeed's torch comm backend compiles a shared-memory op (``deepspeed_shm_comm``) with torch's
C++ extension builder the first time ``deepspeed.init_distributed`` runs on CPU: a C++
compiler (g++) and ninja are needed, and the build takes minutes on a busy 2-core machine. The
cache defaults to a folder inside the running venv, so two venvs (worktrees, a torch upgrade)
never load an op compiled against another torch. Torch guards a build with a ``lock`` file
(``FileBaton``) that a killed build leaves behind, and every later load then waits for it
forever; moedream loads the op under its own ``flock`` (released by the kernel when its
holder dies), so a ``lock`` file found while holding that flock is stale and is removed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "TORCH_EXTENSIONS_DIR"
FLOCK_NAME = ".moedream-build.flock"
TORCH_BUILD_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton, one per op build folder

log = logging.getLogger(__name__)


def default_dir() -> Path:
    """Inside the active venv (its torch built the ops); outside a venv, the user cache keyed
    by the torch version."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "torch_extensions"
    import torch

    return Path.home() / ".cache" / "moedream" / "torch_extensions" / f"torch-{torch.__version__}"


def torch_extensions_dir() -> Path:
    """$TORCH_EXTENSIONS_DIR, set to ``default_dir()`` first when unset (torch reads the
    variable at build time; child processes inherit it). The folder exists on return."""
    folder = Path(os.environ.setdefault(ENV, str(default_dir())))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def remove_stale_build_locks(folder: Path) -> list[Path]:
    """Deletes torch's ``lock`` files under ``folder`` (one level down: ``<op>/lock``); only
    call it while holding ``build_flock`` (then no build of ours is running). Returns them."""
    stale = sorted(folder.glob(f"*/{TORCH_BUILD_LOCK}"))
    for lock in stale:
        log.warning("removing a stale torch extension build lock %s (left by a killed build)", lock)
        lock.unlink(missing_ok=True)
    return stale


@contextmanager
def build_flock(folder: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``folder``'s build lock file: one process of this venv
    builds or loads ops at a time (others wait), and a holder that dies releases it."""
    with open(folder / FLOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_deepspeed_comm_ops() -> None:
    """Builds (first time) or loads DeepSpeed's shared-memory comm op under ``build_flock``,
    after removing stale ``lock`` files; call it before ``deepspeed.init_distributed``, whose
    own load then finds the op already loaded in this process. A no-op where DeepSpeed has no
    such op (no CPU shm support)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    folder = torch_extensions_dir()
    with build_flock(folder):
        remove_stale_build_locks(folder)
        builder.load(verbose=False)
