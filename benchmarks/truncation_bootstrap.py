"""A/B of the value bootstrap where real episodes hit their time limit: model-free MAPPO.

    python benchmarks/truncation_bootstrap.py                # the settings of RESULTS.md

Real Overcooked episodes end by time limit (horizon 400): the MDP goes on, the episode is
truncated. RLlib marks them terminated all the same (moedream.policies.episode_ends), so PPO's
GAE does not bootstrap V(s_400). ``bootstrap_truncated_episodes: true`` restores the
truncation. Both arms train the model_free_tuned row of configs/results/overcooked.yaml
(configs/agents_overcooked.yaml: batch 8000, no imagination) on the same seeds, and differ only
in that field (set explicitly in both). Per seed the arms run in turn, so a loaded machine
slows both alike. Runs go through the results runner (moedream/results/runner.py,
platform_train.py): separate fixed-seed evaluations every ``eval_every`` real steps, a resume
point after each, finished runs skipped on a rerun, one JSONL curve per (arm, seed) under
``--out``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, parse_args, publish  # noqa: E402

ARMS = (("bootstrap_at_time_limit", True), ("terminated_at_time_limit", False))
METRICS = ("team_return", "soups_per_episode")
RAY_START_ATTEMPTS = 4


@dataclasses.dataclass
class Args:
    seeds: tuple[int, ...] = (10, 11, 12)
    budget: int = 16_000
    """Real env steps per run (2 iterations of batch 8000: what a machine shared with ~6
    jobs allowed, at about 4.5 min per iteration)."""
    eval_every: int = 8_000
    eval_episodes: int = 10
    agents_config: str = "configs/agents_overcooked.yaml"
    out: str = "runs/bench_truncation_bootstrap_16k"
    record: bool = True


def results_spec(args: Args):
    """The two arms as a results spec (moedream.results.spec)."""
    from moedream.results.spec import spec_from_dict

    return spec_from_dict({
        "baseline": ARMS[1][0],
        "protocol": {
            "seeds": list(args.seeds), "budget_real_steps": args.budget,
            "eval_every_real_steps": args.eval_every, "eval_episodes": args.eval_episodes,
            "metric": "soups_per_episode", "threshold": 1.0, "hold": 1, "final_last_k": 1,
        },
        "variants": [
            {"name": name, "overrides": {"bootstrap_truncated_episodes": on}}
            for name, on in ARMS
        ],
        "train": {"agents_config": args.agents_config},
    })  # fmt: skip


def start_ray() -> None:
    """``init_ray``, tried again after a failed start: a loaded machine can miss Ray's fixed
    30 s deadline for the raylet to register ("timed out during startup"). The processes a
    failed start leaves (this process's new children: Ray keeps no handle) are killed first."""
    import psutil
    import ray

    from moedream.platform.ray_setup import init_ray

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    for attempt in range(RAY_START_ATTEMPTS):
        try:
            return init_ray()
        except Exception as err:  # noqa: BLE001  Ray raises a bare Exception there
            if attempt == RAY_START_ATTEMPTS - 1:
                raise
            logging.warning("Ray did not start (%s); trying again", err)
            ray.shutdown()
            left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
            for proc in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            psutil.wait_procs(left, timeout=10)


def train_arms(args: Args, spec) -> None:
    """Every (seed, arm) not finished yet, seed by seed, the arms of a seed in turn."""
    from moedream.results.platform_train import PlatformTrainer
    from moedream.results.runner import run_one

    start_ray()
    trainer = PlatformTrainer(spec, args.out)
    for seed in spec.protocol.seeds:
        for variant in spec.variants:
            run_one(variant, seed, trainer, Path(args.out))


def per_seed(args: Args, spec) -> dict[str, dict[int, dict]]:
    """arm -> seed -> {metric at the budget..., wall-clock s} of the finished runs."""
    from moedream.results.runner import points_path
    from moedream.results.summary import closing_metrics

    out: dict[str, dict[int, dict]] = {}
    for variant in spec.variants:
        for seed in spec.protocol.seeds:
            metrics = closing_metrics(Path(args.out), variant.name, seed, spec.protocol)
            if metrics:
                lines = points_path(Path(args.out), variant.name, seed).read_text().splitlines()
                closing = next(json.loads(x) for x in lines
                               if json.loads(x)["real_steps"] >= args.budget)  # fmt: skip
                out.setdefault(variant.name, {})[seed] = {
                    **metrics,
                    "wallclock_s": closing["wallclock_s"],
                }
    return out


def mean_se(values: np.ndarray) -> str:
    if values.size < 2:
        return f"{values.mean():.3g} (n={values.size})" if values.size else "-"
    se = values.std(ddof=1) / np.sqrt(values.size)
    return f"{values.mean():.3g} ± {se:.2g} (n={values.size})"


def tables(args: Args, results: dict[str, dict[int, dict]]) -> str:
    headers = ["seed", "arm", *METRICS, "wall-clock s"]
    rows = [
        [seed, name, *(round(m[k], 3) for k in METRICS), round(m["wallclock_s"])]
        for seed in args.seeds
        for name, _ in ARMS
        if (m := results.get(name, {}).get(seed))
    ]
    summary = []
    for name, _ in ARMS:
        runs = list(results.get(name, {}).values())
        summary.append([name, *(mean_se(np.array([m[k] for m in runs])) for k in
                                (*METRICS, "wallclock_s"))])  # fmt: skip
    on, off = (results.get(name, {}) for name, _ in ARMS)
    paired = sorted(set(on) & set(off))
    summary.append([
        f"paired difference ({ARMS[0][0]} - {ARMS[1][0]}, seeds {paired})",
        *(mean_se(np.array([on[s][k] - off[s][k] for s in paired]))
          for k in (*METRICS, "wallclock_s")),
    ])  # fmt: skip
    return (
        markdown_table(headers, rows)
        + "\n\nMean ± standard error over seeds:\n\n"
        + markdown_table(["arm", *METRICS, "wall-clock s"], summary)
    )


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(Args, __doc__.split("\n\n")[0], argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    spec = results_spec(args)
    train_arms(args, spec)
    body = (
        f"Model-free MAPPO on Overcooked cramped_room with {args.agents_config} (the "
        "model_free_tuned row of configs/results/overcooked.yaml: batch 8000, minibatch 1000, "
        f"6 epochs), {args.budget} real steps per run, seeds {list(args.seeds)}. The arms differ "
        "only in `bootstrap_truncated_episodes`: true, GAE bootstraps V(s_400) where the "
        "400-step horizon cuts an episode; false, the cut reads as the end of the MDP (RLlib's "
        f"marking). Figures at the budget: mean of {args.eval_episodes} separate evaluation "
        "episodes on fixed env seeds (the results table's), team return (shaped + soup "
        "reward) and soups per episode; wall-clock per run without the evaluations. The "
        "budget is what the experiment CPU allowed on a machine shared with other jobs "
        f"(1-min load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
        "logical CPUs): far below the ~200k real steps where this team becomes competent.\n\n"
        + tables(args, per_seed(args, spec))
    )
    publish("truncation_bootstrap", "Value bootstrap at the time limit of real episodes: A/B",
            body, args.record)  # fmt: skip


if __name__ == "__main__":
    main()
