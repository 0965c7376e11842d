"""`ray job submit` entry point for agent training.

    ray job submit --working-dir . -- \\
        python -m moedream.platform.jobs.train_agents --config configs/agents_overcooked.yaml

Joins the cluster of the job (RAY_ADDRESS is set by Ray Jobs) or starts a local one, then runs
the same loop as `moedream train-agents`.
"""

from __future__ import annotations

import argparse
import sys

from moedream.platform.commands import train_agents

add_arguments = train_agents.add_arguments  # the job takes the command's arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moedream.platform.jobs.train_agents", description=train_agents.HELP
    )
    train_agents.add_arguments(parser)
    return train_agents.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
