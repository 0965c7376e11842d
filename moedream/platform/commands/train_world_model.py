"""`moedream train-world-model`: train the MoE-diffusion world model on Parquet episodes.

``--local`` trains in this process (moedream.world_model.train_local); without it the run goes
to Ray Train (moedream.platform.train).
"""

from __future__ import annotations

import argparse

HELP = "train the MoE-diffusion world model (locally or with Ray Train)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config",
                        help="YAML config (default: configs/world_model.yaml with --local, else "
                        "configs/world_model_distributed.yaml, a DistributedTrainConfig)")  # fmt: skip
    parser.add_argument("--data", help="folder of Parquet episode shards (from `moedream collect`)")
    parser.add_argument(
        "--out", help="--local: output folder (checkpoints, TensorBoard, metrics.json)"
    )
    parser.add_argument("--local", action="store_true", help="train in this process, without Ray")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    # Ray Train only (the same flags as `python -m moedream.platform.jobs.train_world_model`):
    parser.add_argument("--resume", help="Ray Train: checkpoint folder to resume from")
    parser.add_argument(
        "--storage-path", help="Ray Train: folder or URI for checkpoints/TensorBoard"
    )
    parser.add_argument("--name", help="Ray Train: run name")
    parser.add_argument("--num-workers", type=int, help="Ray Train: number of workers")


def run(args: argparse.Namespace) -> int:
    if args.local:
        args.config = args.config or "configs/world_model.yaml"
        return run_local(args)
    from moedream.platform.jobs import train_world_model as job

    args.config = args.config or "configs/world_model_distributed.yaml"
    return job.run(args)


def run_local(args: argparse.Namespace) -> int:
    import json

    from moedream.config import ConfigError, load_yaml
    from moedream.world_model.model import WorldModelConfig
    from moedream.world_model.train_local import TrainConfig, train_local

    if not args.data or not args.out:
        raise SystemExit("moedream train-world-model --local needs --data DIR and --out DIR")
    data = load_yaml(args.config)
    try:
        model_cfg = WorldModelConfig.from_dict(data.get("model", {}), prefix="model.")
        model_cfg.validate("model.")
        train_data = dict(data.get("train", {}))
        if args.steps is not None:
            train_data["steps"] = args.steps
        train_cfg = TrainConfig.from_dict(train_data, prefix="train.")
        train_cfg.validate("train.")
    except ConfigError as err:
        raise SystemExit(f"{args.config}: {err}") from None
    metrics = train_local(
        train_cfg, args.data, args.out, model_config=model_cfg, progress=not args.no_progress
    )
    keys = sorted(k for k in metrics if k.startswith(("eval/", "wm/loss", "data/")))
    print(json.dumps({k: round(metrics[k], 6) for k in keys}, indent=2))
    print(f"world model saved to {args.out}/world_model.safetensors")
    return 0
