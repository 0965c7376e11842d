"""`ray job submit` entry point for distributed world-model training.

    RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m moedream.platform.jobs.train_world_model \\
        --config configs/world_model_distributed.yaml [--data DIR] [--resume CKPT] [--storage-path DIR]

Joins the job's cluster (Ray Jobs sets RAY_ADDRESS) or starts a local one, checks the config,
the data and the cluster's capacity before any worker starts, then runs ``run_distributed``.
Exit status 0 on success, 2 on a config/data error (the message says the fix), 1 if training failed.
"""

from __future__ import annotations

import argparse
import sys

HELP = "Train the world model with Ray Train (expert parallelism, checkpoints, fault tolerance)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML with a DistributedTrainConfig")
    parser.add_argument("--data", help="episode shard folder (overrides `data`)")
    parser.add_argument(
        "--resume", help="checkpoint folder to start from (overrides `resume_from`)"
    )
    parser.add_argument(
        "--storage-path",
        help="shared folder or URI for checkpoints/TensorBoard (overrides `storage_path`)",
    )
    parser.add_argument("--name", help="run name (overrides `name`)")
    parser.add_argument("--num-workers", type=int, help="overrides `num_workers`")
    parser.add_argument("--steps", type=int, help="overrides `train.steps`")


def load_config(args: argparse.Namespace):
    from moedream.config import load_yaml
    from moedream.platform.train import DistributedTrainConfig

    overrides = {
        "data": args.data,
        "resume_from": args.resume,
        "storage_path": args.storage_path,
        "name": args.name,
        "num_workers": args.num_workers,
    }
    if args.steps is not None:
        train = dict(load_yaml(args.config).get("train") or {})
        overrides["train"] = {**train, "steps": args.steps}
    return DistributedTrainConfig.load(args.config, **overrides)


def run(args: argparse.Namespace) -> int:
    from moedream.config import ConfigError
    from moedream.platform.train import run_distributed

    try:
        cfg = load_config(args)
        result = run_distributed(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    step = (result.metrics or {}).get("step")
    checkpoint = result.checkpoint.path if result.checkpoint else None
    print(f"[moedream] finished at step {step}; latest checkpoint: {checkpoint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moedream.platform.jobs.train_world_model", description=HELP
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
