"""The ``moedream`` command line. Each subcommand lives in ``moedream.platform.commands.<name>``
as a module with ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs, so ``moedream --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module under moedream.platform.commands
COMMANDS: dict[str, str] = {
    "train": "train",
    "quickstart": "quickstart",
    "collect": "collect",
    "train-world-model": "train_world_model",
    "serve": "serve",
    "calibrate-gate": "calibrate_gate",
    "train-agents": "train_agents",
    "sweep": "sweep",
}

HELPS: dict[str, str] = {
    "train": "the pipeline: collect, train the world model, serve, gate, train the team, report",
    "quickstart": "the main job: the whole pipeline on the embedded default config",
    "collect": "collect episodes in parallel on Ray into Parquet shards",
    "train-world-model": "train the MoE-diffusion world model (locally or with Ray Train)",
    "serve": "serve a world-model checkpoint with Ray Serve over HTTP",
    "calibrate-gate": "fit the coherence gate on episode data and report its approval rate",
    "train-agents": "train perceiver/planner/reflector teams with RLlib (model-based or free)",
    "sweep": "run a Ray Tune sweep over the agent-training config",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moedream",
        description="Model-based multi-agent RL on Ray: MoE-diffusion world models, "
        "gated imagination, RLlib teams.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        sub.add_parser(name, help=HELPS[name], add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])  # prints help or the "invalid choice" error
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(f"moedream.platform.commands.{COMMANDS[name]}")
    sub = argparse.ArgumentParser(prog=f"moedream {name}", description=HELPS[name])
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
