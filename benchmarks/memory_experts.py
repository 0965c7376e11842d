"""Memory experts on the memory task: recall and long-horizon error per expert, and cost.

One run: trains a small shared network on random-policy episodes of the memory task, then
1. quality: on unseen episodes (observe a prefix, predict the rest) the tile-recall error on
   revisited cells, the cue recall, one-step error and the imagination error vs horizon, for
   every expert ablation (alpha = 1), the authors' alpha = 2 and the "sum" form;
2. cost: time per imagined step with 1, 2 and 3 experts as the episode grows (50 .. 800
   steps of history), beside a full-history attention baseline that re-encodes the whole
   history every step (what a transformer world model without memory experts pays), and the
   test-time LoRA finetune time per episode.

    python benchmarks/memory_experts.py            # ~10 min CPU on 2 cores
    python benchmarks/memory_experts.py --train-steps 300 --eval-episodes 3   # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...` too

from benchmarks._common import markdown_table, record  # noqa: E402
from moedream.envs.memory_task import MemoryTaskConfig, random_episodes  # noqa: E402
from moedream.world_model.diffusion import (  # noqa: E402
    Denoiser,
    DiffusionConfig,
    SamplerConfig,
)
from moedream.world_model.memory import ComposedPredictor, EpisodeHistory, MemoryConfig, MemoryStore  # noqa: E402
from moedream.world_model.memory.rollout import EpisodeMemory, imagine  # noqa: E402
from moedream.world_model.memory.task_eval import evaluate, train_on_task  # noqa: E402


@dataclasses.dataclass
class Args:
    cue_delay: int = 30
    """Steps before the query (episodes have cue_delay + 1 steps)."""
    train_episodes: int = 150
    """Random-policy episodes to train the shared network on."""
    train_steps: int = 2000
    """Adam steps of the shared network."""
    eval_episodes: int = 8
    """Unseen episodes per quality measurement."""
    prefix: int = 18
    """Observed steps of each evaluation episode (the rest is predicted)."""
    lengths: tuple[int, ...] = (50, 200, 800)
    """History lengths (steps) at which cost per imagined step is measured."""
    timed_steps: int = 10
    """Imagined steps timed per cost measurement."""
    threads: int = 1
    """torch threads (1 is fastest for these tiny matmuls on a shared machine)."""
    seed: int = 0
    log_dir: str | None = None
    """TensorBoard directory for the training losses (none if unset)."""


def parse_args() -> Args:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(Args):
        default = f.default
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=list(default))
        else:
            parser.add_argument(
                flag, type=type(default) if default is not None else str, default=default
            )
    ns = parser.parse_args()
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(Args)}
    values["lengths"] = tuple(values["lengths"])
    return Args(**values)


DIFFUSION = DiffusionConfig(objective="v", hidden=64, layers=2)
SAMPLER = SamplerConfig(scheduler="ddim", num_steps=4, clip=1.0)
HORIZONS = (1, 4, 8, 13)


def quality(args: Args, trained, mem: MemoryConfig) -> list[list]:
    episodes = random_episodes(trained.task, args.eval_episodes, seed=10_000 + args.seed)
    store = MemoryStore(trained.net, mem)  # adapters finetuned once, shared by the ablations
    strong = mem.replace(lora_steps=150, lora_lr=3e-3)
    strong_store = MemoryStore(trained.net, strong)
    runs = [
        ("short", mem.only("short"), store),
        ("short + long", mem.only("short", "long"), store),
        ("short + spatial", mem.only("short", "spatial"), store),
        ("long + spatial (= all at alpha_short = 1)", mem.only("long", "spatial"), store),
        ("all", mem, store),
        ("all, LoRA 150 steps lr 3e-3", strong, strong_store),
        (
            "all, alpha = 2 (authors)",
            mem.replace(alpha_short=2.0, alpha_long=2.0, alpha_spatial=2.0),
            store,
        ),
        ("all, form = sum", mem.replace(form="sum"), store),
    ]
    rows = []
    for name, cfg, st in runs:
        r = evaluate(trained, cfg, episodes, prefix=args.prefix, store=st, seed=args.seed)
        hs = [
            float(r.horizon_mse[h - 1]) if h <= len(r.horizon_mse) else float("nan")
            for h in HORIZONS
        ]
        rows.append(
            [
                name,
                r.recall_mse,
                r.recall_error_rate,
                r.cue_accuracy,
                r.one_step_mse,
                r.long_horizon_mse,
                *hs,
            ]
        )
        print(rows[-1], flush=True)
    return rows


class FullHistoryAttention(nn.Module):
    """Baseline: one transformer layer over every past (obs, action) frame, re-run each step
    (no KV cache), its last token conditioning a denoiser of the same size."""

    def __init__(self, frame_dim: int, x_dim: int, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(frame_dim, width)
        self.layer = nn.TransformerEncoderLayer(
            width, nhead=4, dim_feedforward=2 * width, batch_first=True
        )
        self.denoiser = Denoiser(DIFFUSION, x_dim, width)

    def cond(self, frames: torch.Tensor) -> torch.Tensor:
        h = self.layer(self.embed(frames[None]))  # [1, L, W]
        return h[:, -1]  # [1, W]


def random_history(task: MemoryTaskConfig, length: int, seed: int) -> EpisodeHistory:
    """A long random-walk history on the task's grid (obs structure kept, episode not ended)."""
    ep = random_episodes(
        MemoryTaskConfig(grid_size=task.grid_size, cue_delay=length), 1, seed=seed
    )[0]
    actions = np.eye(5 + task.n_cues, dtype=np.float32)[ep["actions"]]
    return EpisodeHistory.from_arrays(ep["obs"][:, :, : task.obs_dim], actions, ep["positions"])


def cost(args: Args, trained, mem: MemoryConfig) -> list[list]:
    task, net = trained.task, trained.net
    n, d, a = 2, task.obs_dim, 5 + task.n_cues
    sampler = trained.sampler
    baseline = FullHistoryAttention(d * n + a * n, n * d).eval()
    rows = []
    for length in args.lengths:
        # time-fraction features differ from training at other lengths: only speed matters here
        hist = random_history(task, length, seed=args.seed + length)
        hist = EpisodeHistory(hist.obs[:, :, :d], hist.actions[:, :, :a], hist.positions)
        store = MemoryStore(net, mem)
        start = time.perf_counter()
        store.finetune("ep", hist)
        finetune_s = time.perf_counter() - start
        row = [length, finetune_s]
        for experts in (("short",), ("short", "spatial"), ("short", "spatial", "long")):
            cfg = mem.only(*experts)
            predictor = ComposedPredictor(net, cfg, store if cfg.long_term else None)
            memory = EpisodeMemory(cfg, n_agents=n, obs_dim=d, action_dim=a, episode_id="ep")
            memory.reset(hist.obs[0], hist.positions[0])
            for s in range(hist.steps):
                memory.observe(hist.actions[s], hist.obs[s + 1], hist.positions[s + 1])
            acts = hist.actions[-1].expand(1, args.timed_steps, n, a)
            pos = hist.positions[-1].expand(1, args.timed_steps, n, 2)
            imagine(predictor, sampler, [memory], acts[:, :1], pos[:, :1])  # warm-up
            best = float("inf")  # best of 3: the machine is shared, noise only adds time
            for _ in range(3):
                start = time.perf_counter()
                imagine(predictor, sampler, [memory], acts, pos)
                best = min(best, (time.perf_counter() - start) / args.timed_steps)
            row.append(1e3 * best)
        row.append(1e3 * baseline_step_seconds(baseline, sampler, hist, args.timed_steps))
        rows.append(row)
        print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def baseline_step_seconds(
    model: FullHistoryAttention, sampler, hist: EpisodeHistory, steps: int
) -> float:
    frames = torch.cat([hist.obs[:-1], hist.actions], dim=-1).flatten(1)  # [L, N * (D + A)]
    x_dim = model.denoiser.x_dim
    model.cond(frames)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        cond = model.cond(frames)  # full attention over the whole history, every step
        x0 = sampler.sample(model.denoiser, cond, x_dim)  # [1, X]
        new = torch.cat([x0.reshape(2, -1), hist.actions[-1]], dim=-1).flatten()[None]
        frames = torch.cat([frames, new])  # the history grows by the imagined step
    return (time.perf_counter() - start) / steps


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    task = MemoryTaskConfig(cue_delay=args.cue_delay)
    mem = MemoryConfig(alpha_short=1.0, alpha_long=1.0, alpha_spatial=1.0, embed_dim=32)
    writer = None
    if args.log_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.log_dir)
    start = time.perf_counter()
    trained = train_on_task(
        task,
        mem,
        DIFFUSION,
        SAMPLER,
        episodes=args.train_episodes,
        steps=args.train_steps,
        batch_size=128,
        lr=3e-3,
        seed=args.seed,
        writer=writer,
        progress=True,
    )
    train_s = time.perf_counter() - start
    q = quality(args, trained, mem)
    c = cost(args, trained, mem)
    h_cols = [f"MSE h={h}" for h in HORIZONS]
    body = (
        f"Memory task: 5x5 grid, 4 tile colours, 3 cues, {args.cue_delay + 1} steps per episode; "
        f"shared network trained on {args.train_episodes} random-policy episodes for "
        f"{args.train_steps} steps ({train_s:.0f} s); v-objective, DDIM 4 steps, clip 1; short "
        f"context K = {mem.context_len}; LoRA rank {mem.lora_rank}, {mem.lora_steps} steps, lr "
        f"{mem.lora_lr}; spatial k = {mem.spatial_k}. {args.eval_episodes} unseen episodes: the "
        f"first {args.prefix} steps observed, the rest predicted. Recall = tile of a cell "
        f"re-entered after leaving the short context (4 tiles: chance error 0.75); cue = the "
        f"revealed cue in the last observation (chance 0.33); alpha = 1 unless stated (at "
        f"alpha_short = 1 the short expert's contrast just restores the context prior, so "
        f"'long + spatial' equals 'all').\n\n"
        + markdown_table(
            [
                "experts",
                "recall MSE",
                "recall error rate",
                "cue accuracy",
                "one-step MSE",
                "imagined MSE (mean)",
                *h_cols,
            ],
            q,
        )
        + "\n\nCost per imagined step (ms, batch 1, 4 denoising steps) as the history grows; "
        "the spatial memory holds at most "
        f"{mem.spatial_capacity} entries; the baseline re-runs one attention layer over the "
        "whole history each step.\n\n"
        + markdown_table(
            [
                "history steps",
                "LoRA finetune (s)",
                "1 expert (short)",
                "2 (short+spatial)",
                "3 (all)",
                "full-history attention",
            ],
            c,
        )
    )
    record("memory_experts", "Memory experts (PoCE): recall, imagination error, cost", body)


if __name__ == "__main__":
    main()
