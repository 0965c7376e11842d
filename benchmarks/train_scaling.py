"""Distributed world-model training throughput: tokens/s with 1 and 2 Ray Train workers and the
share of step time spent in the expert all-to-alls, native vs DeepSpeed engine, in one run.

Weak scaling: every worker trains on `batch_per_worker` windows per step, experts sharded over
all workers (P = number of workers). On a 2-core machine two workers share the cores, so the
figures measure overhead (all-to-all, gradient all-reduce), not speed-up; see
docs/distributed_training.md for the all-to-all volume model that predicts a real cluster.

    .venv/bin/python benchmarks/train_scaling.py              # the figures in RESULTS.md
    .venv/bin/python benchmarks/train_scaling.py --steps 12   # quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from benchmarks._common import markdown_table, record  # noqa: E402
from moedream.platform.train import DistributedTrainConfig, run_distributed  # noqa: E402
from moedream.platform.train.loop import PROGRESS_FILE  # noqa: E402


@dataclasses.dataclass
class Args:
    workers: tuple[int, ...] = (1, 2)
    engines: tuple[str, ...] = ("native", "deepspeed")
    steps: int = 30
    """training steps per run; the first report (warm-up) is left out of the figures"""
    log_every: int = 5
    batch_per_worker: int = 16
    window: int = 8
    d_model: int = 64
    num_experts: int = 4
    episodes: int = 8
    """HalfCheetah 2x3 episodes (100 steps, random policy) collected once for all runs"""
    data: str = ""
    """use this episode folder instead of collecting"""
    cpus_per_worker: float = 1.0
    record: bool = True
    """write the table into its block (benchmarks/results/, indexed in RESULTS.md)"""


def parse_args() -> Args:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(Args):
        default = (
            getattr(Args, f.name) if f.default is not dataclasses.MISSING else f.default_factory()
        )
        if isinstance(default, bool):
            parser.add_argument(
                f"--{f.name.replace('_', '-')}",
                action=argparse.BooleanOptionalAction,
                default=default,
            )
        elif isinstance(default, tuple):
            kind = type(default[0])
            parser.add_argument(
                f"--{f.name.replace('_', '-')}", nargs="+", type=kind, default=default
            )
        else:
            parser.add_argument(
                f"--{f.name.replace('_', '-')}", type=type(default), default=default
            )
    ns = parser.parse_args()
    return Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(ns).items()})


def collect(folder: Path, episodes: int) -> str:
    from moedream.data import collect_episodes

    for shard in range(2):
        collect_episodes(
            "mamujoco",
            {"max_episode_steps": 100},
            max(1, episodes // 2),
            folder / f"shard-{shard}.parquet",
            seed=shard,
        )
    return str(folder)


def run_config(
    args: Args, data: str, storage: str, engine: str, workers: int
) -> DistributedTrainConfig:
    return DistributedTrainConfig.from_dict(
        {
            "name": f"{engine}_{workers}w",
            "data": data,
            "storage_path": storage,
            "num_workers": workers,
            "cpus_per_worker": args.cpus_per_worker,
            "expert_parallel_size": workers,
            "engine": engine,
            "checkpoint_every": args.steps,
            "progress": False,
            "train": {
                "steps": args.steps,
                "batch_size": args.batch_per_worker * workers,
                "window": args.window,
                "log_every": args.log_every,
                "eval_every": args.steps,
                "eval_windows": 8,
                "precision": "fp32",
            },  # fmt: skip
            "model": {
                "d_model": args.d_model,
                "moe": {"num_experts": args.num_experts, "backend": engine},
            },
        }
    )


def measure(cfg: DistributedTrainConfig) -> dict[str, float]:
    run_distributed(cfg)
    lines = (Path(cfg.storage_path) / cfg.name / PROGRESS_FILE).read_text().splitlines()
    reports = [
        r for r in map(json.loads, lines) if r.get("event") == "report" and "perf/tokens_per_s" in r
    ][1:]
    if not reports:
        raise RuntimeError(f"{cfg.name}: too few reports; raise --steps above 2 x --log-every")
    mean = lambda key: statistics.fmean(r[key] for r in reports)  # noqa: E731
    return {
        "tokens_per_s": mean("perf/tokens_per_s"),
        "step_s": mean("perf/step_s"),
        "a2a_share": mean("perf/all_to_all_share"),
        "a2a_s": mean("perf/all_to_all_s"),
    }


def main() -> None:
    args = parse_args()
    from moedream.platform.ray_setup import init_ray

    init_ray()
    with tempfile.TemporaryDirectory(prefix="moedream_bench_") as tmp:
        data = args.data or collect(Path(tmp) / "episodes", args.episodes)
        rows, base = [], {}
        for engine in args.engines:
            for workers in args.workers:
                print(f"[train_scaling] {engine} engine, {workers} worker(s) ...", flush=True)
                m = measure(run_config(args, data, str(Path(tmp) / "ray_results"), engine, workers))
                base.setdefault(engine, m["tokens_per_s"])
                rows.append([engine, workers, workers, args.batch_per_worker * workers * args.window * 2,
                             m["tokens_per_s"], m["tokens_per_s"] / base[engine], 1000 * m["step_s"],
                             1000 * m["a2a_s"], f"{100 * m['a2a_share']:.1f}%"])  # fmt: skip
    table = markdown_table(
        [
            "engine",
            "workers",
            "P",
            "tokens/step",
            "tokens/s",
            "vs 1 worker",
            "step ms",
            "all-to-all ms",
            "all-to-all share",
        ],
        rows,
    )
    body = (
        f"World model d_model={args.d_model}, {args.num_experts} experts (top-2, capacity 1.25), 2-agent HalfCheetah "
        f"windows of {args.window} steps, {args.batch_per_worker} windows per worker per step (weak scaling), "
        f"{args.steps} steps per run (first report left out), workers x {args.cpus_per_worker:g} logical CPU on a local "
        "Ray cluster, gloo. Tokens/s uses the slowest rank's step time. On 2 shared cores, 2 workers split the same "
        "cores: this measures communication overhead, not speed-up; predict a cluster with the all-to-all volume "
        "model in docs/distributed_training.md.\n\n" + table
    )
    print(body)
    if args.record:
        record(
            "train_scaling",
            "Distributed world-model training: workers, engines, all-to-all share",
            body,
        )


if __name__ == "__main__":
    main()
