"""`moedream train-world-model`: train the MoE-diffusion world model on Parquet episodes.

``--local`` trains in this process (moedream.world_model.train_local); without it the run goes
to Ray Train (moedream.platform.train).
"""

from __future__ import annotations

import argparse

HELP = "train the MoE-diffusion world model (locally or with Ray Train)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/world_model.yaml",
                        help="YAML with `model:` (WorldModelConfig) and `train:` (TrainConfig) sections")  # fmt: skip
    parser.add_argument("--data", help="folder of Parquet episode shards (from `moedream collect`)")
    parser.add_argument("--out", help="output folder: checkpoints, TensorBoard, metrics.json")
    parser.add_argument("--local", action="store_true", help="train in this process, without Ray")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    if args.local:
        return run_local(args)
    from moedream.platform.train import run_distributed

    return int(run_distributed(args) or 0)


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
