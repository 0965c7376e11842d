"""Resume points of one results run: what a (variant, seed) run saves at every evaluation so a
re-run of the runner continues it from its last evaluation instead of starting over.

On disk, in the run's folder (moedream.results.platform_train.RUN_FOLDER)::

    resume/resume.json     the last complete resume point (ResumePoint, JSON), written last
    resume/eval_<n>/       the RLlib algorithm saved at the run's n-th evaluation

A point is saved by writing the algorithm to a hidden temporary folder, renaming it to
``eval_<n>`` and then atomically replacing ``resume.json`` (moedream.files): a kill at any moment
leaves the previous point whole, so at most one evaluation is lost. Older folders are removed
once the new pointer is written. Plain Python (no Ray): the algorithm is written by the caller's
``write(folder)``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moedream.files import atomic_write_text

RESUME_DIR = "resume"
POINTER_FILE = "resume.json"
POINT_PREFIX = "eval_"


@dataclasses.dataclass
class ResumePoint:
    """Where a run stands right after one of its evaluations."""

    evaluations: int
    """Evaluations recorded so far, this one included (its row is already in the JSONL)."""
    real_steps: int
    """Real env steps at this evaluation, the world model's collection included."""
    offset: int
    """Real env steps of the world model's collection (0 for a model-free run)."""
    wallclock_s: float
    """The run's seconds so far without the evaluations' own time."""
    next_mark: int
    """The real step at or past which the next evaluation is due."""
    folder: str
    """The algorithm's checkpoint folder, relative to the resume folder."""

    @property
    def team_real_steps(self) -> int:
        """Real env steps the team sampled itself (RLlib's lifetime count at this point)."""
        return self.real_steps - self.offset


class RunCheckpoints:
    """The resume points of the run in ``run_dir`` (only the newest complete one is kept)."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / RESUME_DIR
        self.pointer = self.dir / POINTER_FILE

    def latest(self) -> ResumePoint | None:
        """The last complete point, or None (none saved, or its folder is gone)."""
        if not self.pointer.is_file():
            return None
        try:
            point = ResumePoint(**json.loads(self.pointer.read_text()))
        except (ValueError, TypeError):  # unreadable or from another layout: start over
            return None
        return point if self.path(point).is_dir() else None

    def path(self, point: ResumePoint) -> Path:
        return self.dir / point.folder

    def save(self, point: dict[str, Any], write: Callable[[Path], Any]) -> ResumePoint:
        """Write the algorithm with ``write(folder)`` and make ``point`` (ResumePoint fields
        without ``folder``) the latest; returns it."""
        resume = ResumePoint(**point, folder=f"{POINT_PREFIX}{point['evaluations']:05d}")
        final = self.path(resume)
        tmp = self.dir / f".{resume.folder}.tmp"
        for stale in (tmp, final):  # left by a kill before the pointer named them
            shutil.rmtree(stale, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            write(tmp)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.pointer, json.dumps(dataclasses.asdict(resume), indent=1))
        for old in self.dir.glob(f"{POINT_PREFIX}*"):
            if old.name != resume.folder:
                shutil.rmtree(old, ignore_errors=True)
        return resume
