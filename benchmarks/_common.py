"""Shared by the benchmark scripts: the Args command line, timing loops, the machine's matmul
peak, machine description and recording figures in RESULTS.md.

Each benchmark owns one block of RESULTS.md, between ``<!-- bench:NAME -->`` markers, and
replaces it with its latest figures (command, machine, date, table) every run.
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

RESULTS = Path(__file__).with_name("RESULTS.md")
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
