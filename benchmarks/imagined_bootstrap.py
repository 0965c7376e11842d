"""A/B of the value bootstrap at the end of imagined rollouts: same seeds, same world model.

    python benchmarks/imagined_bootstrap.py                  # the settings of RESULTS.md

Imagined rollouts end after H steps. With ``imagination.bootstrap_truncated: true`` (the
default) PPO's GAE bootstraps from the critic's value of the last imagined state there; with
``false`` the cut reads as the end of the episode (what RLlib did with them before). Both arms
imagine through the same served world model (the main job's stages 1-4, run once, its
random-policy real steps counted on the real-step axis), on the same seeds; per seed the arms
run in turn, so a loaded machine slows both alike. A finished run is read back from its
``history.json`` on a rerun (the script resumes where it stopped, one whole run at a time).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import sample_efficiency as se  # noqa: E402
from benchmarks._common import markdown_table, parse_args, publish  # noqa: E402

ARMS = (("bootstrap", True), ("no bootstrap", False))


@dataclasses.dataclass
class Args(se.Args):
    envs: tuple[str, ...] = ("overcooked",)
    env_steps: int = 16_000
    seeds: tuple[int, ...] = (0, 1)
    train_batch_size: int = 2000
    minibatch_size: int = 500
    horizon: int = 5
    imagination_updates: int = 4
    world_model_steps: int = 300
    retrain_every: int = 0
    smooth_steps: int = 4000
    http_port: int = 8933
    storage_path: str = "runs/bench_imagined_bootstrap"
    tag: str = ""


def arm_config(args: Args, env: str, seed: int, bootstrap: bool):
    cfg = se.run_config(args, env, seed, True)
    return dataclasses.replace(
        cfg, imagination=dataclasses.replace(cfg.imagination, bootstrap_truncated=bootstrap)
    )


def run_arm(args: Args, env: str, seed: int, name: str, bootstrap: bool) -> dict:
    """One model-based run (or its history.json from an earlier try): history and seconds."""
    from moedream.platform.agents import train

    run_name = f"{env}_s{seed}_{name.replace(' ', '_')}"
    saved = Path(args.storage_path) / run_name / "history.json"
    if saved.exists():
        print(f"{run_name}: finished earlier, read from {saved}")
        return json.loads(saved.read_text())
    start = time.perf_counter()
    result = train(
        arm_config(args, env, seed, bootstrap),
        args.storage_path,
        env_steps=args.env_steps,
        run_name=run_name,
        checkpoint=False,
    )
    done = {"history": result.history, "seconds": time.perf_counter() - start}
    saved.write_text(json.dumps(done, indent=1))
    return done


def summary(history: list[dict], offset: int, window: int) -> list:
    """Of one run: real steps, final smoothed team return, mean per-iteration return (an
    AUC over the run), final smoothed soups per episode, mean gate approve rate."""
    steps, returns = se.curve(history, count_provider_steps=False)
    soups = np.array([h.get("charts/soups_per_episode", np.nan) for h in history])

    def final(values: np.ndarray) -> float:
        return round(float(se.smooth(steps + offset, values, window)[-1]), 3)

    approve = np.nanmean([h.get("gate/approve_rate", np.nan) for h in history])
    return [int(steps[-1] + offset), final(returns), round(float(np.nanmean(returns)), 3),
            final(soups), round(float(approve), 3)]  # fmt: skip


HEADERS = ["env", "seed", "arm", "real steps", "final return (smoothed)",
           "mean return over the run", "final soups/episode (smoothed)", "gate approve rate",
           "wall-clock s"]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    import torch

    from moedream.platform.ray_setup import init_ray

    args = parse_args(Args, __doc__.split("\n\n")[0], argv)
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray()
    rows, profiles = [], []
    for env in args.envs:
        offset, _ = se.prepare_world_model(args, env)
        per_arm: dict[str, list] = {name: [] for name, _ in ARMS}
        histories: dict[str, list] = {name: [] for name, _ in ARMS}
        for seed in args.seeds:
            for name, bootstrap in ARMS:
                done = run_arm(args, env, seed, name, bootstrap)
                histories[name].append(done["history"])
                row = summary(done["history"], offset, args.smooth_steps)
                per_arm[name].append(row)
                rows.append([env, seed, name, *row, round(done["seconds"])])
                print(markdown_table(HEADERS, rows[-1:]), flush=True)
        for name, _ in ARMS:
            cells = np.array(per_arm[name], dtype=float)  # [seeds, summary columns]
            rows.append([env, "mean", name, int(cells[0, 0]),
                         *np.round(np.nanmean(cells[:, 1:], 0), 3), ""])  # fmt: skip
            profiles.append(se.profile(env, name, histories[name]))
    body = (
        f"Model-based runs through the served world model ({args.world_model_steps} Ray Train "
        f"steps on random-policy episodes of {args.collect_steps} real steps, rounded up to "
        f"whole episodes and counted as real steps; retrained every {args.retrain_every} "
        f"iteration(s), 0 = never), H {args.horizon}, K {args.imagination_updates} "
        f"imagination updates per real batch, imagined:real {args.imagined_ratio} per update, "
        f"batch {args.train_batch_size}, minibatch {args.minibatch_size}, {args.num_epochs} "
        f"epochs, {args.env_steps} real steps per run, the gate on. The arms differ only in "
        "`imagination.bootstrap_truncated`. Return: the team's (shaped + soup) return of the "
        f"training episodes, smoothed over the last {args.smooth_steps} real steps. Machine "
        f"shared with other jobs (1-min load average at the end {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} logical CPUs).\n\n"
        + markdown_table(HEADERS, rows)
        + "\n\nWhere the wall-clock goes (mean seconds per iteration over the seeds; the stages "
        "of MBMAPPO.training_step, `time/<stage>_s`; imagine, gate, episodes and learn run "
        f"once per imagination update, {args.imagination_updates} per iteration):\n\n"
        + markdown_table(se.PROFILE_HEADERS, profiles)
    )
    publish(f"imagined_bootstrap{'_' + args.tag if args.tag else ''}",
            "Value bootstrap at the end of imagined rollouts: A/B", body, args.record)  # fmt: skip


if __name__ == "__main__":
    main()
