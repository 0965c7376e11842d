"""Does memory-composed imagination at a long horizon train a better team? MBMAPPO on the
per-episode-moves Overcooked kitchen, imagining H >= 20 steps with and without episode memory,
everything else equal, paired seeds.

    python benchmarks/memory_training.py                   # resumable: finished runs are skipped
    python benchmarks/memory_training.py --summarise-only  # the table from the finished runs

The task: cramped_room whose four moves are shuffled at every reset (``moves: per_episode``),
hidden from the observations: only an episode's own history tells them. One world model is
trained on the platform (stages collect and world_model of the main job on that task, seed
``model_seed``; its real steps count for every run) and served by Ray Serve with a fitted
episode memory (the serve stage measures the spatial expert's error on the collected episodes).
Variants, each trained with every seed through moedream/results/platform_train.py (Serve over
HTTP on 127.0.0.1, the gate actor, RLlib's new API stack, fixed-seed evaluations):

    memory      imagination.memory: each round posts ``memory_branches`` real prefixes of the
                iteration's episodes to the replica's episode memory and imagines from their
                latest real state with that memory composed into every step
    no_memory   the same rounds from sampled real states with the plain served model

Both imagine through Serve (not in process: memory lives in the replica) with the gate on. The
LoRA expert is off (``memory.long_term: false``): on this task its validation rejects every
adapter (benchmarks/results/memory_overcooked_per_episode.md), so it changes no rollout and
costs seconds per post; the spatial retrieval expert is the one that lowers the 40-step error.
Finished runs are recorded under ``--out`` (moedream/results/runner.py) per (variant, seed) and
skipped on a re-run; an interrupted run resumes from its last evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import markdown_table, parse_args  # noqa: E402
from _training import (  # noqa: E402
    final_points,
    iteration_values,
    mean_se,
    paired_t_interval,
    train_seed_by_seed_and_record,
)

from moedream.results.platform_train import PlatformTrainer  # noqa: E402
from moedream.results.spec import Protocol, ResultsSpec, Variant  # noqa: E402

VARIANTS = {"memory": True, "no_memory": False}  # variant -> imagination.memory
EPISODE_STEPS = 400  # Overcooked horizon of the collection and the team's episodes
TASK = {"layout": "cramped_room", "horizon": EPISODE_STEPS, "shaped_reward_weight": 1.0,
        "moves": "per_episode"}  # fmt: skip


@dataclasses.dataclass
class Args:
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    batch: int = 800
    """Real env steps per iteration (train_batch_size)."""
    iterations: int = 3
    horizon: int = 20
    """Imagined steps per rollout (H >= 20: where memory can pay)."""
    updates: int = 2
    """PPO updates per real batch on imagination (imagination.updates)."""
    memory_branches: int = 4
    num_epochs: int = 4
    collect_episodes: int = 4
    """Random-policy episodes of 400 steps the world model trains on (counted as real steps)."""
    world_model_steps: int = 300
    model_seed: int = 0
    eval_episodes: int = 4
    out: str = "runs/memory_training"
    http_port: int = 8474
    summarise_only: bool = False
    record: bool = True
    progress: bool = False


def build_spec(args: Args) -> ResultsSpec:
    """The two variants with the shared protocol: evaluations at real step 0 and at the budget
    (world-model data + ``iterations`` batches)."""
    budget = args.collect_episodes * EPISODE_STEPS + args.iterations * args.batch
    protocol = Protocol(seeds=tuple(args.seeds), budget_real_steps=budget,
                        eval_every_real_steps=budget, eval_episodes=args.eval_episodes,
                        metric="team_return", threshold=0.0, hold=1, final_last_k=1)  # fmt: skip
    protocol.validate("protocol.")
    common = {
        "env_options": dict(TASK),
        "train_batch_size": args.batch,
        "minibatch_size": min(400, args.batch),
        "num_epochs": args.num_epochs,
        "imagination.enabled": True,
        "imagination.provider": "world_model",
        "imagination.horizon": args.horizon,
        "imagination.updates": args.updates,
        "imagination.real_every_update": True,
        "imagination.memory_branches": args.memory_branches,
        "imagination.world_model_retrain_every": 0,  # the served model (and memory) as built
        "imagination.world_model.imagine_in_process": False,  # memory lives in the replica
        "prepare.collect.episodes": args.collect_episodes,
        "prepare.world_model.train.steps": args.world_model_steps,
        "prepare.serve.memory.long_term": False,
    }
    variants = [Variant(name, {**common, "imagination.memory": memory}, protocol)
                for name, memory in VARIANTS.items()]  # fmt: skip
    train = {"agents_config": "configs/agents_overcooked.yaml",
             "prepare_config": "configs/quickstart.yaml", "http_port": args.http_port}  # fmt: skip
    return ResultsSpec(protocol, tuple(variants), baseline="no_memory", train=train)


class SharedModelTrainer(PlatformTrainer):
    """PlatformTrainer whose preparation serves one world model for every run (trained once,
    collection seed ``model_seed``) and starts the gate calibrated on it; the serve stage fits
    the episode memory when the variant imagines with memory."""

    def __init__(self, spec: ResultsSpec, out_dir: str | Path, args: Args):
        super().__init__(spec, out_dir, progress=args.progress)
        self.args = args

    def _prepare(self, quickstart) -> int:
        from moedream.platform.pipeline import run_pipeline
        from moedream.platform.quickstart import gate_stage, serve_stage

        collect = quickstart.collect.replace(seed=self.args.model_seed)
        shared = quickstart.replace(name="world_model", out=str(self.out_dir), collect=collect)
        records = run_pipeline(shared, ("collect", "world_model"))
        served = serve_stage(shared, records)
        gate_stage(shared, {"world_model": {"checkpoint": served["checkpoint"]}})
        return int(records["collect"]["env_steps"])


# ------------------------------------------------------------------------------------ table


def run_means(
    out_dir: Path, variant: str, seeds: list[int], prefix: str, *, first: bool = False
) -> dict[str, float]:
    """Every TensorBoard scalar under ``prefix``: mean over iterations (``first``: the first
    iteration's value), then over seeds."""
    runs = []
    for seed in seeds:
        values = iteration_values(out_dir / variant / f"seed_{seed}_run", prefix)
        runs.append({t: v[0] if first else float(np.mean(v)) for t, v in values.items()})
    tags = sorted({t for r in runs for t in r})
    return {t: float(np.nanmean([r.get(t, np.nan) for r in runs])) for t in tags}


def first_and_last(out_dir: Path, variant: str, seed: int) -> tuple[dict, dict]:
    """A finished run's evaluations at real step 0 (the untrained team) and at the budget."""
    from moedream.results.runner import points_path

    lines = points_path(out_dir, variant, seed).read_text().splitlines()
    return json.loads(lines[0]), json.loads(lines[-1])


def training_seconds_per_step(first: dict, last: dict, collected: int) -> float:
    """Wall-clock seconds per real step the team trained: from its first evaluation (after the
    world model's preparation) to the one at the budget, evaluations excluded, over the real
    steps after the ``collected`` ones of the world model."""
    return (last["wallclock_s"] - first["wallclock_s"]) / (last["real_steps"] - collected)


def gate_reading(provider: dict[str, float]) -> str:
    """Per cause, the fraction of imagined rollouts not approved whole, and the truncated one."""
    causes = {k.removeprefix("gate_cause_").removesuffix("_rate"): v
              for k, v in provider.items() if k.startswith("gate_cause_")}  # fmt: skip
    shown = [f"{c} {v:.2f}" for c, v in sorted(causes.items()) if v >= 0.005]
    truncated = provider.get("gate_truncated_rate", math.nan)
    return f"{', '.join(shown) or 'none'}; truncated {truncated:.2f}"


def render(args: Args, spec: ResultsSpec) -> str:
    out_dir = Path(args.out)
    finals = {v.name: final_points(out_dir, v.name, spec.protocol.seeds) for v in spec.variants}
    rows = []
    for variant in spec.variants:
        runs = finals[variant.name]
        metrics = {s: p["metrics"] for s, p in runs.items()}
        tb = run_means(out_dir, variant.name, sorted(runs), "") if runs else {}
        provider = {
            k.removeprefix("provider/"): v for k, v in tb.items() if k.startswith("provider/")
        }
        first_provider = run_means(out_dir, variant.name, sorted(runs), "provider/", first=True)
        collected = args.collect_episodes * EPISODE_STEPS
        ends = [first_and_last(out_dir, variant.name, s) for s in runs]
        per_step = [training_seconds_per_step(first, last, collected) for first, last in ends]
        untrained = [first["metrics"]["team_return"] for first, _ in ends]
        rows.append([
            variant.name, len(runs), mean_se(untrained),
            mean_se([m["team_return"] for m in metrics.values()]),
            ", ".join(f"{s}: {m['team_return']:.1f}" for s, m in sorted(metrics.items())) or "-",
            mean_se([m["soups_per_episode"] for m in metrics.values()]),
            mean_se([m["gate_approve_rate"] for m in metrics.values()]),
            gate_reading(first_provider) if runs else "-",
            gate_reading(provider) if provider else "-",
            f"{provider.get('memory_branches', 0):.1f}" if provider else "-",
            _figure(tb, "charts/imagined_env_steps_iter", 0),
            _figure(tb, "time/imagine_s", 1), _figure(tb, "time/iteration_s", 1),
            mean_se(per_step, 3),
        ])  # fmt: skip
    headers = ["variant", "seeds done", "team return at real step 0 (untrained)",
               "team return at budget (mean ± SE)",
               "team return per seed", "soups per episode", "gate approve rate",
               "not approved whole by cause; truncated: first iteration",
               "the same, mean over iterations",
               "memory branches per round", "imagined steps kept per iteration",
               "imagine s per iteration", "s per iteration",
               "training wall-clock s per real step"]  # fmt: skip
    return markdown_table(headers, rows) + "\n\n" + paired_difference(finals)


def _figure(tb: dict[str, float], tag: str, digits: int) -> str:
    return f"{tb[tag]:.{digits}f}" if tag in tb else "-"


def paired_difference(finals: dict[str, dict[int, dict]]) -> str:
    """memory − no_memory team return at the budget on the seeds both finished."""
    seeds = sorted(set(finals["memory"]) & set(finals["no_memory"]))
    if not seeds:
        return "No seed finished both variants yet."
    diffs = [finals["memory"][s]["metrics"]["team_return"]
             - finals["no_memory"][s]["metrics"]["team_return"] for s in seeds]  # fmt: skip
    low, high = paired_t_interval(diffs)
    interval = (
        f"95% t interval [{low:.2f}, {high:.2f}]" if not math.isnan(low) else "no CI (1 seed)"
    )
    return (f"Paired difference memory − no_memory in team return at the budget, seeds {seeds}: "
            f"{np.mean(diffs):.2f} ({interval}; per seed "
            f"{', '.join(f'{d:.1f}' for d in diffs)}).")  # fmt: skip


def note(args: Args, spec: ResultsSpec) -> str:
    p = spec.protocol
    return (
        f"Overcooked cramped_room with moves shuffled per episode, shaped team return. One world "
        f"model ({args.world_model_steps} Ray Train steps on {args.collect_episodes} random "
        f"episodes of {EPISODE_STEPS} steps, collection seed {args.model_seed}), served with its "
        "episode memory (spatial retrieval expert fitted on those episodes; LoRA expert off). "
        f"MBMAPPO: batch {args.batch}, {args.iterations} iterations, {args.num_epochs} epochs, "
        f"horizon {args.horizon}, {args.updates} imagination updates per batch with the real "
        f"batch in each, imagined ratio 1, gate on, {args.memory_branches} memory branches per "
        f"round; team seeds {list(p.seeds)}; budget {p.budget_real_steps} real steps "
        f"(world-model data included); evaluation on {p.eval_episodes} fixed-seed episodes at "
        "the budget; training wall-clock per real step: from the evaluation at the world "
        "model's real steps to the one at the budget (evaluations excluded). Load average at "
        "the end: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared machine)."
    )


def main(args: Args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = build_spec(args)
    trainer = None if args.summarise_only else SharedModelTrainer(spec, args.out, args)
    train_seed_by_seed_and_record(
        args, spec, trainer, lambda: note(args, spec) + "\n\n" + render(args, spec),
        "memory_training", "Memory-composed imagination at horizon 20: team training",
    )  # fmt: skip


if __name__ == "__main__":
    main(parse_args(Args, __doc__.splitlines()[0]))
