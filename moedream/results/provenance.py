"""Which code and config made a results run: the git commit (and whether the work tree had
uncommitted changes) of each sitting, read back from the run's evaluation rows.

A sitting is one call of the runner's train_fn for a run: the first, then one per resume. Every
evaluation row it writes carries ``"code": {"commit": <sha>, "dirty": <bool>}``, and its first
row also ``"config"`` (the resolved settings it trained with), so a run resumed on other code
records both versions. Rows written before this bookkeeping existed carry neither: their code
is "unrecorded".
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[2]
UNKNOWN_COMMIT = "unknown"  # not run from a git work tree, or git missing
UNRECORDED = "unrecorded"  # rows written before runs recorded their code
UNPINNED = (UNKNOWN_COMMIT, UNRECORDED)


def code_version(repository: str | Path = REPOSITORY) -> dict[str, Any]:
    """{"commit": HEAD's sha, "dirty": tracked files differ from it} of ``repository``.
    Untracked files do not count as dirty (run folders and scratch files live there)."""
    try:
        commit = _git(repository, "rev-parse", "HEAD")
        status = _git(repository, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": UNKNOWN_COMMIT, "dirty": False}
    return {"commit": commit, "dirty": bool(status)}


def _git(repository: str | Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repository), *args], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def code_label(code: dict[str, Any] | None) -> str:
    """Short name of a row's code: "1a2b3c4", "1a2b3c4+dirty", "unknown" or "unrecorded"."""
    if not code:
        return UNRECORDED
    commit = str(code.get("commit", UNKNOWN_COMMIT))
    label = commit if commit == UNKNOWN_COMMIT else commit[:7]
    return f"{label}+dirty" if code.get("dirty") else label


def run_code_labels(points: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """The distinct code labels of a run's evaluation rows, in the order they first appear."""
    return tuple(dict.fromkeys(code_label(p.get("code")) for p in points))


def sittings(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's sittings from its rows: each starts at a row carrying "config" (rows from
    before the bookkeeping form one sitting of unrecorded code). For the done file."""
    found: list[dict[str, Any]] = []
    for index, point in enumerate(points):
        if not found or "config" in point:
            found.append({"first_evaluation": index, "evaluations": 0,
                          "code": point.get("code"), "config": point.get("config")})  # fmt: skip
        found[-1]["evaluations"] += 1
    return found


def mixed_code_warnings(codes_by_seed: dict[int, tuple[str, ...]], row: str) -> list[str]:
    """Why ``row``'s runs (seed -> its code labels) are not one measurement of one code: seeds
    on different code, or code a commit does not pin (uncommitted changes, unknown)."""
    labels = list(dict.fromkeys(label for codes in codes_by_seed.values() for label in codes))
    warnings = []
    if len(labels) > 1:
        ran = "; ".join(f"{label} (seeds {_seeds_on(codes_by_seed, label)})" for label in labels)
        warnings.append(
            f"`{row}` mixes code versions: {ran}. A row mixing code is not one measurement: "
            "re-run its seeds on one commit (delete their runs, or use a new --out)"
        )
    unpinned = [label for label in labels if label.endswith("+dirty") or label in UNPINNED]
    if unpinned:
        warnings.append(
            f"`{row}` ran code no commit pins ({', '.join(unpinned)}: uncommitted changes, no "
            "git work tree, or runs from before commits were recorded); run the rows that go "
            "in the table from a clean commit"
        )
    return warnings


def _seeds_on(codes_by_seed: dict[int, tuple[str, ...]], label: str) -> str:
    return ", ".join(str(seed) for seed, codes in codes_by_seed.items() if label in codes)
