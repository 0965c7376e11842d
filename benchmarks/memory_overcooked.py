"""Memory experts on the real world model, long Overcooked rollouts: error vs horizon and
recall error for each expert ablation, and cost per imagined step, in one run.

A small WorldModel with a SHORT context (backbone.max_context 4) is trained on cramped_room
random-policy episodes, its spatial adapter is trained with the model frozen, then on held-out
episodes it observes a prefix and imagines ``horizon`` steps beyond it with the episode's REAL
actions (moedream.world_model.memory.long_rollout.evaluate_rollouts). Rows: the short-term
expert alone, + LoRA (long-term), + spatial, all three, and the authors' alpha = 2.
Recall error = error on steps where an agent stands on a cell it visited in the prefix but
not inside the short context.

    python benchmarks/memory_overcooked.py                  # ~5 min on 2 cores
    python benchmarks/memory_overcooked.py --train-steps 200 --no-record   # smoke
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, parse_args, publish  # noqa: E402
from moedream.world_model.memory.long_rollout import (  # noqa: E402
    evaluate_rollouts,
    random_episodes,
    training_windows,
)
from moedream.world_model.memory.world_model_memory import (  # noqa: E402
    MemoryWorldModel,
    WorldModelMemoryConfig,
)
from moedream.world_model.model import WorldModelConfig  # noqa: E402
from moedream.world_model.train_local import TrainConfig, fit  # noqa: E402


@dataclasses.dataclass
class Args:
    context: int = 4
    """backbone.max_context of the world model (the short-term expert's memory)."""
    train_episodes: int = 20
    eval_episodes: int = 3
    episode_horizon: int = 100
    train_steps: int = 400
    adapter_steps: int = 300
    prefix: int = 48
    horizon: int = 40
    samples: int = 2
    threads: int = 1
    seed: int = 0
    record: bool = True


def model_config(context: int) -> WorldModelConfig:
    return WorldModelConfig.from_dict(
        {
            "d_model": 64,
            "cond_dim": 128,
            "backbone": {"num_layers": 2, "num_heads": 4, "max_context": context},
            "moe": {"d_hidden": 128, "num_experts": 4, "top_k": 2},
            "diffusion": {"hidden": 128, "layers": 2},
            "heads": {"hidden": 128, "ensemble_size": 2, "ensemble_hidden": 32},
        }
    )


def train(args: Args, spec, episodes) -> tuple[MemoryWorldModel, float]:
    torch.manual_seed(args.seed)
    memory = WorldModelMemoryConfig(adapter_steps=args.adapter_steps, adapter_horizon=16)
    model = MemoryWorldModel(model_config(args.context), spec, memory)
    cfg = TrainConfig(steps=args.train_steps, batch_size=32, window=args.context, lr=2e-3,
                      warmup=20, eval_every=10**6, log_every=10**6, checkpoint_every=10**6,
                      precision="fp32")  # fmt: skip
    start = time.perf_counter()
    fit(model, training_windows(episodes, spec, args.context), cfg, progress=True)
    model.train_spatial_adapter(
        [(e.obs, e.action) for e in episodes[:10]],
        generator=torch.Generator().manual_seed(args.seed),
        progress=True,
    )
    return model, time.perf_counter() - start


def ablations(memory: WorldModelMemoryConfig) -> dict[str, WorldModelMemoryConfig]:
    return {
        "short-term alone": memory.only("short"),
        "short + long-term (LoRA)": memory.only("short", "long"),
        "short + spatial": memory.only("short", "spatial"),
        "all three": memory,
        "all three, alpha_long = 2": memory.replace(alpha_long=2.0),
    }


def main() -> None:
    args = parse_args(Args, __doc__)
    torch.set_num_threads(args.threads)
    env = {"layout": "cramped_room", "horizon": args.episode_horizon}
    n_train = args.train_episodes
    spec, episodes = random_episodes("overcooked", env, range(n_train + args.eval_episodes))
    model, train_s = train(args, spec, episodes[:n_train])
    held_out = episodes[n_train:]
    quarters = np.array_split(np.arange(args.horizon), 4)
    rows = []
    for name, memory in ablations(model.memory_cfg).items():
        model.set_memory_config(memory)
        r = evaluate_rollouts(
            model, held_out, prefix=args.prefix, horizon=args.horizon, samples=args.samples,
            seed=args.seed,
        )  # fmt: skip
        steps = len(held_out) * args.samples * args.horizon
        by_quarter = [f"{r.horizon_mse[q].mean():.4f}" for q in quarters]
        rows.append([name, *by_quarter, f"{r.long_horizon_mse:.4f}", f"{r.recall_mse:.4f}",
                     str(r.n_recall), f"{1e3 * r.seconds / steps:.1f}"])  # fmt: skip
        print(rows[-1], flush=True)
    h = args.horizon
    heads = [f"MSE steps {q[0] + 1}-{q[-1] + 1}" for q in quarters]
    table = markdown_table(
        ["experts", *heads, f"mean MSE (h 1-{h})", "recall MSE", "recall steps",
         "ms per imagined step (incl. memory build)"], rows,
    )  # fmt: skip
    body = (
        f"Overcooked cramped_room, small WorldModel (d_model 64, 2 layers, 4 experts) with a "
        f"{args.context}-step context, trained {args.train_steps} steps on {n_train} random-policy "
        f"episodes of {args.episode_horizon} steps, spatial adapter {args.adapter_steps} steps "
        f"(total {train_s:.0f} s). {len(held_out)} held-out episodes x {args.samples} samples: "
        f"{args.prefix} real steps observed, {h} steps imagined with the real actions. Errors are "
        f"per-feature MSE of the raw observation vs the real one.\n\n{table}"
    )
    publish(
        "memory_overcooked",
        "Memory experts on the world model: long Overcooked rollouts",
        body,
        args.record,
    )


if __name__ == "__main__":
    main()
