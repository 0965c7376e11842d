"""`ray job submit` entry point of the whole pipeline (the same as `moedream train`).

    RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m moedream.platform.jobs.train --config configs/quickstart.yaml

Joins the job's cluster (Ray Jobs sets RAY_ADDRESS) or starts a local one, then runs the
pipeline's stages, skipping those already finished in the run folder (`--stages` to run part
of it). Exit status 0 on success, 2 on a config error (the message says the fix).
"""

from __future__ import annotations

import argparse
import sys

from moedream.platform.commands import train

add_arguments = train.add_arguments  # the job takes the command's arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moedream.platform.jobs.train",
                                     description=train.HELP)  # fmt: skip
    train.add_arguments(parser)
    return train.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
