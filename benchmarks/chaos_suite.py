"""The chaos suite's table: each fault injected into a running model-based training, what the
run did, real steps repeated and wall-clock lost (RESULTS.md block ``chaos_suite``).

Runs ``pytest tests/integration/test_chaos.py`` (the slow SIGTERM test included) with
``MOEDREAM_CHAOS_REPORT`` set, so the tests write their rows (figures measured by the tests
themselves: counter deltas and iteration wall-clock) to a JSON file; records them if every test
passed. Time lost = the faulted iterations' wall-clock minus the suite's own fault-free
iterations of the same kind (with or without a world-model retrain), one per faulted iteration
that sampled real steps (one that sampled nothing is lost whole).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import markdown_table, parse_args, record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUITE = "tests/integration/test_chaos.py"


@dataclasses.dataclass
class Args:
    record: bool = True
    """Write the table to RESULTS.md (else print it)."""


def main(args: Args) -> None:
    report = Path(tempfile.mkdtemp(prefix="chaos_suite_")) / "table.json"
    env = {**os.environ, "MOEDREAM_CHAOS_REPORT": str(report), "PYTHONHASHSEED": "0"}
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", SUITE],
                         cwd=ROOT, env=env, check=False)  # fmt: skip
    seconds = time.monotonic() - start
    if run.returncode != 0 or not report.exists():
        raise SystemExit(f"the chaos suite failed (exit {run.returncode}): nothing recorded")
    rows = json.loads(report.read_text())
    table = markdown_table(
        ["fault", "what the run did", "real steps repeated", "time lost s"],
        [[r["fault"], r["did"], r["real_steps_repeated"], r["time_lost_s"]] for r in rows],
    )
    body = (
        f"`{SUITE}`: one MBMAPPO run (Overcooked cramped_room, 200 real steps per iteration, "
        "imagination from a tiny served world model through the coherence gate, a retrain "
        "every 2 iterations, one remote env runner) takes one fault per test; every row passed "
        "its checks (real steps counted once, every imagined row judged or counted dropped, "
        f"imagined steps learnt once, the failure logged with its cause). Suite wall-clock "
        f"{seconds:.0f} s. The machine was shared with other jobs (2 cores): time lost is "
        f"noisy, measured against the run's own fault-free iterations (an iteration that sampled "
        "nothing counts whole; a negative figure: the faulted iterations were quicker, e.g. a "
        f"failed retrain skips the swap).\n\n{table}"
    )
    if args.record:
        record("chaos_suite", "Chaos suite: faults during a model-based run", body)
    else:
        print(body)


if __name__ == "__main__":
    main(parse_args(Args, __doc__))
