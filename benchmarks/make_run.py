"""The main job's settings measured: seconds per stage and soups of `make run` and variants of it.

    python benchmarks/make_run.py --variant shipped --seed 0    # run configs/quickstart.yaml
    python benchmarks/make_run.py --variant v1 --seed 2          # run a variant of it
    python benchmarks/make_run.py --summarise-only --record      # the table of every run

Each run prints the table of every run folder under --out when it ends (--record writes it).

A variant is configs/quickstart.yaml with the overrides of ``VARIANTS`` (dotted keys), run by the
pipeline (moedream/platform/pipeline.py, resumable) in ``<out>/<variant>_seed<seed>`` with
``collect.seed`` and ``agents.seed`` set to the seed and ``eval_episodes`` evaluation episodes.
``--reuse-from RUN`` copies the finished collect, world_model, serve and gate stages of another
run folder of the same seed first (they depend on no agents setting), so a variant of the team's
settings trains on the same data and world model. The summary reads each run folder: stage
seconds (``stages.json``), each agents iteration's stage timers and training soups (its
TensorBoard events; a run stopped early shows the iterations it finished) and the evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, parse_args, publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, Any]] = {
    "shipped": {},  # configs/quickstart.yaml as it is
    # sampling batched over 4 envs per runner, 3 PPO epochs in each of the 3 updates on fresh
    # imagination, twice the real steps
    "v1": {
        "agents.num_envs_per_env_runner": 4,
        "agents.imagination.later_epochs": 3,
        "agents.iterations": 16,
    },
}
PREPARED_STAGES = ("collect", "world_model", "serve", "gate")
PREPARED_FILES = ("data", "gate_normalizer.json", "gate_state", "summary.txt")
ITERATION_TIMERS = ("sample", "imagine", "gate", "episodes", "learn", "copy", "wm_retrain")


RUNS_NOTE = (
    "Each row: `python benchmarks/make_run.py --variant VARIANT --seed SEED` (the variants' "
    "overrides are in the script; a row whose data and world model are another run's was "
    "started with `--reuse-from` that run's folder). Evaluation: the trained and the random "
    "team on the same 10 whole episodes (env seeds 10000-10009).\n\n"
)


@dataclasses.dataclass
class Args:
    variant: str = "shipped"
    seed: int = 0
    eval_episodes: int = 10
    out: str = "runs/make_run"
    http_port: int = 8617
    reuse_from: str = ""
    summarise_only: bool = False
    record: bool = False


def variant_config(variant: str, seed: int, args: Args) -> dict[str, Any]:
    """configs/quickstart.yaml with ``variant``'s overrides, the seed and this run's folder."""
    from moedream.config import ConfigError, load_yaml
    from moedream.results.variants import set_dotted

    if variant not in VARIANTS:
        raise ConfigError(f"--variant {variant!r} is unknown; choose from {sorted(VARIANTS)}")
    data = load_yaml(ROOT / "configs" / "quickstart.yaml")
    overrides = {**VARIANTS[variant], "collect.seed": seed, "agents.seed": seed}
    for key, value in overrides.items():
        set_dotted(data, key, value, f"variant {variant!r}")
    data.update(name=run_name(variant, seed), out=args.out, http_port=args.http_port,
                eval_episodes=args.eval_episodes)  # fmt: skip
    return data


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_seed{seed}"


def copy_prepared(source: Path, run_dir: Path) -> None:
    """Start ``run_dir`` from ``source``'s finished preparation stages (data, world model
    record, gate files); the agents and report stages then run on them."""
    ledger = json.loads((source / "stages.json").read_text())
    missing = [s for s in PREPARED_STAGES if s not in ledger]
    if missing:
        raise ValueError(f"--reuse-from {source}: stages {missing} are not finished there")
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in PREPARED_FILES:
        if (source / name).is_dir():
            shutil.copytree(source / name, run_dir / name, dirs_exist_ok=True)
        elif (source / name).exists():
            shutil.copy2(source / name, run_dir / name)
    prepared = {s: ledger[s] for s in PREPARED_STAGES}
    (run_dir / "stages.json").write_text(json.dumps(prepared, indent=1))


def run(args: Args) -> None:
    from moedream.platform.pipeline import run_pipeline
    from moedream.platform.quickstart import QuickstartConfig

    cfg = QuickstartConfig.from_dict(variant_config(args.variant, args.seed, args))
    cfg.validate()
    if args.reuse_from and not (cfg.run_dir / "stages.json").exists():
        copy_prepared(Path(args.reuse_from).resolve(), cfg.run_dir)
    run_pipeline(cfg)


# ---------------------------------------------------------------------------------- summary
def iteration_scalars(tensorboard_dir: Path) -> list[dict[str, float]]:
    """One dict per agents iteration (by real step) of its TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tensorboard_dir.is_dir():
        return []
    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    events.Reload()
    rows: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            rows.setdefault(event.step, {})[tag] = event.value
    return [rows[step] for step in sorted(rows)]


def prepared_in(ledger: dict[str, Any], names: dict[Path, str]) -> str:
    """The run (by its name in ``names``: resolved folder -> name) whose world model this run
    used: its own unless it started from another run's preparation (--reuse-from)."""
    checkpoint = Path(ledger["world_model"]["record"]["checkpoint"]).resolve()
    return next((name for d, name in names.items() if d in checkpoint.parents), "?")


def run_row(run_dir: Path, names: dict[Path, str]) -> dict[str, Any] | None:
    """The figures of one run folder (None if it has no stage finished)."""
    ledger_path = run_dir / "stages.json"
    if not ledger_path.exists():
        return None
    ledger = json.loads(ledger_path.read_text())
    iterations = iteration_scalars(run_dir / "agents" / "team" / "tensorboard")
    evaluation = ledger.get("report", {}).get("record", {}).get("figures", {}).get("evaluation")
    soups = [it.get("charts/soups_per_episode", np.nan) for it in iterations]
    first_soup = next((i for i, s in enumerate(soups) if s > 0), None)
    return {
        "run": run_dir.name,
        "collect_steps": ledger.get("collect", {}).get("record", {}).get("env_steps", 0),
        "prepared_in": prepared_in(ledger, names) if "world_model" in ledger else "-",
        "seconds": {s: ledger[s]["seconds"] for s in ledger},
        "iterations": len(iterations),
        "real_steps": iterations[-1]["charts/real_env_steps"] if iterations else 0,
        "timers": {
            t: float(np.mean([it.get(f"time/{t}_s", np.nan) for it in iterations]))
            for t in (*ITERATION_TIMERS, "training_step")
        }
        if iterations
        else {},  # fmt: skip
        "train_soups": soups,
        "train_returns": [it.get("charts/team_return", np.nan) for it in iterations],
        "first_soup_real_steps": (
            iterations[first_soup]["charts/real_env_steps"] if first_soup is not None else None
        ),
        "evaluation": evaluation,
    }


def settings_text(run: str) -> str:
    variant = run.rsplit("_seed", 1)[0]
    overrides = VARIANTS.get(variant)
    if overrides is None:
        return "?"
    return ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in overrides.items()) or "as shipped"


STAGE_HEADERS = ["run", "settings vs configs/quickstart.yaml", "data and world model of",
                 "collect s", "world_model s",
                 "serve s", "gate s", "agents s", "report s", "total s", "iterations (real steps, collect's included)",
                 "first training soup at agents real step", "eval soups/episode (episodes)",
                 "eval return (random)"]  # fmt: skip


def stage_row(r: dict[str, Any]) -> list[str]:
    s, ev = r["seconds"], r["evaluation"] or {}
    trained, random = ev.get("trained"), ev.get("random")
    return [
        r["run"], settings_text(r["run"]), r["prepared_in"],
        *(f"{s[k]:.0f}" if k in s else "-" for k in
          ("collect", "world_model", "serve", "gate", "agents", "report")),
        f"{sum(s.values()):.0f}" if "report" in s else "not finished",
        f"{r['iterations']} ({int(r['real_steps'] + r['collect_steps']):,})",
        f"{r['first_soup_real_steps']:,.0f}" if r["first_soup_real_steps"] else "-",
        f"{trained['soups_per_episode']:.2f} ({trained['episodes']})" if trained else "-",
        f"{trained['team_return']:.1f} ({random['team_return']:.1f})" if trained else "-",
    ]  # fmt: skip


def curve_row(r: dict[str, Any]) -> list[str]:
    return [
        r["run"],
        " ".join(f"{x:.1f}" for x in r["train_soups"]),
        " ".join(f"{x:.0f}" for x in r["train_returns"]),
    ]


def timer_row(r: dict[str, Any]) -> list[str]:
    """Mean seconds of each MBMAPPO stage per iteration, with its share of the iteration."""
    t, total = r["timers"], r["timers"]["training_step"]
    shares = (f"{t[k]:.1f} ({100 * t[k] / total:.0f}%)" for k in ITERATION_TIMERS)
    return [r["run"], *shares, f"{total:.1f}"]


def tables(rows: list[dict[str, Any]]) -> str:
    timed = [r for r in rows if r["timers"]]
    iteration_table = markdown_table(
        ["run", *(f"{k} s" for k in ITERATION_TIMERS), "iteration s"],
        [timer_row(r) for r in timed],
    )
    curve_table = markdown_table(
        ["run", "training soups/episode per iteration", "training team return per iteration"],
        [curve_row(r) for r in timed],
    )
    return (
        "Seconds per pipeline stage (`stages.json`; a stage reused from another run folder "
        "shows that run's seconds), the team's training soups and its evaluation against the "
        f"random team:\n\n{markdown_table(STAGE_HEADERS, [stage_row(r) for r in rows])}\n\n"
        "Mean seconds per agents iteration by MBMAPPO stage (TensorBoard `time/*`):\n\n"
        f"{iteration_table}\n\nThe team's training episodes, iteration by iteration (each "
        f"iteration's real batch; the actions sampled as in evaluation):\n\n{curve_table}\n"
    )


def summarise(args: Args) -> None:
    out = Path(args.out)
    folders = sorted(d for d in out.iterdir() if d.is_dir()) if out.is_dir() else []
    names = {d.resolve(): d.name for d in folders}
    rows = [r for d in folders if (r := run_row(d, names))]
    load = os.getloadavg()
    body = (
        RUNS_NOTE
        + tables(rows)
        + (
            f"\nMachine shared with other jobs: 1/5/15-min load average at the summary "
            f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} on 2 logical CPUs; seconds from different "
            "runs compare only roughly.\n"
        )
    )
    publish("make_run", "The main job: `make run` and variants of its settings", body, args.record)


def main() -> None:
    args = parse_args(Args, __doc__)
    if not args.summarise_only:
        run(args)
    summarise(args)


if __name__ == "__main__":
    main()
