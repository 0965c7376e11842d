"""`moedream quickstart`: the main job on the embedded default config."""

from __future__ import annotations

import argparse

HELP = "the main job: collect, train the world model, serve, learn, report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moedream.platform.quickstart import DEFAULT_CONFIG, ENV_CONFIGS

    parser.add_argument("--config", help=f"quickstart YAML (default {DEFAULT_CONFIG.name})")
    parser.add_argument("--env", choices=sorted(ENV_CONFIGS),
                        help="run the default config of this env (overcooked: cramped_room, "
                        "mamujoco: HalfCheetah 2x3)")  # fmt: skip
    parser.add_argument("--name", help="run name (folder under --out)")
    parser.add_argument("--out", help="runs folder")


def run(args: argparse.Namespace) -> int:
    from moedream.config import load_yaml
    from moedream.platform.quickstart import (
        DEFAULT_CONFIG,
        ENV_CONFIGS,
        QuickstartConfig,
        run_quickstart,
    )

    if args.config and args.env:
        raise SystemExit("moedream quickstart: pass --config or --env, not both")
    data = load_yaml(args.config or ENV_CONFIGS.get(args.env, DEFAULT_CONFIG))
    if args.name:
        data["name"] = args.name
    if args.out:
        data["out"] = args.out
    run_quickstart(QuickstartConfig.from_dict(data))
    return 0
