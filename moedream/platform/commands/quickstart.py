"""`moedream quickstart`: the main job on the embedded default config."""

from __future__ import annotations

import argparse

HELP = "the main job: collect, train the world model, serve, learn, report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moedream.platform.quickstart import DEFAULT_CONFIG

    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="quickstart YAML")
    parser.add_argument("--name", help="run name (folder under --out)")
    parser.add_argument("--out", help="runs folder")


def run(args: argparse.Namespace) -> int:
    from moedream.config import load_yaml
    from moedream.platform.quickstart import QuickstartConfig, run_quickstart

    data = load_yaml(args.config)
    if args.name:
        data["name"] = args.name
    if args.out:
        data["out"] = args.out
    run_quickstart(QuickstartConfig.from_dict(data))
    return 0
