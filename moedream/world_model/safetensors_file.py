"""Checkpoint files: one safetensors file of tensors + string metadata, hashed and atomic."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from moedream.files import atomic_path


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, foreign or does not match."""


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over the names and bytes of ``tensors`` (what a checkpoint's metadata stores)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        flat = tensors[key].detach().cpu().contiguous().reshape(-1)  # 0-dim: no byte view
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_checkpoint(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` with ``metadata`` plus their ``sha256``; readers never see a
    half-written file (temp file + rename)."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**metadata, "sha256": tensors_digest(tensors)})
    return path


def read_checkpoint(path: Path, *, kind: str, fmt: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, tensors) of a file :func:`write_checkpoint` wrote with ``format`` = ``fmt``.

    Raises CheckpointError naming the path and the problem: missing, unreadable, another
    format, or tensors that do not match the stored sha256. ``kind`` names the checkpoint in
    those messages (e.g. "world-model").
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    where = repr(str(path))
    if not path.is_file():
        raise CheckpointError(f"{kind} checkpoint {where} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{where} is not a readable {kind} checkpoint (truncated or corrupted? {err})"
        ) from None
    if metadata.get("format") != fmt:
        raise CheckpointError(f"{where} is a safetensors file but not a moedream {kind} checkpoint")
    if metadata.get("sha256") != tensors_digest(tensors):
        raise CheckpointError(f"{where} is corrupted: its tensors do not match the stored sha256")
    return metadata, tensors
