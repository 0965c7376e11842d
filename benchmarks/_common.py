"""Shared by the benchmark scripts: the Args command line, timing loops, the machine's matmul
peak, machine description and recording figures in benchmarks/results/ and RESULTS.md.

Each benchmark owns one block, between ``<!-- bench:NAME -->`` markers, in its own file
benchmarks/results/NAME.md (readings written by hand may follow the block), and one row of the
index table in RESULTS.md (link, command, machine, date). Every run replaces both with its
latest figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from moedream.files import atomic_write_text

RESULTS = Path(__file__).with_name("RESULTS.md")
BLOCKS_DIR_NAME = "results"
INDEX_HEADER = "| block | command | machine | measured |"
INDEX_SECTION = (
    "## Blocks\n\nOne file per benchmark in [results/](results/): its latest full figures "
    "(the block `record()` in `_common.py` rewrites) and readings written by hand.\n\n"
    f"{INDEX_HEADER}\n|---|---|---|---|\n"
)
RESULTS_INTRO = (
    "# Benchmark results\n\n"
    "Latest figures of every script in `benchmarks/`, re-run with `make bench`.\n"
)
ArgsT = TypeVar("ArgsT")


def parse_args(args_class: type[ArgsT], description: str, argv: list[str] | None = None) -> ArgsT:
    """An ``args_class`` (a dataclass with defaults) from the command line: one
    ``--kebab-case`` flag per field, ``--x/--no-x`` for bools, ``nargs="+"`` for tuples."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for field in dataclasses.fields(args_class):
        flag, default = f"--{field.name.replace('_', '-')}", field.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            item_type = type(default[0]) if default else str
            parser.add_argument(flag, type=item_type, nargs="+", default=list(default))
        else:
            parser.add_argument(flag, type=type(default), default=default)
    parsed = vars(parser.parse_args(argv))
    return args_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in parsed.items()})


def cpu_bf16_units() -> str:
    """The CPU's native bf16 matmul units: "AMX", "AVX512-BF16" or "" (bf16 then emulated)."""
    from moedream.world_model.train_local import cpu_has_amx

    if cpu_has_amx():
        return "AMX"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return "AVX512-BF16" if "avx512_bf16" in flags else ""


def with_bf16(mode: str) -> bool:
    """Whether to measure bf16 beside fp32 for ``--bf16 auto|on|off``: "auto" where the CPU
    has native bf16 units (AMX or AVX512-BF16; elsewhere bf16 matmuls are emulated)."""
    if mode not in ("auto", "on", "off"):
        raise SystemExit(f"--bf16 {mode!r}: use auto, on or off")
    return mode == "on" or (mode == "auto" and bool(cpu_bf16_units()))


def interleaved_times(
    steps: dict[str, Callable[[], object]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` timed calls per step function, after ``warmup`` untimed
    ones. The functions are called round-robin (one call each, in turn), so load from other
    processes on a shared machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


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


def publish(name: str, title: str, body: str, to_results: bool) -> None:
    """``record`` the figures in RESULTS.md if ``to_results`` (the --record flag), else print."""
    if to_results:
        record(name, title, body)
    else:
        print(body)


def block_path(name: str, index: Path = RESULTS) -> Path:
    """The file holding the block of benchmark ``name``, beside the ``index`` (RESULTS.md)."""
    return index.parent / BLOCKS_DIR_NAME / f"{name}.md"


def index_row(name: str, command: str, machine_text: str, stamp: str) -> str:
    """The row of benchmark ``name`` in the index table of RESULTS.md. Pipes are escaped
    because a bare ``|`` would split the cell."""
    cells = [f"[{name}]({BLOCKS_DIR_NAME}/{name}.md)", f"`{command}`", machine_text, stamp]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def with_index_row(text: str, name: str, row: str) -> str:
    """``text`` (RESULTS.md) with the index row of ``name`` replaced by ``row``, or ``row``
    appended to the index table (created at the end if missing)."""
    own_row = re.compile(rf"^\| \[{re.escape(name)}\]\({BLOCKS_DIR_NAME}/.*$", re.M)
    if own_row.search(text):
        return own_row.sub(lambda _m: row, text, count=1)
    if INDEX_HEADER not in text:
        text = text.rstrip() + "\n\n" + INDEX_SECTION
    lines = text.rstrip("\n").split("\n")
    start = lines.index(INDEX_HEADER)
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[:end] + [row] + lines[end:]) + "\n"


def with_block(text: str, name: str, block: str) -> str:
    """``text`` with the ``<!-- bench:name -->`` block replaced by ``block`` (or appended)."""
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S
    )
    if pattern.search(text):
        return pattern.sub(lambda _m: block, text)
    return (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"


def block_text(
    name: str, title: str, command: str, machine_text: str, stamp: str, body: str
) -> str:
    """The ``<!-- bench:name -->`` block: title, command, machine, date, then ``body``."""
    # The block file sits one folder below the plots' parent: benchmarks/plots/x.png is
    # ../plots/x.png from benchmarks/results/NAME.md.
    body = body.strip().replace("](plots/", "](../plots/")
    return (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"Command: `{command}`  \nMachine: {machine_text}  \nMeasured: {stamp}\n\n{body}\n"
        f"<!-- /bench:{name} -->"
    )


def record(
    name: str, title: str, body: str, command: str | None = None, index: Path = RESULTS
) -> None:
    """Write the block of benchmark ``name`` into benchmarks/results/NAME.md (replacing the
    old block, keeping any reading after it), update its row in the ``index`` (RESULTS.md)
    and print the block."""
    command = command or "python " + " ".join(
        [sys.argv[0].replace(os.getcwd() + "/", "")] + sys.argv[1:]
    )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine_text = machine()
    block = block_text(name, title, command, machine_text, stamp, body)
    print(block)
    path = block_path(name, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, with_block(path.read_text() if path.exists() else "", name, block))
    text = index.read_text() if index.exists() else RESULTS_INTRO
    row = index_row(name, command, machine_text, stamp)
    atomic_write_text(index, with_index_row(text, name, row))
