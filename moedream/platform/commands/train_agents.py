"""`moedream train-agents`: train a perceiver/planner/reflector team with RLlib (MBMAPPO)."""

from __future__ import annotations

import argparse
import json

HELP = "train perceiver/planner/reflector teams with RLlib (model-based or free)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="agents YAML, e.g. configs/agents_overcooked.yaml"
    )
    parser.add_argument(
        "--storage-path", default="runs/agents", help="where runs, TensorBoard and checkpoints go"
    )
    parser.add_argument(
        "--run-name", help="folder under --storage-path (default: env_mode_timestamp)"
    )
    parser.add_argument("--iterations", type=int, help="training iterations (overrides the config)")
    parser.add_argument("--env-steps", type=int, help="real env step budget (overrides iterations)")
    parser.add_argument("--imagination", choices=["on", "off"], help="override imagination.enabled")
    parser.add_argument(
        "--set",
        type=json.loads,
        default=None,
        help="JSON overrides of config fields, e.g. '{\"lr\": 3e-4}'",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def load_config(args: argparse.Namespace):
    from moedream.config import load_yaml
    from moedream.platform.agents import AgentsConfig

    data = load_yaml(args.config)
    data.update(args.set or {})
    if args.imagination is not None:
        data.setdefault("imagination", {})["enabled"] = args.imagination == "on"
    return AgentsConfig.from_dict(data)


def check_imagination_services(cfg) -> None:
    """A `provider: world_model` run needs the Serve app and the gate actor up: say how to
    get them before RLlib builds anything."""
    import ray
    from ray import serve

    from moedream.config import ConfigError
    from moedream.platform.agents import provider_factory

    if not (cfg.imagination.enabled and cfg.imagination.provider == "world_model"):
        return
    factory = provider_factory(cfg)
    missing = []
    try:
        serve.get_app_handle(factory.app_name)
    except Exception:  # Serve not started, or no such app
        missing.append(f"the Serve app {factory.app_name!r}")
    try:
        ray.get_actor(factory.gate_actor_name, namespace=factory.gate_namespace)
    except ValueError:
        missing.append(f"the gate actor {factory.gate_actor_name!r}")
    if missing:
        raise ConfigError(
            f"imagination.provider world_model needs {' and '.join(missing)} running on this "
            "cluster: `moedream train --config configs/quickstart.yaml` runs the whole pipeline "
            "(it deploys both, then trains the team as its `agents` stage), or set "
            "imagination.enabled: false (`--imagination off`) for the model-free baseline"
        )


def run(args: argparse.Namespace) -> int:
    from moedream.platform.agents import imagination_label, train
    from moedream.platform.ray_setup import init_ray

    cfg = load_config(args)
    init_ray()
    check_imagination_services(cfg)
    result = train(
        cfg,
        args.storage_path,
        iterations=args.iterations,
        env_steps=args.env_steps,
        run_name=args.run_name,
        progress=not args.no_progress,
    )
    last = result.history[-1]
    label = imagination_label(cfg.imagination)
    print(f"run ({label}): {result.run_dir}\ncheckpoint: {result.checkpoint}")
    imagined = (
        f"env copies' steps (stand-in) {int(last['charts/provider_env_steps'])}"
        if label.startswith("env_replay")
        else f"imagined env steps {int(last['charts/imagined_env_steps'])}"
    )
    print(
        f"real env steps {int(last['charts/real_env_steps'])}, {imagined}, team return "
        f"{last['charts/team_return']:.2f}, soups/episode {last['charts/soups_per_episode']:.2f}"
    )
    return 0
