"""``record()`` of benchmarks/_common.py: each benchmark's block in its own file under
results/, one index row per benchmark in RESULTS.md (no Ray)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "_common.py"


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _row(index: Path, name: str) -> list[str]:
    return [line for line in index.read_text().splitlines() if line.startswith(f"| [{name}](")]


def test_record_writes_the_block_file_and_its_index_row(common, tmp_path):
    index = tmp_path / "RESULTS.md"
    index.write_text("# Benchmark results\n\nIntro.\n")
    common.record(
        "alpha", "Alpha", "| a |\n|---|\n| 1 |\n\n![alpha](plots/alpha.png)", "cmd a", index
    )

    block = (tmp_path / "results" / "alpha.md").read_text()
    assert block.startswith("<!-- bench:alpha -->\n## Alpha\n\nCommand: `cmd a`  \n")
    assert block.endswith("| 1 |\n\n![alpha](../plots/alpha.png)\n<!-- /bench:alpha -->\n")
    [row] = _row(index, "alpha")
    assert row.startswith("| [alpha](results/alpha.md) | `cmd a` | ")
    assert index.read_text().startswith("# Benchmark results\n\nIntro.\n")
    assert common.INDEX_HEADER in index.read_text()


def test_rerecord_replaces_the_block_and_row_and_keeps_the_reading(common, tmp_path):
    index = tmp_path / "RESULTS.md"
    common.record("alpha", "Alpha", "old figure 1.0", "cmd old", index)
    path = common.block_path("alpha", index)
    path.write_text(path.read_text() + "\nReading written by hand.\n")

    common.record("alpha", "Alpha", "new figure 2.0", "cmd new", index)

    text = path.read_text()
    assert "new figure 2.0" in text and "old figure" not in text
    assert text.count("<!-- bench:alpha -->") == 1
    assert text.endswith("<!-- /bench:alpha -->\n\nReading written by hand.\n")
    [row] = _row(index, "alpha")
    assert "`cmd new`" in row


def test_a_new_benchmark_gets_its_row_appended_to_the_index_table(common, tmp_path):
    index = tmp_path / "RESULTS.md"
    common.record("alpha", "Alpha", "a", "cmd a", index)
    common.record("beta", "Beta", "b", "cmd a | tee log", index)
    common.record("alpha", "Alpha", "a2", "cmd a2", index)

    lines = index.read_text().splitlines()
    table = lines[lines.index(common.INDEX_HEADER) :]
    assert [line.split("]")[0] for line in table[2:]] == ["| [alpha", "| [beta"]
    assert "`cmd a \\| tee log`" in table[3]  # a bare pipe would split the cell
    assert (tmp_path / "results" / "beta.md").read_text().count("<!-- /bench:beta -->") == 1
