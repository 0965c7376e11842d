"""One imagination round through Serve vs in the algorithm's process, side by side in one run.

    python benchmarks/imagine_in_process.py

The round of the results table's model-based run (configs/results/overcooked.yaml: batch 8000,
imagined_ratio 1, horizon 5 -> 1600 branches of 5 steps) imagined by the provider MBMAPPO uses
(ServedWorldModelImaginer) twice: every step sent to the Serve deployment in requests of
max_rows rows (the default), and with ``imagine_in_process`` (the replica's parse and run code
on the served checkpoint, in this process). The world model has the main job's architecture
(configs/quickstart.yaml, random weights: the cost does not depend on them), the team that of
configs/agents_overcooked.yaml. The two modes alternate, each repeat with the same torch seed
for the team's action draws, and the rollouts are compared: they must be identical.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, parse_args, publish  # noqa: E402

MODES = (("Serve (a request per step and max_rows rows)", False), ("in process", True))


@dataclasses.dataclass
class Args:
    branches: int = 1600
    """Imagined branches per round (batch 8000 x imagined_ratio 1 / horizon 5)."""
    horizon: int = 5
    repeats: int = 3
    record: bool = True


def served_checkpoint_path() -> tuple[str, dict]:
    """A random-weight world model of the main job's architecture, saved; its Serve config."""
    from moedream.config import load_yaml
    from moedream.envs import env_spec
    from moedream.world_model.model import WorldModel, WorldModelConfig

    quickstart = load_yaml("configs/quickstart.yaml")
    torch.manual_seed(0)
    model = WorldModel(
        WorldModelConfig.from_dict(quickstart["world_model"]["model"]), env_spec("overcooked")
    )
    path = str(model.save(os.path.join(tempfile.mkdtemp(), "world_model.safetensors")))
    return path, {"checkpoint": path, **quickstart["serve"]}


def team_policy(spec):
    from moedream.config import load_yaml
    from moedream.policies.imagination import TeamPolicy
    from moedream.policies.rl_modules import team_module_spec

    team = load_yaml("configs/agents_overcooked.yaml")["team"]
    shared = team.pop("shared_planner")
    return TeamPolicy(team_module_spec(spec, **team).build(), spec, shared)


def measure(args: Args) -> tuple[dict[str, list[tuple[float, float]]], bool]:
    """Per mode: (wall s, this process's CPU s) of each repeat; and whether the rollouts of the
    two modes were identical in every repeat."""
    from ray import serve

    from moedream.envs import env_spec
    from moedream.platform.model_based import (
        ServedWorldModelImaginer,
        ServedWorldModelImaginerFactory,
    )
    from moedream.platform.serve import APP_NAME, build_app

    spec = env_spec("overcooked")
    _, user_config = served_checkpoint_path()
    serve.start(proxy_location="Disabled")  # handles only: no HTTP port to clash over
    serve.run(build_app(user_config), name=APP_NAME, route_prefix=None)
    providers = {
        local: ServedWorldModelImaginer(
            spec=spec,
            horizon=args.horizon,
            seed=0,
            factory=ServedWorldModelImaginerFactory("overcooked", imagine_in_process=local),
        )  # fmt: skip
        for _, local in MODES
    }
    policy = team_policy(spec)
    rng = np.random.default_rng(0)
    start = (rng.random((args.branches, spec.n_agents, spec.obs_dim)) < 0.1).astype(np.float32)
    times: dict[str, list] = {name: [] for name, _ in MODES}
    identical = True
    for rep in range(args.repeats + 1):  # the first repeat warms up (and loads the model)
        obs = {}
        for name, local in MODES:
            torch.manual_seed(rep)
            wall, cpu = time.perf_counter(), time.process_time()
            obs[local] = providers[local].imagine(start, policy).obs
            if rep:
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        identical &= bool(np.array_equal(obs[False], obs[True]))
    return times, identical


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
        times, identical = measure(args)
    finally:
        serve.shutdown()
        ray.shutdown()
    rows = []
    for name, _ in MODES:
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        rows.append([name, round(wall, 2), round(cpu, 2)])
    ratio = rows[0][1] / rows[1][1]
    body = (
        f"One imagination round of {args.branches} branches x {args.horizon} steps by the "
        "provider MBMAPPO uses, through Serve and with `imagination.world_model."
        "imagine_in_process`, alternating; medians of "
        f"{args.repeats} repeats after a warm-up, 1 torch thread in both processes. CPU s = this "
        "process's (the replica's compute is not in the Serve row's). Rollouts identical in "
        f"every repeat: {identical}. Serve / in process wall-clock: {ratio:.2f}x. 1-min load "
        f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after on {os.cpu_count()} "
        "logical CPUs (a machine shared with other jobs).\n\n"
        + markdown_table(["imagine", "wall s", "CPU s (this process)"], rows)
    )
    publish("imagine_in_process", "Imagination round: Serve vs in process", body, args.record)


if __name__ == "__main__":
    main()
