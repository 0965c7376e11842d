"""Where one model-based imagination round's CPU goes, with and without the context cache.

    python benchmarks/imagination_profile.py
    python benchmarks/imagination_profile.py --repeats 1 --no-update --no-record   # quick look

The round of the results table's model-based run (configs/results/overcooked.yaml: batch 8000,
imagined_ratio 1, horizon 5 -> 1600 branches of 5 steps, imagination in process) on the main
job's world-model architecture (configs/quickstart.yaml, random weights: the cost does not
depend on them) and the configs/agents_overcooked.yaml team. The provider MBMAPPO uses
(ServedWorldModelImaginer, ``imagine_in_process``) imagines it two ways, alternating, each
repeat with the same torch seed for the team's action draws:

- ``context_cache: false``: the replica's code on every step's request (each step re-encodes
  the whole imagined context twice: observe, then transition), as before the cache;
- ``context_cache: true`` (the default): each step encoded once, attention keys and values
  kept (moedream/world_model/cached_rollout.py).

Printed: CPU seconds per round (medians) and the rollouts' largest difference; a cProfile
breakdown of one round of each by part (backbone, RSSM, diffusion sampler, ensemble, the
team's action draws); then what follows the round in an MBMAPPO iteration, timed once on its
output: the gate (the reflector's TD residuals and the kernel's verdicts; its normaliser fitted
on the imagined sequences themselves, which sets its statistics, not its cost), building the
learner's imagined episodes, and one PPO update on them (num_epochs 6, minibatch 1000, as the
results table's first update). CPU time is this process's: on a shared machine the wall clock
mostly measures the wait for a core.
"""

from __future__ import annotations

import cProfile
import dataclasses
import inspect
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, parse_args, publish  # noqa: E402
from benchmarks.imagine_in_process import served_checkpoint_path, team_policy  # noqa: E402

MODES = {"replica code (context re-encoded)": False, "context cache": True}
MODE_NAMES = list(MODES)


def parts() -> dict[str, list]:
    """Part of a round -> the functions whose cumulative CPU it is (none calls another)."""
    from moedream.policies.imagination import TeamPolicy
    from moedream.world_model.backbone import Backbone
    from moedream.world_model.diffusion.sampler import DiffusionSampler
    from moedream.world_model.heads import Ensemble
    from moedream.world_model.model import WorldModel
    from moedream.world_model.rssm import RSSM

    return {
        "backbone": [Backbone.encode, Backbone.encode_next],
        "RSSM steps (context posteriors + prior)": [RSSM.step],
        "diffusion sampler": [DiffusionSampler.sample],
        "ensemble (+ its std)": [Ensemble.forward, WorldModel._ensemble_outputs],
        "team's action draws": [TeamPolicy.act],
    }


@dataclasses.dataclass
class Args:
    branches: int = 1600
    """Imagined branches per round (batch 8000 x imagined_ratio 1 / horizon 5)."""
    horizon: int = 5
    repeats: int = 3
    update: bool = True
    """Also time one PPO update on the round's imagined episodes (starts a local learner)."""
    record: bool = True


def providers(horizon: int) -> dict[str, object]:
    from moedream.envs import env_spec
    from moedream.platform.model_based import (
        ServedWorldModelImaginer,
        ServedWorldModelImaginerFactory,
    )

    return {
        name: ServedWorldModelImaginer(
            spec=env_spec("overcooked"),
            horizon=horizon,
            seed=0,
            factory=ServedWorldModelImaginerFactory(
                "overcooked", imagine_in_process=True, context_cache=cache
            ),
        )
        for name, cache in MODES.items()
    }


def round_times(
    args: Args, imaginers: dict, policy, start: np.ndarray
) -> tuple[dict, float, object]:
    """CPU seconds of each mode's rounds (after a warm-up round each), the largest difference
    of their imagined observations, and the cached mode's last trajectories."""
    cpu: dict[str, list[float]] = {name: [] for name in MODES}
    largest, trajs = 0.0, None
    for rep in range(args.repeats + 1):
        obs = {}
        for name, imaginer in imaginers.items():
            torch.manual_seed(rep)
            before = time.process_time()
            trajs = imaginer.imagine(start, policy)
            if rep:
                cpu[name].append(time.process_time() - before)
            obs[name] = trajs.obs
        largest = max(largest, float(np.abs(obs[MODE_NAMES[0]] - obs[MODE_NAMES[1]]).max()))
    return cpu, largest, trajs


def breakdown(imaginer, policy, start: np.ndarray) -> dict[str, float]:
    """CPU seconds of one round by part (cProfile on CPU time), and the whole round."""
    profile = cProfile.Profile(time.process_time)
    torch.manual_seed(0)
    profile.enable()
    imaginer.imagine(start, policy)
    profile.disable()
    stats = pstats.Stats(profile)
    cumulative = {key[:2]: value[3] for key, value in stats.stats.items()}  # (file, line) -> s
    out = {
        part: sum(cumulative.get(_code_key(f), 0.0) for f in functions)
        for part, functions in parts().items()
    }
    out["whole round"] = stats.total_tt
    return out


def _code_key(function) -> tuple[str, int]:
    code = inspect.unwrap(function).__code__
    return code.co_filename, code.co_firstlineno


def after_the_round(args: Args, trajs, policy, spec) -> dict[str, float]:
    """CPU seconds of the gate, the episode building and (optionally) the PPO update."""
    from moedream.coherence.kernel import GateConfig, Normalizer, judge
    from moedream.policies.imagination import build_imagined_episodes, td_residuals

    seconds = {}
    before = time.process_time()
    residual = td_residuals(policy, trajs.obs, trajs.reward, trajs.terminated, 0.99)
    seconds["gate: reflector's TD residuals"] = time.process_time() - before
    config = GateConfig()
    normalizer = Normalizer.fit(list(trajs.obs), config)
    scored = dataclasses.replace(trajs, td_residual=residual.astype(np.float32))
    before = time.process_time()
    judge(scored, normalizer, config)
    seconds["gate: kernel verdicts"] = time.process_time() - before
    before = time.process_time()
    episodes = build_imagined_episodes(trajs, policy.module, spec)
    seconds["building the learner's episodes"] = time.process_time() - before
    if args.update:
        seconds["one PPO update on them"] = ppo_update_seconds(episodes)
    return seconds


def ppo_update_seconds(episodes: list) -> float:
    """One MBMAPPO update (6 epochs, minibatch 1000) on ``episodes``, in a local learner."""
    from moedream.platform.agents import AgentsConfig, build_algo_config

    cfg = AgentsConfig.from_yaml("configs/agents_overcooked.yaml").replace(
        num_env_runners=0, train_batch_size=1000, minibatch_size=1000, num_epochs=6
    )
    algo = build_algo_config(cfg, logdir_root=tempfile.mkdtemp()).build_algo()
    try:
        algo._sample_real()  # the update reads the sampled-steps counter
        algo._stage_seconds = {}
        before = time.process_time()
        algo._update(episodes, 6)
        return time.process_time() - before
    finally:
        algo.stop()


def measure(args: Args) -> tuple[dict, float, dict, dict]:
    from ray import serve

    from moedream.envs import env_spec
    from moedream.platform.serve import APP_NAME, build_app

    spec = env_spec("overcooked")
    _, user_config = served_checkpoint_path()
    serve.start(proxy_location="Disabled")  # handles only: no HTTP port to clash over
    serve.run(build_app(user_config), name=APP_NAME, route_prefix=None)
    imaginers, policy = providers(args.horizon), team_policy(spec)
    rng = np.random.default_rng(0)
    start = (rng.random((args.branches, spec.n_agents, spec.obs_dim)) < 0.1).astype(np.float32)
    cpu, largest, trajs = round_times(args, imaginers, policy, start)
    by_part = {name: breakdown(imaginer, policy, start) for name, imaginer in imaginers.items()}
    return cpu, largest, by_part, after_the_round(args, trajs, policy, spec)


def main() -> None:
    import ray
    from ray import serve

    from moedream.platform.ray_setup import init_ray

    args = parse_args(Args, __doc__.split("\n\n")[0])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)  # as the replica (serve.num_threads 1)
    load_before = os.getloadavg()[0]
    init_ray()
    try:
        cpu, largest, by_part, after = measure(args)
    finally:
        serve.shutdown()
        ray.shutdown()
    median = {name: statistics.median(times) for name, times in cpu.items()}
    old, new = (median[name] for name in MODE_NAMES)
    round_rows = [[name, round(median[name], 3), round(by_part[name]["whole round"], 3)]
                  for name in MODE_NAMES]  # fmt: skip
    part_rows = [[part, *(round(by_part[name][part], 3) for name in MODE_NAMES)]
                 for part in by_part[MODE_NAMES[0]]]  # fmt: skip
    after_rows = [[step, round(seconds, 3)] for step, seconds in after.items()]
    body = (
        f"One imagination round of {args.branches} branches x {args.horizon} steps in process "
        "(`imagination.world_model.imagine_in_process`), the replica's code vs the context "
        f"cache, alternating; medians of {args.repeats} repeats after a warm-up, 1 torch "
        f"thread, CPU s of this process. Round CPU, replica code / context cache: "
        f"{old / new:.2f}x. Largest difference of the two modes' imagined observations: "
        f"{largest:.2g} (float rounding; same seeds). 1-min load average {load_before:.1f} "
        f"before, {os.getloadavg()[0]:.1f} after on {os.cpu_count()} logical CPUs (a machine "
        "shared with other jobs).\n\n"
        + markdown_table(
            ["imagine", "CPU s per round (median)", "CPU s (profiled round)"], round_rows
        )  # fmt: skip
        + "\n\nOne profiled round by part (cProfile on CPU time; its overhead inflates small "
        "calls):\n\n"
        + markdown_table(["part", *(f"CPU s, {name}" for name in MODE_NAMES)], part_rows)
        + "\n\nWhat follows the round in the iteration, once, on the context cache's last "
        "round:\n\n" + markdown_table(["step", "CPU s"], after_rows)
    )
    publish("imagination_profile", "Imagination round: where its CPU goes", body, args.record)


if __name__ == "__main__":
    main()
