"""Does the coherence gate keep a poisoned world model out of learning? MBMAPPO teams trained on
imagination from a good and from a reward-biased served world model, gate on and off, same seeds.

    python benchmarks/gate_training.py                   # resumable: finished runs are skipped
    python benchmarks/gate_training.py --summarise-only  # the table from the finished runs

One world model is trained on the platform (stages collect and world_model of the main job on
Overcooked cramped_room, collection seed ``model_seed``; its real steps count for every run).
The faulty model is that model with extra imagined reward ``bias`` for every agent step that
takes action ``fault_action`` (Overcooked's STAY by default: a planner that believes it learns
to stand still), written into its reward head's weights (benchmarks/_faults.py), its ensemble
untouched. Variants, each trained with every seed through moedream/results/platform_train.py
(Serve over HTTP on 127.0.0.1, the gate actor, RLlib's new API stack, fixed-seed evaluations):

    good_gate      the good model served, gate on
    bias_gate      the faulty model served, gate on
    bias_no_gate   the faulty model served, every imagined trajectory learnt from

The gate is calibrated on the good model (the gate stage's model terms on held-out real
windows) in every run: the fault stands for a model that went bad after the gate was fitted.
Finished runs are recorded under ``--out`` (moedream/results/runner.py) and skipped on a re-run;
an unfinished one resumes from its last evaluation.

The criterion, fixed before the runs (paired by seed, on the seeds every variant finished; each
run's return is the mean of ``eval_episodes`` fixed-seed evaluation episodes):

    informative  the good-model team learnt: the 90% t interval of its learning gain (return at
                 the budget minus the same team's return at real step 0, untrained) is above 0
    with gate    the 90% t interval of bias_gate - good_gate lies inside +-delta (the TOST
                 equivalence test at 5%), delta = ``margin`` x the mean learning gain: the gated
                 team on the faulty model keeps at least half of what imagination from the good
                 model let the team learn (0.5: the usual non-inferiority margin, which keeps
                 half of the reference's effect)
    without      the 90% t interval of bias_no_gate - good_gate lies below 0 (one-sided t-test
                 at 5%: measurably worse)

The goal is met when all three hold.
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
from _training import iteration_means, mean_se, train_seed_by_seed_and_record  # noqa: E402

from moedream.results.platform_train import PlatformTrainer  # noqa: E402
from moedream.results.spec import Protocol, ResultsSpec, Variant  # noqa: E402

OVERCOOKED_ACTIONS = ("up", "down", "right", "left", "stay", "interact")
# variant -> (served model, gate on)
VARIANTS = {"good_gate": ("good", True), "bias_gate": ("biased", True),
            "bias_no_gate": ("biased", False)}  # fmt: skip
EPISODE_STEPS = 400  # Overcooked horizon of the collection (configs/quickstart.yaml)
CONFIDENCE = 0.90  # two-sided t intervals: inside +-delta is TOST at 5%, below 0 a 5% t-test


@dataclasses.dataclass
class Args:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    batch: int = 1000
    """Real env steps per iteration (train_batch_size)."""
    iterations: int = 8
    updates: int = 2
    """PPO updates per real batch on imagination (imagination.updates)."""
    horizon: int = 5
    collect_episodes: int = 4
    """Random-policy episodes of 400 steps the world model trains on (counted as real steps)."""
    world_model_steps: int = 300
    model_seed: int = 0
    fault_action: int = 4
    """Discrete action whose steps the faulty model rewards (4: Overcooked's STAY)."""
    bias: float = 1.0
    """Extra imagined reward per agent step on that action (raw units; a soup is 20)."""
    eval_episodes: int = 5
    margin: float = 0.5
    """Equivalence margin delta as a fraction of the good-model team's mean learning gain."""
    out: str = "runs/gate_training"
    http_port: int = 8473
    summarise_only: bool = False
    record: bool = True
    progress: bool = False


def build_spec(args: Args) -> ResultsSpec:
    """The three variants with the shared protocol: evaluations at real step 0, halfway and at
    the budget (world-model data + ``iterations`` batches)."""
    budget = args.collect_episodes * EPISODE_STEPS + args.iterations * args.batch
    protocol = Protocol(seeds=tuple(args.seeds), budget_real_steps=budget,
                        eval_every_real_steps=max(budget // 2, args.batch),
                        eval_episodes=args.eval_episodes, metric="team_return", threshold=0.0,
                        hold=1, final_last_k=1)  # fmt: skip
    protocol.validate("protocol.")
    common = {
        "train_batch_size": args.batch,
        "minibatch_size": min(500, args.batch),
        "imagination.enabled": True,
        "imagination.provider": "world_model",
        "imagination.horizon": args.horizon,
        "imagination.updates": args.updates,
        "imagination.real_every_update": True,
        "imagination.world_model_retrain_every": 0,  # the served model stays as built
        # the served checkpoint's rollouts computed in the trainer: the same rollouts as Serve's
        # without a round trip per imagined step (the gate's re-imaginations still use Serve)
        "imagination.world_model.imagine_in_process": True,
        "prepare.collect.episodes": args.collect_episodes,
        "prepare.world_model.train.steps": args.world_model_steps,
        "fault": {"model": "", "action": args.fault_action, "bias": args.bias},
    }
    variants = []
    for name, (model, gate) in VARIANTS.items():
        overrides = {**common, "imagination.gate": gate,
                     "fault": {**common["fault"], "model": model}}  # fmt: skip
        variants.append(Variant(name, overrides, protocol))
    train = {"agents_config": "configs/agents_overcooked.yaml",
             "prepare_config": "configs/quickstart.yaml", "http_port": args.http_port}  # fmt: skip
    return ResultsSpec(protocol, tuple(variants), baseline="good_gate", train=train)


def without_fault(variant: Variant) -> Variant:
    """The variant as the platform sees it (``fault`` is this benchmark's, not a config key;
    it stays in the overrides the runner records, so a changed fault is a new experiment)."""
    overrides = {k: v for k, v in variant.overrides.items() if k != "fault"}
    return dataclasses.replace(variant, overrides=overrides)


class FaultTrainer(PlatformTrainer):
    """PlatformTrainer whose preparation serves the shared good model or its faulty copy and
    starts the gate calibrated on the good model."""

    def __init__(self, spec: ResultsSpec, out_dir: str | Path, args: Args):
        plain = dataclasses.replace(spec, variants=tuple(map(without_fault, spec.variants)))
        super().__init__(plain, out_dir, progress=args.progress)
        self.args, self.model = args, "good"

    def __call__(self, variant: Variant, seed: int, callback, *, resumed: int = 0) -> None:
        self.model = variant.overrides["fault"]["model"]
        super().__call__(without_fault(variant), seed, callback, resumed=resumed)

    def resolved_config(self, variant: Variant, seed: int) -> dict:
        """The platform's resolved configs plus the fault the served model carries."""
        resolved = super().resolved_config(without_fault(variant), seed)
        return {**resolved, "fault": variant.overrides["fault"]}

    def _prepare(self, quickstart) -> int:
        from moedream.platform.pipeline import run_pipeline
        from moedream.platform.quickstart import gate_stage, serve_stage

        shared = quickstart.replace(name="world_model", out=str(self.out_dir),
                                    collect=quickstart.collect.replace(seed=self.args.model_seed))  # fmt: skip
        records = run_pipeline(shared, ("collect", "world_model"))
        good = records["world_model"]["checkpoint"]
        served = good if self.model == "good" else str(faulty_checkpoint(shared, good, self.args))
        serve_stage(shared, {"world_model": {"checkpoint": served}})
        gate_stage(shared, {"world_model": {"checkpoint": good}})
        return int(records["collect"]["env_steps"])


def faulty_checkpoint(shared, good: str, args: Args) -> Path:
    """The good model with the action-dependent reward bias (made once, then reused)."""
    from _faults import with_action_reward_bias

    from moedream.data import load_windows
    from moedream.world_model.model import WorldModel

    folder = shared.run_dir / f"fault_action{args.fault_action}_bias{args.bias}"
    path = folder / "world_model.safetensors"
    if path.is_file():
        return path
    model = WorldModel.load(good, map_location="cpu")
    _, windows, _ = load_windows(shared.run_dir / "data", model.config.backbone.max_context,
                                 holdout=0.25, seed=0)  # fmt: skip
    faulty, added = with_action_reward_bias(model, windows, args.fault_action, args.bias)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fault.json").write_text(json.dumps(added))
    faulty.save(path)
    print(f"faulty model: {added} (raw reward added on real windows)", flush=True)
    return path


# ------------------------------------------------------------------------------------ table


def evaluations(out_dir: Path, variant: str, seeds: tuple[int, ...]) -> dict[int, tuple]:
    """Seed -> (metrics at real step 0: the untrained team, metrics at the budget), finished
    runs only."""
    from moedream.results.runner import done_path, points_path

    out = {}
    for seed in seeds:
        if done_path(out_dir, variant, seed).exists():
            lines = points_path(out_dir, variant, seed).read_text().splitlines()
            out[seed] = (json.loads(lines[0])["metrics"], json.loads(lines[-1])["metrics"])
    return out


def gate_causes(out_dir: Path, variant: str, seeds: list[int]) -> str:
    """Per cause, the fraction of imagined trajectories not approved whole for it (mean over
    iterations and seeds); '-' without the gate."""
    runs = [iteration_means(out_dir / variant / f"seed_{s}_run", "provider/gate_cause_")
            for s in seeds]  # fmt: skip
    causes = sorted({c for r in runs for c in r})
    rates = {c: np.mean([r.get(c, np.nan) for r in runs]) for c in causes}
    shown = [f"{c.removesuffix('_rate')} {v:.2f}" for c, v in rates.items() if v >= 0.005]
    return ", ".join(shown) or "-"


def imagined_reward(out_dir: Path, variant: str, seeds: list[int]) -> list[float]:
    """Per seed, the imagined reward per kept step (first agent), mean over iterations: what
    the learner was shown."""
    tag = "imagination/imagined_reward_per_step"
    runs = [iteration_means(out_dir / variant / f"seed_{s}_run", tag) for s in seeds]
    return [r.get("", math.nan) for r in runs]


def render(args: Args, spec: ResultsSpec) -> str:
    out_dir = Path(args.out)
    runs = {v.name: evaluations(out_dir, v.name, spec.protocol.seeds) for v in spec.variants}
    action = f"action_rate_{args.fault_action}"
    rows = []
    for variant in spec.variants:
        done = sorted(runs[variant.name])
        finals = [runs[variant.name][s][1] for s in done]
        model, gate = VARIANTS[variant.name]
        per_seed = ", ".join(f"{s}: {m['team_return']:.1f}" for s, m in zip(done, finals))
        causes = gate_causes(out_dir, variant.name, done) if gate and done else "-"
        shown = mean_se(imagined_reward(out_dir, variant.name, done))
        rows.append([variant.name, model, "on" if gate else "off", len(done),
                     mean_se([runs[variant.name][s][0]["team_return"] for s in done]),
                     mean_se([m["team_return"] for m in finals]),
                     mean_se([m[action] for m in finals]),
                     mean_se([m["gate_approve_rate"] for m in finals]) if gate else "-",
                     causes, shown,
                     mean_se([m["soups_per_episode"] for m in finals]),
                     per_seed or "-"])  # fmt: skip
    headers = ["variant", "served model", "gate", "seeds done",
               "team return at real step 0 (untrained)", "team return at budget",
               f"{OVERCOOKED_ACTIONS[args.fault_action]} rate at budget",
               "gate approve rate (since the previous evaluation)",
               "not approved whole, by cause (mean over iterations)",
               "imagined reward per learnt step", "soups per episode",
               "team return per seed"]  # fmt: skip
    return markdown_table(headers, rows) + "\n\n" + criterion(runs, action, args.margin)


def criterion(runs: dict[str, dict[int, tuple]], action: str, margin: float) -> str:
    """The goal's test on the seeds every variant finished (see the module docstring)."""
    from moedream.results.stats import mean_t_interval

    seeds = sorted(set.intersection(*(set(r) for r in runs.values())))
    if len(seeds) < 2:
        return f"Criterion: needs >= 2 seeds finished by every variant (have {seeds})."

    def final(name: str, key: str = "team_return") -> np.ndarray:
        return np.array([runs[name][s][1][key] for s in seeds])

    untrained = np.array([runs["good_gate"][s][0]["team_return"] for s in seeds])
    gain = mean_t_interval(final("good_gate") - untrained, CONFIDENCE)
    delta = margin * gain.point
    gated = mean_t_interval(final("bias_gate") - final("good_gate"), CONFIDENCE)
    ungated = mean_t_interval(final("bias_no_gate") - final("good_gate"), CONFIDENCE)
    stay = {n: mean_se(list(final(n, action) - final("good_gate", action)))
            for n in ("bias_gate", "bias_no_gate")}  # fmt: skip
    informative = gain.lo > 0
    equivalent = informative and -delta < gated.lo and gated.hi < delta
    worse = ungated.hi < 0
    met = informative and equivalent and worse
    learnt = ("above 0, informative" if informative
              else "not shown above 0: the comparison is not informative")  # fmt: skip
    return (
        f"Criterion on seeds {seeds} (paired by seed; mean [{CONFIDENCE:.0%} t interval]): "
        f"the good-model team's learning gain (return at the budget minus its untrained "
        f"return) {_interval(gain)}: {learnt}; "
        f"margin δ = {margin} × {gain.point:.2f} = {delta:.2f}. "
        f"bias_gate − good_gate {_interval(gated)}: "
        f"{'inside' if equivalent else 'not inside'} ±δ (TOST at 5%). "
        f"bias_no_gate − good_gate {_interval(ungated)}: "
        f"{'below 0' if worse else 'not below 0'} (one-sided t-test at 5%). "
        f"Fault-action rate minus the good-model run's: bias_gate {stay['bias_gate']}, "
        f"bias_no_gate {stay['bias_no_gate']} (mean ± SE). "
        f"Goal: **{'met' if met else 'not met'}**."
    )  # fmt: skip


def _interval(interval) -> str:
    return f"{interval.point:+.2f} [{interval.lo:+.2f}, {interval.hi:+.2f}]"


def note(args: Args, spec: ResultsSpec) -> str:
    fault = Path(args.out) / "world_model" / f"fault_action{args.fault_action}_bias{args.bias}"
    added = json.loads((fault / "fault.json").read_text()) if fault.exists() else {}
    measured = (f" (on the world model's training windows it adds {added['bias_on_action']:.3f} "
                f"on that action and {added['bias_on_others']:.3f} on the others)"
                if added else "")  # fmt: skip
    p = spec.protocol
    return (
        f"Overcooked cramped_room, shaped team return. One world model ({args.world_model_steps} "
        f"Ray Train steps on {args.collect_episodes} random episodes, collection seed "
        f"{args.model_seed}); the faulty copy adds {args.bias} imagined reward per agent step on "
        f"action {args.fault_action} ({OVERCOOKED_ACTIONS[args.fault_action]}){measured}. "
        f"MBMAPPO: batch {args.batch}, {args.iterations} iterations, horizon {args.horizon}, "
        f"{args.updates} imagination updates per batch with the real batch in each; team seeds "
        f"{list(p.seeds)}; budget {p.budget_real_steps} real steps (world-model data included); "
        f"evaluation on {p.eval_episodes} fixed-seed episodes at the budget; mean ± SE over "
        f"seeds. Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
        "(a shared machine)."
    )


def main(args: Args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = build_spec(args)
    trainer = None if args.summarise_only else FaultTrainer(spec, args.out, args)
    train_seed_by_seed_and_record(
        args, spec, trainer, lambda: note(args, spec) + "\n\n" + render(args, spec),
        "gate_training", "Coherence gate vs a reward-biased world model: training",
    )  # fmt: skip


if __name__ == "__main__":
    main(parse_args(Args, __doc__.splitlines()[0]))
