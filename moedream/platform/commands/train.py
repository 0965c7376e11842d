"""`moedream train`: the model-based pipeline on a config, resumable from its run folder."""

from __future__ import annotations

import argparse
import sys

HELP = "the pipeline: collect, train the world model, serve, gate, train the team, report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moedream.platform.pipeline import STAGES
    from moedream.platform.quickstart import DEFAULT_CONFIG, ENV_CONFIGS

    parser.add_argument("--config", help=f"pipeline YAML (default configs/{DEFAULT_CONFIG.name})")
    parser.add_argument("--env", choices=sorted(ENV_CONFIGS),
                        help="run the default config of this env (overcooked: cramped_room, "
                        "mamujoco: HalfCheetah 2x3)")  # fmt: skip
    parser.add_argument(
        "--stages",
        help=f"comma-separated stages to run (default: all not finished; {','.join(STAGES)}); "
        "stages finished in the run folder with the same config are skipped",
    )
    parser.add_argument("--name", help="run name (folder under --out)")
    parser.add_argument("--out", help="runs folder")


def load_config(args: argparse.Namespace):
    from moedream.config import load_yaml
    from moedream.platform.quickstart import DEFAULT_CONFIG, ENV_CONFIGS, QuickstartConfig

    if args.config and args.env:
        raise SystemExit("pass --config or --env, not both")
    data = load_yaml(args.config or ENV_CONFIGS.get(args.env, DEFAULT_CONFIG))
    for key in ("name", "out"):
        if getattr(args, key):
            data[key] = getattr(args, key)
    return QuickstartConfig.from_dict(data)


def run(args: argparse.Namespace) -> int:
    """Exit status 0 on success, 2 on a config error (printed: it names the field and the fix)."""
    from moedream.config import ConfigError
    from moedream.platform.pipeline import parse_stages, run_pipeline

    try:
        stages = parse_stages(args.stages)  # a typo fails before the config loads or Ray starts
        cfg = load_config(args)
        records = run_pipeline(cfg, stages)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\npipeline {cfg.name}: finished {', '.join(records)} in {cfg.run_dir}")
    return 0
