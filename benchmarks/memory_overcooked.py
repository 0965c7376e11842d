"""Memory experts on the real world model, long Overcooked rollouts: error vs horizon and
recall error for each expert ablation, and cost per imagined step, in one run.

A small WorldModel with a SHORT context (backbone.max_context 4) is trained on cramped_room
random-policy episodes; the spatial expert is fitted on those training episodes (the
retrieval expert's memory error; the adapter row trains the adapter too); then on held-out
episodes it observes a prefix and imagines ``horizon`` steps beyond it with the episode's REAL
actions (``evaluate_rollouts`` of benchmarks/_memory_eval.py). Every row sees the same
sampling noise (paired), so each row is compared with the short-term expert alone per
episode. ``--seeds`` (default 0 1: world-model init and sampling noise, same episodes) run in
turn; each seed's trained model and each row's per-episode results are saved under ``--out``,
so an interrupted run resumes and a re-run only evaluates rows whose config changed (or those
named in ``--rerun``). The ratio to the short-term expert is taken per episode, averaged
over the seeds, and reported as mean ± standard error over episodes.
Recall error = error on (step, agent) where the agent stands on a cell visited in the prefix
but not inside the short context. Standardised = each feature's squared error divided by its
training variance (floored at 0.01): raw MSE is dominated by a few wide features. Spread =
the standardised variance between an episode's samples: how diverse the imagined futures are,
which compares PoCE with one shared prior (the default) against the naive product of experts
(``form: sum``, every expert brings its own prior). A second table shows why the LoRA
expert's validation keeps or rejects it: the adapter's denoiser loss against the base's on
the pairs it was fitted on, on the held-out rest of the prefix and on the episode's next real
transitions, per rank, step count and learning rate (``lora_diagnosis``). A third table times
one imagined step after remembering 50 .. 800 real steps (does the cost stay constant with
context length?).

``--moves per_episode`` runs it on the Overcooked variant whose four moves are shuffled at
every reset (hidden per-episode dynamics: only the episode's own history tells them), the
task where long-term memory must help; it records its own block.

    python benchmarks/memory_overcooked.py                  # ~30 min on 2 shared cores
    python benchmarks/memory_overcooked.py --moves per_episode --train-episodes 40 --train-steps 800
    python benchmarks/memory_overcooked.py --train-steps 50 --train-episodes 4 --eval-episodes 3 \
        --horizon 8 --lengths 50 --lora-episodes 2 --out runs/memory_smoke --no-record  # smoke
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, parse_args, publish  # noqa: E402
from benchmarks._memory_eval import (  # noqa: E402
    evaluate_rollouts,
    random_episodes,
    seconds_per_step,
    small_world_model,
    training_windows,
)
from moedream.files import atomic_write_text  # noqa: E402
from moedream.world_model.memory import (  # noqa: E402
    MemoryConfig,
    MemoryExperts,
    load_memory,
    save_memory,
)
from moedream.world_model.memory.config import TRANSITION_KEYS  # noqa: E402
from moedream.world_model.memory.long_term import MemoryStore  # noqa: E402
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
    seeds: tuple[int, ...] = (0, 1)
    """World-model init and sampling-noise seeds (same episodes: paired), run in turn."""
    out: str = "runs/memory_overcooked"
    """Per-seed trained models and per-row results; a re-run reuses them (resumable)."""
    rerun: tuple[str, ...] = ()
    """Rows to evaluate again although saved (after a code change; 'all' = every row,
    'cost' the cost table, 'lora' the LoRA diagnosis)."""
    lora_episodes: int = 6
    """Held-out episodes of the LoRA diagnosis (first seed only; 0 = skip it)."""
    record: bool = True

    @property
    def env(self) -> dict:
        return {"layout": "cramped_room", "horizon": self.episode_horizon, "moves": self.moves}

    def folder(self, seed: int) -> Path:
        """Where one seed's models and results live: every setting that changes them (not the
        seeds, threads or timing lengths) names the folder."""
        keep = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("seeds", "out", "rerun", "record", "threads", "lengths", "timed_steps",
                          "lora_episodes")}  # fmt: skip
        digest = hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:10]
        return Path(self.out) / f"{self.moves}-{digest}" / f"seed{seed}"


def memory_config(args: Args) -> MemoryConfig:
    """The memory settings of every row (rows switch experts and weights on top)."""
    return MemoryConfig(
        adapter_steps=args.adapter_steps, adapter_horizon=16,
        max_adapters=max(16, args.eval_episodes),
    )  # fmt: skip


def train(args: Args, seed: int, spec, episodes) -> tuple[dict[str, MemoryExperts], float]:
    """-> ({name: memory} on one world model, seconds): the retrieval spatial expert with each
    transition key ("cell", "cell_and_neighbours", fitted here: real data only, cheap) and
    the spatial adapter ("adapter"). The world model and the adapter are trained on
    ``episodes``, or loaded from this seed's folder."""
    folder, config = args.folder(seed), memory_config(args)
    adapter_cfg = config.replace(spatial_mode="adapter")
    if (folder / "train.json").exists():
        model = WorldModel.load(folder / "world_model.safetensors")
        adapter = MemoryExperts(model, adapter_cfg)
        saved = load_memory(folder / "adapter.safetensors", model)
        adapter.spatial_adapter.load_state_dict(saved.spatial_adapter.state_dict())
        seconds = json.loads((folder / "train.json").read_text())["seconds"]
        print(f"seed {seed}: world model and spatial adapter loaded from {folder}", flush=True)
    else:
        torch.manual_seed(seed)
        model = WorldModel(small_world_model(args.context), spec)
        cfg = TrainConfig(steps=args.train_steps, batch_size=32, window=args.context, lr=2e-3,
                          warmup=20, eval_every=10**6, log_every=10**6,
                          checkpoint_every=10**6, precision="fp32")  # fmt: skip
        start = time.perf_counter()
        fit(model, training_windows(episodes, spec, args.context), cfg, progress=True)
        adapter = MemoryExperts(model, adapter_cfg)
        adapter.fit_spatial(
            [(e.obs, e.action) for e in episodes[:10]],
            generator=torch.Generator().manual_seed(seed),
            progress=True,
        )
        seconds = time.perf_counter() - start
        folder.mkdir(parents=True, exist_ok=True)
        model.save(folder / "world_model.safetensors")
        save_memory(adapter, folder / "adapter.safetensors")
        atomic_write_text(folder / "train.json", json.dumps({"seconds": seconds}))
    memories = {"adapter": adapter}
    for key in TRANSITION_KEYS:
        memories[key] = MemoryExperts(model, config.replace(transition_key=key))
        memories[key].fit_spatial([(e.obs, e.action) for e in episodes])
    return memories, seconds


def ablations(memory: MemoryConfig) -> dict[str, tuple[str, MemoryConfig]]:
    """name -> (which memory of ``train``, memory config). Rows sharing a memory and its LoRA
    settings follow each other: the later ones reuse the adapters (see ``evaluate_seed``)."""
    key = memory.transition_key
    other = next(k for k in TRANSITION_KEYS if k != key)
    return {
        "short-term alone": (key, memory.only("short")),
        "short + spatial (retrieval)": (key, memory.only("short", "spatial")),
        f"short + spatial (retrieval, key {other})": (
            other,
            memory.only("short", "spatial").replace(transition_key=other),
        ),
        "short + spatial (adapter)": (
            "adapter",
            memory.only("short", "spatial").replace(spatial_mode="adapter"),
        ),
        "short + long-term (LoRA)": (key, memory.only("short", "long")),
        "all three": (key, memory),
        "all three, alpha_long = 2": (key, memory.replace(alpha_long=2.0)),
        "all three, naive product (form = sum)": (key, memory.replace(form="sum")),
        "all three, LoRA always kept": (key, memory.replace(lora_validation=0.0)),
    }


def lora_fit(config: MemoryConfig) -> tuple | None:
    """What a row's LoRA adapters depend on (None: the row fits none)."""
    if not config.long_term:
        return None
    fields = ("lora_rank", "lora_alpha", "lora_steps", "lora_lr", "lora_batch_size",
              "lora_validation")  # fmt: skip
    return tuple(getattr(config, f) for f in fields)


def evaluate_seed(args: Args, seed: int, spec, episodes) -> dict:
    """Every ablation row on one seed -> {"train_seconds", "rows": {row: {"config", "kept",
    "result"}}, "memory"}; rows saved in the seed's folder are reused unless named in
    ``--rerun``. A row whose LoRA settings match the previous row evaluated on the same memory
    reuses its episodes' memories (the test-time finetune is the costly part)."""
    n_train = args.train_episodes
    memories, train_s = train(args, seed, spec, episodes[:n_train])
    held_out = episodes[n_train:]
    feature_var = np.concatenate([e.obs for e in episodes[:n_train]]).var(0)  # [N, D]
    path = args.folder(seed) / "rows.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    rows, built = {}, {}  # built: memory name -> LoRA settings its episodes were fitted with
    for name, (which, config) in ablations(memory_config(args)).items():
        old = saved.get(name)
        if old and old["config"] == config.to_dict() and not {name, "all"} & set(args.rerun):
            rows[name] = old
            continue
        memory = memories[which]
        memory.set_config(config)
        reuse = lora_fit(config) is not None and built.get(which) == lora_fit(config)
        r = evaluate_rollouts(
            memory, held_out, prefix=args.prefix, horizon=args.horizon, samples=args.samples,
            seed=seed, feature_var=feature_var, remember=not reuse,
        )  # fmt: skip
        built[which] = lora_fit(config)
        kept = None
        if config.long_term and config.lora_validation > 0 and memory.store is not None:
            kept = sum(memory.store.last_kept.get(e.episode_id, 0) for e in held_out)
        result = {k: np.asarray(v).tolist() for k, v in dataclasses.asdict(r).items()}
        rows[name] = {"config": config.to_dict(), "kept": kept, "result": result}
        atomic_write_text(path, json.dumps({**saved, **rows}))
        print(f"seed {seed}, {name}: mean MSE {r.long_horizon_mse:.4f}, LoRA kept {kept}",
              flush=True)  # fmt: skip
    memory = memories[memory_config(args).transition_key]
    memory.set_config(memory.cfg.replace(lora_validation=0.0))  # time the LoRA pass too
    return {"train_seconds": train_s, "rows": rows, "memory": memory}


LORA_SETTINGS = ((8, 60, 3e-3), (8, 60, 3e-4), (2, 150, 3e-3), (32, 150, 1e-3))
"""(rank, Adam steps, learning rate) of the LoRA diagnosis; the first is the default."""


def lora_diagnosis(args: Args, memory: MemoryExperts, held_out: list) -> list[list]:
    """Why the LoRA expert abstains: per setting, its denoiser loss over the base's (same
    noise) on the pairs it was fitted on (the prefix's first 75 %), on the prefix's held-out
    latest 25 % (what ``lora_validation`` checks) and on the episode's next ``horizon`` real
    transitions (teacher-forced: what imagination needs), mean ± SE over the first
    ``lora_episodes`` held-out episodes, with the episodes where the future loss is lower.
    Saved beside the first seed's results (resumable)."""
    path = args.folder(args.seeds[0]) / "lora.json"
    if not args.lora_episodes:
        return []
    if path.exists() and "lora" not in args.rerun:
        return json.loads(path.read_text())
    spec, p, h = memory.model.spec, args.prefix, args.horizon
    base = memory_config(args)
    n_fit = int(round((1 - base.lora_validation) * p))
    ratios = {s: [] for s in LORA_SETTINGS}  # setting -> [(fit, held-out, future) per episode]
    for i, episode in enumerate(held_out[: args.lora_episodes]):
        obs = torch.as_tensor(episode.obs[: p + h + 1]).float()
        act = torch.as_tensor(spec.encode_actions(episode.action[: p + h]), dtype=torch.float32)
        cond, x0 = memory.denoiser_pairs(obs, act)  # [p + h, C], [p + h, X]
        parts = {"fit": slice(0, n_fit), "held": slice(n_fit, p), "future": slice(p, p + h)}
        for rank, steps, lr in LORA_SETTINGS:
            cfg = base.replace(lora_rank=rank, lora_steps=steps, lora_lr=lr)
            store = MemoryStore(memory.model.denoiser, cfg)
            torch.manual_seed(args.seeds[0] + i)  # the adapter's initialisation
            with torch.enable_grad():
                store.finetune_pairs("e", x0[parts["fit"]], cond[parts["fit"]],
                                     generator=torch.Generator().manual_seed(i))  # fmt: skip
            losses = [store.paired_loss("e", x0[part], cond[part]) for part in parts.values()]
            ratios[(rank, steps, lr)].append([a / b for a, b in losses])
        print(f"LoRA diagnosis: episode {i} done", flush=True)
    rows = []
    for (rank, steps, lr), per_episode in ratios.items():
        r = np.asarray(per_episode)  # [E, 3]
        se = r.std(0, ddof=1) / np.sqrt(len(r))
        cells = [f"{m:.3f} ± {e:.3f}" for m, e in zip(r.mean(0), se)]
        rows.append([rank, steps, lr, *cells, f"{int((r[:, 2] < 1).sum())}/{len(r)}"])
    atomic_write_text(path, json.dumps(rows))
    return rows


def ratio_cells(rows: list[dict], bases: list[dict]) -> tuple[str, str, str]:
    """One row on every seed vs the short-term expert alone -> (per-episode ratio averaged
    over seeds: 'mean ± SE over episodes', each seed's mean ratio, episode-seed pairs lower)."""
    ratios = np.stack(
        [
            np.asarray(r["episode_mse"]) / np.maximum(b["episode_mse"], 1e-12)
            for r, b in zip(rows, bases)
        ]
    )  # fmt: skip  [S, E]
    per_episode = ratios.mean(0)
    se = per_episode.std(ddof=1) / np.sqrt(len(per_episode)) if len(per_episode) > 1 else np.nan
    per_seed = " / ".join(f"{m:.3f}" for m in ratios.mean(1))
    return f"{per_episode.mean():.3f} ± {se:.3f}", per_seed, f"{(ratios < 1).sum()}/{ratios.size}"


def combined_row(args: Args, name: str, seeds: list[dict]) -> list:
    """One table row: figures averaged over seeds, ratios to short-term alone paired."""
    res = [s["rows"][name]["result"] for s in seeds]
    base = [s["rows"]["short-term alone"]["result"] for s in seeds]
    mean = lambda key: float(np.mean([np.mean(r[key]) for r in res]))  # noqa: E731
    last = float(np.mean([np.mean(r["horizon_mse"][-(args.horizon // 4) :]) for r in res]))
    recall = np.mean([r["recall_mse"] / b["recall_mse"] for r, b in zip(res, base)])
    spread = np.stack([r["episode_spread"] for r in res]).mean(0)  # [E]
    kept = [s["rows"][name]["kept"] for s in seeds]
    steps = args.eval_episodes * args.samples * args.horizon
    return [
        name, f"{mean('horizon_mse'):.4f}", f"{last:.4f}",
        f"{mean('episode_std_mse'):.4f}", f"{mean('recall_mse'):.4f}", f"{recall:.3f}", *ratio_cells(res, base),
        f"{spread.mean():.4f} ± {spread.std(ddof=1) / np.sqrt(len(spread)):.4f}",
        "-" if kept[0] is None else " / ".join(str(k) for k in kept),
        f"{1e3 * mean('seconds') / steps:.1f}",
    ]  # fmt: skip


def cost(args: Args, memory: MemoryExperts) -> list[list]:
    """[history steps, remember s, ms per imagined step short-term alone, all three] rows,
    saved beside the first seed's results (resumable)."""
    path = args.folder(args.seeds[0]) / "cost.json"
    if path.exists() and "cost" not in args.rerun:
        return json.loads(path.read_text())
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
    atomic_write_text(path, json.dumps(rows))
    return rows


def block(args: Args, seeds: list[dict], cost_rows: list[list], lora_rows: list[list]) -> str:
    """The RESULTS.md block: setup, the ablation table over seeds, the LoRA diagnosis, the
    cost table."""
    h, n = args.horizon, len(seeds)
    table = markdown_table(
        ["experts", f"MSE h 1-{h}", f"MSE h {h - h // 4 + 1}-{h}", "standardised MSE",
         "recall MSE", "recall MSE / short", "MSE / short (per episode, mean ± SE)",
         "per seed", "lower than short (episode x seed)", "spread between samples",
         "LoRA kept (per seed)", "ms per imagined step"],
        [combined_row(args, name, seeds) for name in seeds[0]["rows"]],
    )  # fmt: skip
    n_fit = int(round((1 - memory_config(args).lora_validation) * args.prefix))
    lora_table = markdown_table(
        ["LoRA rank", "steps", "lr", "loss / base, fitted pairs", "held-out prefix",
         f"next {h} transitions", "episodes lower (next)"], lora_rows,
    )  # fmt: skip
    lora_text = (
        f"LoRA expert alone (first seed, {args.lora_episodes} held-out episodes, no "
        f"validation): its denoiser loss / the base's (same noise) on the pairs it was fitted "
        f"on (prefix steps 1-{n_fit}), on the held-out rest of the prefix and on the next {h} "
        f"real transitions, mean ± SE over episodes:\n\n{lora_table}\n\n"
        if lora_rows else ""
    )  # fmt: skip
    cost_table = markdown_table(
        ["remembered real steps", "remember + LoRA finetune (s)", "ms per step, short",
         "ms per step, all three"], cost_rows,
    )  # fmt: skip
    task = (
        "Overcooked cramped_room, its four moves shuffled at every reset (hidden: only the "
        "episode's history tells them)" if args.moves == "per_episode"
        else "Overcooked cramped_room"
    )  # fmt: skip
    train_s = " / ".join(f"{s['train_seconds']:.0f}" for s in seeds)
    return (
        f"{task}. Small WorldModel (d_model 64, 2 layers, 4 experts, {args.context}-step context) "
        f"trained {args.train_steps} steps on {args.train_episodes} random-policy episodes of "
        f"{args.episode_horizon} steps, spatial experts fitted on them (world model and "
        f"spatial adapter: {train_s} s per seed); "
        f"{args.eval_episodes} held-out episodes x {args.samples} samples: {args.prefix} real "
        f"steps observed, {h} imagined with the real actions; same sampling noise in every row. "
        f"Seeds {', '.join(map(str, args.seeds))}: world-model init and noise, same episodes. "
        f"MSE: raw per-feature error vs the real observation, mean over seeds; 'MSE / short': "
        f"per-episode ratio averaged over the {n} seeds, mean ± SE over episodes; recall: "
        f"(step, agent) on a cell seen in the prefix but not in the context; spread: "
        f"standardised variance between samples; LoRA kept: episodes whose adapter lowered the "
        f"denoiser loss on the prefix's latest 25 %. Machine shared with other jobs.\n\n"
        f"{table}\n\n{lora_text}Cost per imagined step (batch 1, best of 3 x {args.timed_steps}; first "
        f"seed) after remembering a history of each length (spatial memory capped at "
        f"{memory_config(args).spatial_capacity} entries, LoRA kept):\n\n{cost_table}"
    )


def main() -> None:
    args = parse_args(Args, __doc__)
    torch.set_num_threads(args.threads)
    spec, episodes = random_episodes(
        "overcooked", args.env, range(args.train_episodes + args.eval_episodes)
    )
    seeds = [evaluate_seed(args, seed, spec, episodes) for seed in args.seeds]
    memory = seeds[0].pop("memory")
    lora_rows = lora_diagnosis(args, memory, episodes[args.train_episodes :])
    cost_rows = cost(args, memory)
    name = "memory_overcooked" if args.moves == "fixed" else f"memory_overcooked_{args.moves}"
    publish(
        name,
        f"Memory experts on the world model: long Overcooked rollouts ({args.moves} moves)",
        block(args, seeds, cost_rows, lora_rows),
        args.record,
    )


if __name__ == "__main__":
    main()
