"""`moedream collect`: gather episodes in parallel on Ray into Parquet shards."""

from __future__ import annotations

import argparse
import json

HELP = "collect episodes in parallel on Ray into Parquet shards"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with a `collect:` section (optional)")
    parser.add_argument("--env", help="env name: overcooked, mamujoco, memory")
    parser.add_argument(
        "--env-options", type=json.loads, help='JSON, e.g. \'{"layout": "cramped_room"}\''
    )
    parser.add_argument("--episodes", type=int, help="number of episodes")
    parser.add_argument("--episodes-per-shard", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", help="output folder for the shards")


def run(args: argparse.Namespace) -> int:
    from moedream.config import load_yaml
    from moedream.data import read_episodes
    from moedream.platform.collect import CollectConfig, collect_parallel
    from moedream.platform.ray_setup import init_ray

    data = load_yaml(args.config).get("collect", {}) if args.config else {}
    overrides = {
        "env": args.env,
        "env_options": args.env_options,
        "episodes": args.episodes,
        "episodes_per_shard": args.episodes_per_shard,
        "seed": args.seed,
        "out": args.out,
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = CollectConfig.from_dict(data)
    init_ray()
    paths = collect_parallel(cfg)
    print(summarize(*read_episodes(paths)))
    return 0


def summarize(spec, episodes) -> str:
    import numpy as np

    returns = np.array([ep.reward[:, 0].sum() for ep in episodes])
    steps = sum(ep.length for ep in episodes)
    return (
        f"{len(episodes)} episodes, {steps} steps of {spec.env_name} {spec.env_config}\n"
        f"agents {list(spec.agent_ids)}, obs dim {spec.obs_dim}, {spec.action_kind} actions "
        f"of size {spec.action_dim}\nteam return per episode: mean {returns.mean():.2f}, "
        f"min {returns.min():.2f}, max {returns.max():.2f}"
    )
