"""Memory experts on the memory task: imagination and recall error per expert, and cost.

One run: trains a small WorldModel (short context, backbone.max_context 4) on random-policy
episodes of the memory task (``make_env("memory")``: tile colours of cells seen long ago, a cue
shown at step 0), fits the retrieval spatial expert on them, then
1. quality: on unseen episodes (observe a prefix, imagine the rest with the real actions,
   ``evaluate_rollouts`` of benchmarks/_memory_eval.py, paired sampling noise) the error of
   the imagined observations and the recall error on cells re-entered after leaving the short
   context, for every expert ablation;
2. cost: time per imagined step with 1, 2 and 3 experts as the remembered history grows (50 ..
   800 steps), beside a full-history attention baseline that re-encodes the whole history
   every step (what a transformer world model without memory experts pays), and the
   test-time LoRA finetune time per episode.

Position keys are the agents' x and y one-hots (the first 2 * grid_size features). A
transition key also holds the other agent's offset whenever it is adjacent, and one-hot
offsets always count as adjacent here: the retrieval expert only answers when both agents
stand where they stood before, which is rare on this task.

    python benchmarks/memory_experts.py            # ~10 min CPU on 2 cores
    python benchmarks/memory_experts.py --train-steps 50 --train-episodes 8 --eval-episodes 2 \\
        --lengths 50 --timed-steps 2 --no-record   # smoke
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...` too

from benchmarks._common import markdown_table, parse_args, publish  # noqa: E402
from benchmarks._memory_eval import (  # noqa: E402
    evaluate_rollouts,
    paired_difference,
    random_episodes,
    seconds_per_step,
    small_world_model,
    training_windows,
)
from moedream.envs.memory_task import MemoryTaskConfig  # noqa: E402
from moedream.world_model.diffusion import Denoiser, DiffusionSampler  # noqa: E402
from moedream.world_model.memory import MemoryConfig, MemoryExperts  # noqa: E402
from moedream.world_model.model import WorldModel  # noqa: E402
from moedream.world_model.train_local import TrainConfig, fit  # noqa: E402

CONTEXT = 4


@dataclasses.dataclass
class Args:
    cue_delay: int = 30
    """Steps before the query (episodes have cue_delay + 1 steps)."""
    train_episodes: int = 150
    """Random-policy episodes to train the world model on."""
    train_steps: int = 1000
    """Adam steps of the world model."""
    eval_episodes: int = 8
    """Unseen episodes per quality measurement."""
    prefix: int = 18
    """Observed steps of each evaluation episode (the rest is imagined)."""
    samples: int = 2
    lengths: tuple[int, ...] = (50, 200, 800)
    """History lengths (steps) at which cost per imagined step is measured."""
    timed_steps: int = 10
    """Imagined steps timed per cost measurement."""
    threads: int = 1
    """torch threads (1 is fastest for these tiny matmuls on a shared machine)."""
    seed: int = 0
    record: bool = True


def memory_config(task: MemoryTaskConfig, eval_episodes: int) -> MemoryConfig:
    return MemoryConfig(
        key_dim=2 * task.grid_size, position_offset=0, max_adapters=max(16, eval_episodes)
    )


def train(args: Args, task: MemoryTaskConfig) -> tuple[MemoryExperts, list, float]:
    """-> (memory experts on a trained world model, held-out episodes, seconds)."""
    options = {"cue_delay": args.cue_delay}
    n = args.train_episodes
    spec, episodes = random_episodes("memory", options, range(n + args.eval_episodes))
    torch.manual_seed(args.seed)
    model = WorldModel(small_world_model(CONTEXT), spec)
    memory = MemoryExperts(model, memory_config(task, args.eval_episodes))
    cfg = TrainConfig(steps=args.train_steps, batch_size=32, window=CONTEXT, lr=2e-3,
                      warmup=20, eval_every=10**6, log_every=10**6, checkpoint_every=10**6,
                      precision="fp32")  # fmt: skip
    start = time.perf_counter()
    fit(model, training_windows(episodes[:n], spec, CONTEXT), cfg, progress=True)
    memory.fit_spatial([(e.obs, e.action) for e in episodes[:n]])
    return memory, episodes[n:], time.perf_counter() - start


def quality(args: Args, memory: MemoryExperts, held_out: list) -> list[list]:
    config, horizon = memory.cfg, args.cue_delay + 1 - args.prefix
    runs = {
        "short": config.only("short"),
        "short + long": config.only("short", "long"),
        "short + spatial": config.only("short", "spatial"),
        "all": config,
        "all, alpha = 2 on long and spatial": config.replace(alpha_long=2.0, alpha_spatial=2.0),
        "all, form = sum": config.replace(form="sum"),
    }
    rows, base = [], None
    for name, cfg in runs.items():
        memory.set_config(cfg)
        r = evaluate_rollouts(
            memory, held_out, prefix=args.prefix, horizon=horizon, samples=args.samples,
            seed=args.seed,
        )  # fmt: skip
        base = base or r
        d, se, wins = paired_difference(r.episode_mse, base.episode_mse)
        steps = len(held_out) * args.samples * horizon
        rows.append([name, r.long_horizon_mse, float(r.horizon_mse[-1]), r.recall_mse,
                     r.n_recall, f"{d:+.4f} ± {se:.4f} ({wins}/{len(held_out)})",
                     1e3 * r.seconds / steps])  # fmt: skip
        print(rows[-1], flush=True)
    memory.set_config(config)
    return rows


class FullHistoryAttention(nn.Module):
    """Baseline: one transformer layer over every past (obs, action) frame, re-run each step
    (no KV cache), its last token conditioning a denoiser of the world model's size."""

    def __init__(self, model: WorldModel, width: int = 64) -> None:
        super().__init__()
        spec = model.spec
        self.embed = nn.Linear(spec.n_agents * (spec.obs_dim + spec.action_dim), width)
        self.layer = nn.TransformerEncoderLayer(
            width, nhead=4, dim_feedforward=2 * width, batch_first=True
        )
        self.denoiser = Denoiser(model.config.diffusion, model.denoiser.x_dim, width)

    def cond(self, frames: torch.Tensor) -> torch.Tensor:
        h = self.layer(self.embed(frames[None]))  # [1, L, W]
        return h[:, -1]  # [1, W]


@torch.no_grad()
def baseline_step_seconds(
    baseline: FullHistoryAttention, sampler, obs: torch.Tensor, act: torch.Tensor, steps: int
) -> float:
    frames = torch.cat([obs[:-1], act], dim=-1).flatten(1)  # [L, N * (D + A)]
    x_dim = baseline.denoiser.x_dim
    baseline.cond(frames)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        cond = baseline.cond(frames)  # full attention over the whole history, every step
        x0 = sampler.sample(baseline.denoiser, cond, x_dim)  # [1, X]
        new = torch.cat([x0.reshape(obs.shape[1], -1), act[-1]], dim=-1).flatten()[None]
        frames = torch.cat([frames, new])  # the history grows by the imagined step
    return (time.perf_counter() - start) / steps


def long_history(spec, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random walk of ``length`` steps on the task's grid (obs [L+1, N, D], encoded actions
    [L, N, A]); the time feature differs from training: only speed matters here."""
    _, (episode,) = random_episodes("memory", {"cue_delay": length}, [seed])
    act = torch.as_tensor(spec.encode_actions(episode.action), dtype=torch.float32)
    return torch.as_tensor(episode.obs), act


def cost(args: Args, memory: MemoryExperts) -> list[list]:
    model, config = memory.model, memory.cfg
    sampler = DiffusionSampler(model.config.diffusion, model.config.sampler)
    baseline = FullHistoryAttention(model).eval()
    rows = []
    for length in args.lengths:
        obs, act = long_history(model.spec, length, args.seed + length)
        start = time.perf_counter()
        memory.remember("history", obs, act)
        row = [length, time.perf_counter() - start]
        for experts in (("short",), ("short", "spatial"), ("short", "spatial", "long")):
            memory.set_config(config.only(*experts))
            recall = memory.recall(["history"])
            row.append(1e3 * seconds_per_step(model, recall, obs, act, args.timed_steps))
        memory.set_config(config)
        memory.forget("history")
        row.append(1e3 * baseline_step_seconds(baseline, sampler, obs, act, args.timed_steps))
        rows.append(row)
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    args = parse_args(Args, __doc__)
    torch.set_num_threads(args.threads)
    task = MemoryTaskConfig(cue_delay=args.cue_delay)
    memory, held_out, train_s = train(args, task)
    q = quality(args, memory, held_out)
    c = cost(args, memory)
    mem, h = memory.cfg, args.cue_delay + 1 - args.prefix
    body = (
        f"Memory task: {task.grid_size}x{task.grid_size} grid, {task.n_tiles} tile colours, "
        f"{task.n_cues} cues, {args.cue_delay + 1} steps per episode; a small WorldModel "
        f"(d_model 64, 2 layers, 4 experts, context {CONTEXT}) trained {args.train_steps} steps "
        f"on {args.train_episodes} random-policy episodes, spatial expert fitted on them "
        f"(total {train_s:.0f} s); LoRA rank {mem.lora_rank}, {mem.lora_steps} steps, lr "
        f"{mem.lora_lr}. {len(held_out)} unseen episodes x {args.samples} samples, same "
        f"sampling noise in every row: the first {args.prefix} steps observed, {h} imagined "
        f"with the real actions. Recall = error on (step, agent) where the agent re-enters a "
        f"cell seen in the prefix but not in the short context; 'vs short' = mean per-episode "
        f"difference to the short-term expert alone ± its standard error (episodes where the "
        f"row is lower / episodes).\n\n"
        + markdown_table(
            [
                "experts",
                "imagined MSE (mean)",
                f"MSE h={h}",
                "recall MSE",
                "recall steps",
                "MSE vs short (paired, wins)",
                "ms per imagined step",
            ],
            q,
        )  # fmt: skip
        + "\n\nCost per imagined step (ms, batch 1) as the remembered history grows; the "
        f"spatial memory holds at most {mem.spatial_capacity} entries; the baseline re-runs "
        "one attention layer over the whole history each step.\n\n"
        + markdown_table(
            [
                "history steps",
                "remember + LoRA finetune (s)",
                "1 expert (short)",
                "2 (short+spatial)",
                "3 (all)",
                "full-history attention",
            ],
            c,
        )  # fmt: skip
    )
    publish(
        "memory_experts",
        "Memory experts (PoCE) on the memory task: imagination error, recall, cost",
        body,
        args.record,
    )


if __name__ == "__main__":
    main()
