"""Does the world model get Overcooked right? Today's model vs the modality-tokenised one.

On Overcooked cramped_room episodes of a competent scripted team (overcooked_ai's
GreedyHumanModel for both cooks, 10% random actions; sparse reward: 20 per soup), trains each
model variant on the same training episodes with the same step budget, for each seed, and
measures on held-out episodes (other seeds of the same team):

- one-step relative next-observation error RMS(pred - next) / RMS(next - obs) over every
  held-out transition (1.0 = "nothing changes"), with the deterministic prediction (the
  regressed mean for the diffusion head, the categorical mode for the discrete head);
- for grid variants, the error budget: squared one-step error per plane group (players,
  cook time, ...) and kind of real change (none, a step, a jump), as shares of the squared
  real change (they sum to the squared relative error);
- cook starts (a pot's cook time jumping from 0 to its full cooking time, each the size of
  hundreds of player moves in the squared error): how many the model predicts exactly, and
  how many it predicts where none happened;
- reward MAE vs the constant predictor's (the held-out mean reward);
- open-loop rollouts of ``--horizon`` steps under the real actions from held-out states: the
  fraction whose imagined soup count (predicted reward / 20, rounded) equals the real one,
  over all rollouts and over those with at least one real soup;
- expert specialisation per MoE layer: P(expert | modality / agent / object type) and the
  mutual information I(expert; label) in bits, with a heatmap PNG per variant;
- training throughput: agent-steps per CPU-second of a training step, each variant timed
  side by side (process time: load from other processes on a shared machine does not count).

Variants (``--variants``): old-featurized (today's served model: one token per agent-step,
diffusion head, featurized observations), old-grid (the same on the lossless grid encoding),
new (grid tokens: cells + agent-state + action, discrete head over each feature's next
values, modality-aware routing), new-no-modality-routing (the same without the router's
modality embedding), new-delta (new with the discrete head's classes the features' one-step
changes: a cook-time tick is one class at every count; 8 classes per feature),
new-delta-weighted and new-delta-expected (new-delta with ``discrete_loss`` change_weighted:
each feature's cross-entropy weighted by 1 + its squared real change, or expected_error: plus
the expected squared error of a draw from the head; both with ``reward_prediction``
nearest_value: the reward is the seen value nearest the head's expectation, whose own MAE is
the table's "expectation's MAE" column).

    .venv/bin/python benchmarks/world_model_overcooked.py --record   # RESULTS.md figures
    .venv/bin/python benchmarks/world_model_overcooked.py --steps 20 --seeds 0 --train-episodes 2 --test-episodes 1
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, parse_args, publish  # noqa: E402
from moedream.data import read_episodes  # noqa: E402
from moedream.data.episodes import collect_episodes, episode_windows  # noqa: E402
from moedream.envs.overcooked import SOUP_REWARD  # noqa: E402
from moedream.world_model.evaluation import prediction_scores  # noqa: E402
from moedream.world_model.model import WorldModel, WorldModelConfig  # noqa: E402
from moedream.world_model.specialisation import (  # noqa: E402
    layer_routes,
    normalised_mi,
    routing_counts,
    routing_distribution,
    token_labels,
)
from moedream.world_model.tokenizers import GRID_PLANES, MODALITIES  # noqa: E402
from moedream.world_model.train_local import TrainConfig, fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE_MODEL: dict[str, Any] = {  # the quickstart's world-model sizes
    "d_model": 64,
    "cond_dim": 128,
    "backbone": {"num_layers": 2, "num_heads": 4},
    "moe": {"d_hidden": 128, "num_experts": 4, "top_k": 2, "capacity_factor": 1.25},
    "diffusion": {"objective": "flow", "hidden": 128, "layers": 2},
    "sampler": {"scheduler": "flow_euler", "num_steps": 4},
    "heads": {"hidden": 128, "ensemble_size": 4, "ensemble_hidden": 64},
}
# name -> (encoding, model config changes)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "old-featurized": ("featurized", {}),
    "old-grid": ("grid", {}),
    "new": ("grid", {"tokenizer": "grid", "obs_head": "discrete", "modality_routing": True}),
    "new-no-modality-routing": ("grid", {"tokenizer": "grid", "obs_head": "discrete"}),
    "new-delta": ("grid", {"tokenizer": "grid", "obs_head": "discrete", "modality_routing": True,
                           "discrete_target": "delta", "discrete_values": 8}),
}  # fmt: skip
# new-delta with the discrete head's loss weighted by what the one-step error counts, and
# rewards predicted as the nearest seen value (the table also gives the regressed expectation)
for _loss, _suffix in (("change_weighted", "weighted"), ("expected_error", "expected")):
    VARIANTS[f"new-delta-{_suffix}"] = ("grid", {**VARIANTS["new-delta"][1], "discrete_loss": _loss,
                                                 "reward_prediction": "nearest_value"})  # fmt: skip
# object types of a grid cell, by the first plane set (player planes 0-1 first)
OBJECT_TYPES = ("player", "pot", "onion dispenser", "dish dispenser", "serving", "counter",
                "floor", "agent token", "action token")  # fmt: skip
OBJECT_PLANES = {"player": (0, 1), "pot": (10,), "onion dispenser": (12,),
                 "dish dispenser": (14,), "serving": (15,), "counter": (11,)}  # fmt: skip
# the grid encoding's planes by what they show (overcooked_ai's lossless state encoding)
# (the agent's own planes first: own player 0, own orientations 2-5; partner 1, 6-9)
PLANE_GROUPS = {"own player": [0, 2, 3, 4, 5], "partner": [1, 6, 7, 8, 9],
                "pot contents": list(range(16, 20)), "cook time": [20], "soup done": [21],
                "held and counter objects": [22, 23, 24],
                "terrain and urgency": list(range(10, 16)) + [25]}  # fmt: skip


@dataclasses.dataclass
class Args:
    variants: tuple[str, ...] = tuple(VARIANTS)
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 300
    batch_size: int = 32
    window: int = 4
    lr: float = 0.002
    train_episodes: int = 12
    test_episodes: int = 4
    episode_steps: int = 400
    epsilon: float = 0.1
    horizon: int = 20
    rollouts: int = 64
    speed_steps: int = 5
    """training steps timed per variant for the throughput table"""
    threads: int = 1
    """torch threads (1: CPU seconds then measure work, not a shared machine's contention)"""
    out: str = "runs/bench_world_model_overcooked"
    record: bool = False


# ------------------------------------------------------------------------------------ data


def team_policy_factory(epsilon: float, seed: int):
    return lambda env: env.scripted_team(epsilon=epsilon, seed=seed)


def episodes(args: Args, encoding: str, split: str) -> tuple[Any, list[Any]]:
    """The cached episodes of ``split`` (train: seed 0, test: seed 1), collected once."""
    path = Path(args.out) / "data" / f"{encoding}_{split}_{args.epsilon}.parquet"
    count = args.train_episodes if split == "train" else args.test_episodes
    seed = 0 if split == "train" else 1
    if path.exists():
        spec, eps = read_episodes(path)
        if len(eps) >= count:
            return spec, eps[:count]
    options = {"layout": "cramped_room", "encoding": encoding, "horizon": args.episode_steps}
    start = time.perf_counter()
    collect_episodes("overcooked", options, count, path, seed=seed, run_id=split,
                     policy_factory=team_policy_factory(args.epsilon, seed))  # fmt: skip
    spec, eps = read_episodes(path)
    soups = sum(float(e.reward[:, 0].sum()) for e in eps) / SOUP_REWARD
    print(f"collected {count} {encoding} {split} episodes ({soups:.0f} soups) in "
          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    return spec, eps


def windows_of(eps: list[Any], spec: Any, window: int) -> dict[str, np.ndarray]:
    parts = [episode_windows(e, spec, window) for e in eps]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ------------------------------------------------------------------------------- training


def model_config(changes: dict[str, Any], window: int) -> WorldModelConfig:
    data = json.loads(json.dumps(BASE_MODEL))
    data["backbone"]["max_context"] = window
    routing = changes.pop("modality_routing", False) if changes else False
    data.update(changes)
    data["backbone"]["modality_routing"] = routing
    return WorldModelConfig.from_dict(data)


def train(name: str, seed: int, args: Args) -> WorldModel:
    """The variant's model trained on the training episodes; a run folder that already holds
    the final model (an interrupted benchmark) is loaded instead of trained again."""
    encoding, changes = VARIANTS[name]
    out = Path(args.out) / "runs" / f"{name}_seed{seed}_steps{args.steps}"
    if (out / "world_model.safetensors").exists():
        return WorldModel.load(out / "world_model.safetensors")
    spec, train_eps = episodes(args, encoding, "train")
    torch.manual_seed(seed)
    model = WorldModel(model_config(dict(changes), args.window), spec)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, window=args.window,
                      lr=args.lr, warmup=min(50, args.steps // 10), seed=seed,
                      eval_every=args.steps, log_every=args.steps)  # fmt: skip
    fit(model, windows_of(train_eps, spec, args.window), cfg, out_dir=out, progress=False)
    return model


def step_cpu_seconds(args: Args) -> dict[str, float]:
    """CPU seconds of one training step of each variant, timed side by side (interleaved,
    process time: load from other processes does not count)."""
    from moedream.world_model.train_local import make_optimizer, sample_batch, train_step

    steps = {}
    for name in args.variants:
        encoding, changes = VARIANTS[name]
        spec, train_eps = episodes(args, encoding, "train")
        windows = windows_of(train_eps, spec, args.window)
        model = WorldModel(model_config(dict(changes), args.window), spec)
        model.fit_normalization(windows)
        optimizer = make_optimizer(model.parameters(), TrainConfig(lr=args.lr))
        rng = np.random.default_rng(0)
        steps[name] = lambda m=model, o=optimizer, w=windows, r=rng: train_step(
            m, o, sample_batch(w, args.batch_size, r)
        )
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(1 + args.speed_steps):
        for name, step in steps.items():
            start = time.process_time()
            step()
            if i > 0:  # the first step warms up
                cpu[name].append(time.process_time() - start)
    return {name: float(np.median(v)) for name, v in cpu.items()}


# ----------------------------------------------------------------------------- evaluation


def one_step(model: WorldModel, test: dict[str, np.ndarray]) -> tuple[dict[str, float], Any]:
    """The one-step scores (reward_mae_of_mean: the MAE of the reward head's expectation,
    before ``reward_prediction``) and the deterministic next-observation prediction
    [B, T, N, D]."""
    pred = model.predict_windows(test, noise_scale=0.0)
    obs, next_obs = test["obs"], pred["next_obs_mean"].numpy()
    reward = test["reward"][..., 0]
    scores = prediction_scores(
        pred_obs=next_obs,
        pred_reward=pred["reward"].numpy()[..., 0],
        obs=obs[:, :-1],
        next_obs=obs[:, 1:],
        reward=reward,
    )
    scores["reward_mae_of_mean"] = float(
        np.abs(pred["reward_mean"].numpy()[..., 0] - reward).mean()
    )
    return scores, next_obs


def error_budget(pred: np.ndarray, obs: np.ndarray) -> dict[str, float]:
    """Where the one-step error of a grid model comes from: squared error / squared real
    change (the sum over keys is the squared relative error) per plane group and kind of real
    change of the feature: none, a step (|change| <= 1: a move, a countdown tick) or a jump
    (|change| > 1: a pot starting to cook or emptied). pred [B, T, N, D], obs [B, T+1, N, D]."""
    cells = (*pred.shape[:-1], -1, GRID_PLANES)
    error = ((pred - obs[:, 1:]) ** 2).reshape(cells)  # [B, T, N, C, P]
    change = np.abs(obs[:, 1:] - obs[:, :-1]).reshape(cells)
    total = float((change**2).sum())
    kinds = {"none": change == 0, "step": (change > 0) & (change <= 1), "jump": change > 1}
    return {
        f"{group}/{kind}": float(error[..., planes][mask[..., planes]].sum() / total)
        for group, planes in PLANE_GROUPS.items()
        for kind, mask in kinds.items()
    }


def cook_starts(pred: np.ndarray, obs: np.ndarray) -> dict[str, int]:
    """Cook starts of held-out steps: real ones (a cell's cook time jumps up by > 1), those
    predicted exactly, and predicted jumps where none happened. pred [B, T, N, D], obs
    [B, T+1, N, D] (each agent sees every pot: a start counts once per agent)."""
    cells = (*pred.shape[:-1], -1, GRID_PLANES)
    cook = PLANE_GROUPS["cook time"][0]
    real = (obs[:, 1:] - obs[:, :-1]).reshape(cells)[..., cook]  # [B, T, N, C]
    guess = (pred - obs[:, :-1]).reshape(cells)[..., cook]
    real_start, guessed_start = real > 1, guess > 1
    return {
        "real": int(real_start.sum()),
        "exact": int((np.abs(guess - real) < 0.5)[real_start].sum()),
        "false": int((guessed_start & ~real_start).sum()),
    }


def open_loop(model: WorldModel, eps: list[Any], spec: Any, args: Args) -> dict[str, float]:
    """Imagined vs real soups over ``args.horizon`` steps under the real actions."""
    rng = np.random.default_rng(0)
    context, h = args.window - 1, args.horizon
    picks = [(e, int(rng.integers(context, e.length - h + 1)))
             for e in (eps[int(i)] for i in rng.integers(len(eps), size=args.rollouts))]  # fmt: skip
    ctx_obs = np.stack([e.obs[s - context : s] for e, s in picks])  # [R, c, N, D]
    ctx_act = np.stack([spec.encode_actions(e.action[s - context : s]) for e, s in picks])
    start = np.stack([e.obs[s] for e, s in picks])  # [R, N, D]
    plan = np.stack([spec.encode_actions(e.action[s : s + h]) for e, s in picks])
    real = np.array([e.reward[s : s + h, 0].sum() for e, s in picks]) / SOUP_REWARD
    traj = model.imagine(start, plan, h, context={"obs": ctx_obs, "action": ctx_act},
                         noise_scale=0.0)  # fmt: skip
    imagined = np.round(traj.reward[..., 0].sum(1) / SOUP_REWARD)
    match = imagined == np.round(real)
    with_soup = real > 0
    return {
        "soup_match": float(match.mean()),
        "soup_match_with_soup": float(match[with_soup].mean()) if with_soup.any() else float("nan"),
        "rollouts_with_soup": float(with_soup.sum()),
    }


def object_labels(model: WorldModel, obs: np.ndarray) -> np.ndarray:
    """The object type of every backbone token of windows obs [B, T, N, D] of a grid
    tokenizer (time-major): the object in a cell token's cell, or the token's kind."""
    tok = model.backbone.tokenizer
    b, t, n, _ = obs.shape
    cells = obs.reshape(b, t, n, tok.obs_tokens, GRID_PLANES)
    kind = np.full((b, t, n, len(tok.modality)), OBJECT_TYPES.index("floor"))
    for name in reversed(list(OBJECT_PLANES)):  # the first listed wins
        present = cells[..., list(OBJECT_PLANES[name])].max(-1) > 0
        kind[..., : tok.obs_tokens][present] = OBJECT_TYPES.index(name)
    kind[..., tok.obs_tokens] = OBJECT_TYPES.index("agent token")
    kind[..., tok.obs_tokens + 1] = OBJECT_TYPES.index("action token")
    return kind.reshape(-1)


def specialisation(model: WorldModel, test: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Routing count tables [labels, experts] per layer and label kind, on held-out windows."""
    obs, action = test["obs"][:256, :-1], test["action"][:256]
    b, t, n, _ = obs.shape
    labels = token_labels(model.backbone.tokenizer.modality.numpy(), b, t, n)
    sizes = {"modality": len(MODALITIES), "agent": n, "object": len(OBJECT_TYPES)}
    if model.backbone.tokenizer.obs_tokens > 1:
        labels["object"] = object_labels(model, obs)
    e = model.config.moe.num_experts
    return {
        f"l{layer}/{key}": routing_counts(experts, values, e, sizes[key])
        for layer, experts in enumerate(layer_routes(model, obs, action))
        for key, values in labels.items()
    }


def heatmap(tables: dict[str, np.ndarray], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in tables if not k.endswith("/agent")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        counts = tables[key]
        names = MODALITIES if key.endswith("modality") else OBJECT_TYPES
        rows = counts.sum(1) > 0
        ax.imshow(routing_distribution(counts)[rows], vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(int(rows.sum())), [n for n, r in zip(names, rows) if r], fontsize=7)
        ax.set_xticks(range(counts.shape[1]))
        ax.set_xlabel("expert")
        ax.set_title(f"{key}  NMI {normalised_mi(counts):.2f}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def budget_table(budgets: list[tuple[str, int, dict[str, float], dict[str, int]]]) -> str:
    """The error budgets of the grid variants as a markdown table (rows: variant x change),
    then their cook starts. Variant "copy" is the copy baseline (o_{t+1} = o_t): its entries
    are the shares of the real change itself."""
    if not budgets:
        return ""
    rows = [
        [name, seed, kind] + [budget[f"{group}/{kind}"] for group in PLANE_GROUPS]
        for name, seed, budget, _ in budgets
        for kind in ("none", "step", "jump")
        if name != "copy" or kind != "none"  # copying is never wrong where nothing changes
    ]
    starts = [[name, seed, c["real"], c["exact"], c["false"]] for name, seed, _, c in budgets]
    return (
        "\n\nOne-step error budget of the grid variants: squared error / squared real change "
        "per plane group and kind of real change of a feature (none; a step, |change| <= 1: a "
        "move, a countdown tick; a jump, |change| > 1: a pot starting to cook or emptied); "
        "all entries of a variant sum to its squared one-step error (`copy`: the copy "
        "baseline, whose entries are the shares of the real change; its sum is 1):\n\n"
        + markdown_table(["variant", "seed", "change", *PLANE_GROUPS], rows)
        + "\n\nCook starts on the held-out steps (counted once per agent):\n\n"
        + markdown_table(["variant", "seed", "real", "predicted exactly", "false starts"], starts)
    )


# ------------------------------------------------------------------------------------ main


def run(args: Args) -> None:
    torch.set_num_threads(args.threads)
    rows, spec_rows, budgets = [], [], []
    for name in args.variants:
        encoding = VARIANTS[name][0]
        spec, test_eps = episodes(args, encoding, "test")
        test = windows_of(test_eps, spec, args.window)
        for seed in args.seeds:
            model = train(name, seed, args)
            scores, pred = one_step(model, test)
            if encoding == "grid":
                if not budgets:  # the copy baseline, once
                    copy = test["obs"][:, :-1]
                    budgets.append(("copy", "-", error_budget(copy, test["obs"]),
                                    cook_starts(copy, test["obs"])))  # fmt: skip
                budgets.append((name, seed, error_budget(pred, test["obs"]),
                                cook_starts(pred, test["obs"])))  # fmt: skip
            soups = open_loop(model, test_eps, spec, args)
            tables = specialisation(model, test)
            heatmap(tables, f"{name} seed {seed}", ROOT / "benchmarks" / "plots" /
                    f"world_model_overcooked_{name}_seed{seed}.png")  # fmt: skip
            mi = {k: normalised_mi(v) for k, v in tables.items()}
            const = scores["wm_eval_reward_mae_const"]
            rows.append([name, seed, scores["wm_eval_obs_rel_err"], scores["wm_eval_reward_mae"],
                         const, scores["wm_eval_reward_mae"] / const,
                         scores["reward_mae_of_mean"] / const,
                         soups["soup_match"], soups["soup_match_with_soup"]])  # fmt: skip
            spec_rows.append((name, seed, mi))
            print(rows[-1], spec_rows[-1], flush=True)
    body = markdown_table(
        ["variant", "seed", "one-step rel. obs error", "reward MAE", "const MAE",
         "MAE / const", "expectation's MAE / const", f"{args.horizon}-step soups match",
         "... with a real soup"],
        rows,
    )  # fmt: skip
    body += budget_table(budgets)
    cpu = step_cpu_seconds(args)
    agent_steps = args.batch_size * args.window * 2
    first = args.variants[0]
    speed = [[name, cpu[name], agent_steps / cpu[name], cpu[first] / cpu[name]] for name in cpu]
    body += f"\n\nTraining throughput (median of {args.speed_steps} steps, timed side by side):\n\n"
    body += markdown_table(
        ["variant", "CPU s / step", "agent-steps per CPU-s", f"throughput vs {first}"], speed
    )
    body += "\n\nNormalised mutual information I(expert; label) / H(label) per MoE layer:\n\n"
    keys = sorted({k for _, _, mi in spec_rows for k in mi})  # "object": grid tokens only
    table = [[name, seed] + [mi.get(k, "-") for k in keys] for name, seed, mi in spec_rows]
    body += markdown_table(["variant", "seed"] + keys, table)
    body += (
        f"\n\nData: cramped_room, {args.train_episodes} training and {args.test_episodes} "
        f"held-out episodes of {args.episode_steps} steps of the scripted team (epsilon "
        f"{args.epsilon}); {args.steps} steps of batch {args.batch_size}, window {args.window}. "
        "Heatmaps: benchmarks/plots/world_model_overcooked_<variant>_seed<seed>.png. The "
        "machine was shared with other jobs: throughput figures are loaded-machine figures."
    )
    publish("world_model_overcooked", "World model on Overcooked: old vs modality tokens",
            body, args.record)  # fmt: skip


if __name__ == "__main__":
    run(parse_args(Args, __doc__))
