"""Memory experts on the real world model, long Overcooked rollouts: error vs horizon and
recall error for each expert ablation, and cost per imagined step, in one run.

A small WorldModel with a SHORT context (backbone.max_context 4) is trained on cramped_room
random-policy episodes; the spatial expert is fitted on those training episodes (the
retrieval expert's memory error; the adapter row trains the adapter too); then on held-out
episodes it observes a prefix and imagines ``horizon`` steps beyond it with the episode's REAL
actions (``evaluate_rollouts`` of benchmarks/_memory_eval.py). Every row sees the same
sampling noise (paired), so the "vs short" columns are per-episode paired differences with
their standard error and the episodes where the row beats the short-term expert alone.
Recall error = error on (step, agent) where the agent stands on a cell visited in the prefix
but not inside the short context. Standardised = each feature's squared error divided by its
training variance (floored at 0.01): raw MSE is dominated by a few wide features. Spread =
the standardised variance between an episode's samples: how diverse the imagined futures are,
which compares PoCE with one shared prior (the default) against the naive product of experts
(``form: sum``, every expert brings its own prior). A second table times one imagined step
after remembering 50 .. 800 real steps (does the cost stay constant with context length?).

``--moves per_episode`` runs it on the Overcooked variant whose four moves are shuffled at
every reset (hidden per-episode dynamics: only the episode's own history tells them), the
task where long-term memory must help; it records its own block.

    python benchmarks/memory_overcooked.py                  # ~5 min on 2 cores
    python benchmarks/memory_overcooked.py --moves per_episode --train-episodes 60 --train-steps 1000
    python benchmarks/memory_overcooked.py --train-steps 200 --eval-episodes 4 --no-record   # smoke
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
from benchmarks._memory_eval import (  # noqa: E402
    evaluate_rollouts,
    paired_difference,
    random_episodes,
    seconds_per_step,
    small_world_model,
    training_windows,
)
from moedream.world_model.memory import MemoryConfig, MemoryExperts  # noqa: E402
from moedream.world_model.model import WorldModel  # noqa: E402
from moedream.world_model.train_local import TrainConfig, fit  # noqa: E402


@dataclasses.dataclass
class Args:
    context: int = 4
    """backbone.max_context of the world model (the short-term expert's memory)."""
    train_episodes: int = 20
    eval_episodes: int = 24
    episode_horizon: int = 100
    train_steps: int = 400
    adapter_steps: int = 300
    prefix: int = 48
    horizon: int = 40
    samples: int = 2
    threads: int = 1
    moves: str = "fixed"
    """Overcooked ``moves``: fixed, or per_episode (moves shuffled at every reset)."""
    lengths: tuple[int, ...] = (50, 200, 800)
    """Remembered history lengths (real steps) at which one imagined step is timed."""
    timed_steps: int = 10
    seed: int = 0
    record: bool = True

    @property
    def env(self) -> dict:
        return {"layout": "cramped_room", "horizon": self.episode_horizon, "moves": self.moves}


def train(args: Args, spec, episodes) -> tuple[MemoryExperts, MemoryExperts, float]:
    """-> (memory with the retrieval spatial expert, memory with the adapter, seconds), both
    on the same trained world model."""
    torch.manual_seed(args.seed)
    config = MemoryConfig(
        adapter_steps=args.adapter_steps, adapter_horizon=16,
        max_adapters=max(16, args.eval_episodes),
    )  # fmt: skip
    model = WorldModel(small_world_model(args.context), spec)
    memory = MemoryExperts(model, config)
    cfg = TrainConfig(steps=args.train_steps, batch_size=32, window=args.context, lr=2e-3,
                      warmup=20, eval_every=10**6, log_every=10**6, checkpoint_every=10**6,
                      precision="fp32")  # fmt: skip
    start = time.perf_counter()
    fit(model, training_windows(episodes, spec, args.context), cfg, progress=True)
    memory.fit_spatial([(e.obs, e.action) for e in episodes])
    adapter = MemoryExperts(model, config.replace(spatial_mode="adapter"))
    adapter.fit_spatial(
        [(e.obs, e.action) for e in episodes[:10]],
        generator=torch.Generator().manual_seed(args.seed),
        progress=True,
    )
    return memory, adapter, time.perf_counter() - start


def ablations(memory: MemoryConfig) -> dict[str, tuple[bool, MemoryConfig]]:
    """name -> (use the adapter model, memory config)."""
    return {
        "short-term alone": (False, memory.only("short")),
        "short + long-term (LoRA)": (False, memory.only("short", "long")),
        "short + spatial (retrieval)": (False, memory.only("short", "spatial")),
        "short + spatial (adapter)": (
            True,
            memory.only("short", "spatial").replace(spatial_mode="adapter"),
        ),
        "all three": (False, memory),
        "all three, LoRA always kept": (False, memory.replace(lora_validation=0.0)),
        "all three, alpha_long = 2": (False, memory.replace(alpha_long=2.0)),
        "all three, naive product (form = sum)": (False, memory.replace(form="sum")),
    }


def ratio_to(a: np.ndarray, b: np.ndarray) -> str:
    """Per-episode a / b -> 'mean ± standard error'."""
    r = np.asarray(a, dtype=np.float64) / np.maximum(np.asarray(b, dtype=np.float64), 1e-12)
    se = r.std(ddof=1) / np.sqrt(len(r)) if len(r) > 1 else float("nan")
    return f"{r.mean():.3f} ± {se:.3f}"


def cost(args: Args, memory: MemoryExperts) -> list[list]:
    """[history steps, remember s, ms per imagined step short-term alone, all three] rows."""
    model, config = memory.model, memory.cfg
    rows = []
    for length in args.lengths:
        env = {**args.env, "horizon": length}
        spec, (episode,) = random_episodes("overcooked", env, [10_000 + length])
        obs = torch.as_tensor(episode.obs)
        act = torch.as_tensor(spec.encode_actions(episode.action), dtype=torch.float32)
        start = time.perf_counter()
        memory.remember("history", obs, act)
        row = [length, f"{time.perf_counter() - start:.2f}"]
        for experts in (("short",), ("short", "long", "spatial")):
            memory.set_config(config.only(*experts))
            ms = 1e3 * seconds_per_step(model, memory.recall(["history"]), obs, act,
                                        args.timed_steps)  # fmt: skip
            row.append(f"{ms:.2f}")
        memory.set_config(config)
        memory.forget("history")
        rows.append(row)
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    args = parse_args(Args, __doc__)
    torch.set_num_threads(args.threads)
    n_train = args.train_episodes
    spec, episodes = random_episodes("overcooked", args.env, range(n_train + args.eval_episodes))
    retrieval, adapter, train_s = train(args, spec, episodes[:n_train])
    held_out = episodes[n_train:]
    feature_var = np.concatenate([e.obs for e in episodes[:n_train]]).var(0)  # [N, D]
    quarters = np.array_split(np.arange(args.horizon), 4)
    rows, base, kept = [], None, []
    for name, (use_adapter, config) in ablations(retrieval.cfg).items():
        memory = adapter if use_adapter else retrieval
        memory.set_config(config)
        r = evaluate_rollouts(
            memory, held_out, prefix=args.prefix, horizon=args.horizon, samples=args.samples,
            seed=args.seed, feature_var=feature_var,
        )  # fmt: skip
        if config.long_term and config.lora_validation > 0 and memory.store is not None:
            kept.append(sum(memory.store.last_kept.get(e.episode_id, 0) for e in held_out))
        base = base or r
        recall = r.episode_recall_sq / np.maximum(r.episode_recall_n, 1)
        base_recall = base.episode_recall_sq / np.maximum(base.episode_recall_n, 1)
        has = (r.episode_recall_n > 0) & (base.episode_recall_n > 0)
        cells = []
        for a, b in ((r.episode_mse, base.episode_mse), (r.episode_std_mse, base.episode_std_mse),
                     (recall[has], base_recall[has])):  # fmt: skip
            d, se, wins = paired_difference(a, b)
            cells.append(f"{d:+.4f} ± {se:.4f} ({wins}/{len(a)})")
        cells.append(ratio_to(r.episode_mse, base.episode_mse))
        spread_se = r.episode_spread.std(ddof=1) / np.sqrt(len(held_out))
        cells.append(f"{r.episode_spread.mean():.4f} ± {spread_se:.4f}")
        steps = len(held_out) * args.samples * args.horizon
        by_quarter = [f"{r.horizon_mse[q].mean():.4f}" for q in quarters]
        rows.append([name, *by_quarter, f"{r.long_horizon_mse:.4f}", f"{r.standardized_mse:.4f}",
                     f"{r.recall_mse:.4f}", str(r.n_recall), *cells,
                     f"{1e3 * r.seconds / steps:.1f}"])  # fmt: skip
        print(rows[-1], flush=True)
    h = args.horizon
    heads = [f"MSE steps {q[0] + 1}-{q[-1] + 1}" for q in quarters]
    table = markdown_table(
        ["experts", *heads, f"mean MSE (h 1-{h})", "standardised MSE", "recall MSE",
         "recall steps", "MSE vs short (paired, wins)", "std. MSE vs short", "recall vs short",
         "MSE / short (per episode)", "spread between samples", "ms per imagined step"], rows,
    )  # fmt: skip
    retrieval.set_config(retrieval.cfg.replace(lora_validation=0.0))  # time the LoRA pass too
    cost_table = markdown_table(
        ["remembered real steps", "remember + LoRA finetune (s)", "ms per imagined step, short",
         "ms per imagined step, all three"], cost(args, retrieval),
    )  # fmt: skip
    lora = (
        f" The LoRA adapter passed its validation (lower denoiser loss on the episode's latest "
        f"25 % of transitions than the base) on {kept[0]} of {len(held_out)} episodes."
        if kept else ""
    )  # fmt: skip
    task = (
        "Overcooked cramped_room with its four moves shuffled at every reset (moves: "
        "per_episode; the permutation is hidden: only the episode's history tells it)"
        if args.moves == "per_episode" else "Overcooked cramped_room"
    )  # fmt: skip
    body = (
        f"{task}, small WorldModel (d_model 64, 2 layers, 4 experts) with a "
        f"{args.context}-step context, trained {args.train_steps} steps on {n_train} random-policy "
        f"episodes of {args.episode_horizon} steps; spatial expert fitted on the same episodes, "
        f"adapter {args.adapter_steps} steps (total {train_s:.0f} s). {len(held_out)} held-out "
        f"episodes x {args.samples} samples, same sampling noise in every row: {args.prefix} real "
        f"steps observed, {h} steps imagined with the real actions. Errors are per-feature MSE "
        f"of the raw observation vs the real one; 'vs short' columns: mean per-episode "
        f"difference to the short-term expert alone ± its standard error (episodes where the "
        f"row is lower / episodes); 'MSE / short': mean ± SE of the per-episode ratio; spread: "
        f"standardised variance between the {args.samples} samples of an episode, mean ± SE "
        f"over episodes.{lora} The machine was shared with other jobs.\n\n{table}\n\n"
        f"Cost per imagined step (batch 1, best of 3 x {args.timed_steps} steps) after "
        f"remembering a random-policy history of each length (spatial memory capped at "
        f"{retrieval.cfg.spatial_capacity} entries, LoRA always kept):\n\n{cost_table}"
    )
    name = "memory_overcooked" if args.moves == "fixed" else f"memory_overcooked_{args.moves}"
    name += f"_seed{args.seed}" if args.seed else ""  # another seed: its own block beside
    publish(
        name,
        f"Memory experts on the world model: long Overcooked rollouts ({args.moves} moves)",
        body,
        args.record,
    )


if __name__ == "__main__":
    main()
