"""Shared by the benchmark scripts: machine description and recording figures in RESULTS.md.

Each benchmark owns one block of RESULTS.md, between ``<!-- bench:NAME -->`` markers, and
replaces it with its latest figures (command, machine, date, table) every run.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}"
    )


def markdown_table(headers: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def record(name: str, title: str, body: str, command: str | None = None) -> None:
    """Replace (or append) the block of benchmark ``name`` in RESULTS.md and print it."""
    command = command or "python " + " ".join(
        [sys.argv[0].replace(os.getcwd() + "/", "")] + sys.argv[1:]
    )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"Command: `{command}`  \nMachine: {machine()}  \nMeasured: {stamp}\n\n{body.strip()}\n"
        f"<!-- /bench:{name} -->"
    )
    print(block)
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nLatest figures of every script in `benchmarks/`, re-run with `make bench`.\n"
    )
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S
    )
    text = (
        pattern.sub(lambda _m: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    RESULTS.write_text(text)
