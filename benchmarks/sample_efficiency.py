"""Team return vs real env steps: with imagination vs model-free MAPPO, same seeds, one run.

    python benchmarks/sample_efficiency.py                  # the settings of RESULTS.md
    python benchmarks/sample_efficiency.py --provider env_replay --env-steps 200000

For each env (Overcooked cramped_room, MaMuJoCo HalfCheetah 2x3) and seed it trains the
model-free baseline (imagination off) and the same config with imagination from
``--provider``, then plots team return vs REAL env steps (PNG) and records a table in
RESULTS.md. Headline: how many times fewer real steps the imagination run needs to reach the
model-free run's final return.

Honesty: ``--provider world_model`` (the default) first runs the main job's stages 1-4 for
the env (collect random episodes, train the world model with Ray Train, deploy it with Serve,
start the gate), and the real env steps of that collection are added to the model-based run's
real-step axis. ``env_replay`` (EnvReplayImaginer) steps real env copies, it is NOT a world
model: its own env steps are added to its real-step axis and the run is labelled "env-replay
stand-in", never "model-based".
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import markdown_table, parse_args, publish  # noqa: E402

CONFIGS = {
    "overcooked": "configs/agents_overcooked.yaml",
    "mamujoco": "configs/agents_mamujoco.yaml",
}
STAND_INS = {"env_replay"}  # providers that are real env steps, not a world model
GOAL = 3.0  # model-based reaches model-free's final return with >= 3x fewer real steps


@dataclasses.dataclass
class Args:
    envs: tuple[str, ...] = ("overcooked", "mamujoco")
    """Envs to run (overcooked = cramped_room, mamujoco = HalfCheetah 2x3)."""
    provider: str = "world_model"
    """Imagination provider of the model-based run: world_model, or env_replay (a stand-in)."""
    world_model_steps: int = 600
    """Ray Train steps of the world model (provider world_model)."""
    wm_reward_loss_weight: float = 0.0
    """World model's reward-head loss weight (model.loss_weights.reward; 0 = the config's)."""
    collect_steps: int = 1000
    """Real env steps of random-policy episodes collected to first train the world model
    (provider world_model): ceil(steps / episode length) episodes, at least one (Overcooked
    400-step episodes: 3; MuJoCo 1000-step episodes: 1). They count as the model-based run's
    real steps."""
    env_steps: int = 40_000
    """Real env step budget per run."""
    seeds: tuple[int, ...] = (0,)
    train_batch_size: int = 4000
    minibatch_size: int = 500
    num_epochs: int = 6
    horizon: int = 0
    """Imagination horizon (0 = each env's agents config: imagination.horizon)."""
    imagined_ratio: float = 1.0
    """Imagined env steps per real env step per imagination round."""
    imagination_updates: int = 4
    """PPO updates per real batch that use imagination (1 = one mixed real + imagined update;
    K > 1 adds K - 1 updates on fresh imagination under the updated planner)."""
    later_epochs: int = 0
    """Model-based run: PPO epochs of each imagination update after the first
    (imagination.later_epochs; 0 = --num-epochs, as the first)."""
    real_every_update: str = "config"
    """Model-based run: does every imagination update also learn from the real batch
    (imagination.real_every_update)? 'config' (each env's agents config), 'true' or 'false'."""
    uncertainty_penalty: float = -1.0
    """Model-based run: imagination.uncertainty_penalty (MOPO's lambda; -1 = the config's)."""
    kl_coeff: float = -1.0
    """Both runs: initial weight of PPO's adaptive KL penalty (kl_coeff; -1 = each env's
    agents config, 0 = no KL penalty)."""
    grad_clip: float = -1.0
    """Both runs: the team's global gradient-norm clip (grad_clip; -1 = each env's agents
    config, 0 = no clipping)."""
    mf_grad_clip: float = -1.0
    """Model-free run only: its grad_clip (-1 = as the model-based run). Set it to the best of
    benchmarks/baseline_grad_clip.py, so the target is the tuned baseline's return."""
    start_iteration: int = 0
    """Model-based run: iterations before this one update on real episodes only."""
    retrain_steps: int = 150
    """Fine-tune steps of every world-model retrain."""
    retrain_every: int = 1
    """Fine-tune the served world model on the new real episodes every this many iterations
    (provider world_model; 0 = never)."""
    retrain_in_background: bool = False
    """Model-based run: fine-tune the world model in a Ray task while the team samples and
    learns, served from the next iteration (imagination.world_model.retrain_in_background)."""
    imagine_in_process: bool = False
    """Model-based run: compute the served model's rollouts in the algorithm's process
    (imagination.world_model.imagine_in_process, as the results table's runs do)."""
    gate_refit: bool = True
    """Model-based run: refit the gate's φ on the team's real episodes every iteration
    (imagination.world_model.gate_refit; --no-gate-refit keeps the random collection's)."""
    smooth_steps: int = 4000
    """Each curve point is the mean team return of the iterations within the last this many
    real steps of its run (both runs alike): one iteration's return averages only a few
    episodes, and a lucky point would set the target or the first hit."""
    num_env_runners: int = 2
    episode_horizon: int = 0
    """Override the env's episode length (0 = the config's: 400 Overcooked, 1000 MuJoCo)."""
    http_port: int = 8471
    """Serve's HTTP port (the handle is what the agents use; a free port avoids clashing with
    another Serve on the machine)."""
    storage_path: str = "runs/bench_sample_efficiency"
    plots: str = "benchmarks/plots"
    record: bool = True
    """Write the block (benchmarks/results/, indexed in RESULTS.md)."""
    tag: str = ""
    """Record in the block `sample_efficiency_<tag>` (plots `sample_efficiency_<tag>_<env>.png`)
    instead of `sample_efficiency`, e.g. for a run on one env that must not replace the
    block of both."""


def block_name(args: Args) -> str:
    """RESULTS.md block (and plot file prefix) of this run."""
    return f"sample_efficiency_{args.tag}" if args.tag else "sample_efficiency"


def run_config(args: Args, env: str, seed: int, imagination: bool):
    from moedream.config import load_yaml
    from moedream.platform.agents import AgentsConfig

    data = load_yaml(CONFIGS[env])
    data.update(
        seed=seed,
        train_batch_size=args.train_batch_size,
        num_env_runners=args.num_env_runners,
        minibatch_size=min(args.minibatch_size, args.train_batch_size),
        num_epochs=args.num_epochs,
    )
    if args.kl_coeff >= 0:
        data["kl_coeff"] = args.kl_coeff
    grad_clip = args.grad_clip if imagination or args.mf_grad_clip < 0 else args.mf_grad_clip
    if grad_clip >= 0:
        data["grad_clip"] = grad_clip
    if args.episode_horizon:
        key = "horizon" if env == "overcooked" else "max_episode_steps"
        data["env_options"] = {**data["env_options"], key: args.episode_horizon}
    data["imagination"] = {
        **data.get("imagination", {}),
        "enabled": imagination,
        "provider": args.provider,
        "imagined_ratio": args.imagined_ratio,
        "updates": args.imagination_updates,
        "start_iteration": args.start_iteration,
        "later_epochs": args.later_epochs,
    }
    if args.horizon:
        data["imagination"]["horizon"] = args.horizon
    if args.uncertainty_penalty >= 0:
        data["imagination"]["uncertainty_penalty"] = args.uncertainty_penalty
    if args.real_every_update != "config":
        data["imagination"]["real_every_update"] = args.real_every_update == "true"
    if imagination and args.provider == "world_model" and args.retrain_every:
        run_dir = (Path(args.storage_path) / f"world_model_{env}").resolve()  # its run folder
        data["imagination"]["world_model_retrain_every"] = args.retrain_every
        data["imagination"]["world_model"] = {
            "checkpoint_dir": str(run_dir / f"world_model_retrain_seed{seed}"),
            "base_data_path": str(run_dir / "data"),
            "retrain_steps": args.retrain_steps,
            "gate_refit": args.gate_refit,
            "retrain_in_background": args.retrain_in_background,
        }
    if imagination and args.provider == "world_model" and args.imagine_in_process:
        data["imagination"].setdefault("world_model", {})["imagine_in_process"] = True
    return AgentsConfig.from_dict(data)


def clip_text(args: Args) -> str:
    """The runs' grad_clip, as the RESULTS block states it."""
    name = lambda clip: f"{clip:g}" if clip else "off (no clipping)"  # noqa: E731
    both = f", grad_clip {name(args.grad_clip)}" if args.grad_clip >= 0 else ""
    if args.mf_grad_clip < 0:
        return f"{both} (model-free: the same config with imagination off)"
    return (
        f"{both} (model-free: the same config with imagination off and grad_clip "
        f"{name(args.mf_grad_clip)}, its best in benchmarks/baseline_grad_clip.py)"
    )


def speed_text(args: Args) -> str:
    """The model-based run's speed settings, as the RESULTS block states them ('' = none)."""
    text = " in a background Ray task (served from the next iteration)" * bool(
        args.retrain_in_background
    )
    if args.later_epochs:
        text += f", {args.later_epochs} PPO epoch(s) in each update after the first"
    if args.imagine_in_process:
        text += ", imagination computed in the algorithm's process (context cache)"
    return text


def horizons(args: Args) -> str:
    """'env H, ...': the imagination horizon each env's model-based run uses."""
    return ", ".join(
        f"{env} {run_config(args, env, 0, True).imagination.horizon}" for env in args.envs
    )


def prepare_world_model(args: Args, env: str) -> tuple[int, str]:
    """Collect, train, serve and gate a world model for ``env`` (the main job's stages 1-4),
    on the same env options as the agents; returns (the real env steps that cost, the
    served checkpoint)."""
    from moedream.config import load_yaml
    from moedream.platform.quickstart import ENV_CONFIGS, QuickstartConfig, prepare_imagination

    data = load_yaml(ENV_CONFIGS[env])
    agents = run_config(args, env, args.seeds[0], True)
    data["name"], data["out"] = f"world_model_{env}", args.storage_path
    data["http_port"] = args.http_port
    data["collect"] = {**data["collect"], "env_options": dict(agents.env_options),
                       "episodes": collect_episodes(args, agents)}  # fmt: skip
    data["world_model"]["train"] = {**data["world_model"]["train"], "steps": args.world_model_steps}
    if args.wm_reward_loss_weight:
        model = data["world_model"]["model"]
        model["loss_weights"] = {
            **model.get("loss_weights", {}),
            "reward": args.wm_reward_loss_weight,
        }
    prepared = prepare_imagination(QuickstartConfig.from_dict(data))
    return int(prepared["collect_env_steps"]), str(prepared["world_model"]["checkpoint"])


def collect_episodes(args: Args, agents) -> int:
    """Whole random episodes covering ``--collect-steps`` real steps (at least one)."""
    from moedream.envs import episode_limit

    return max(1, math.ceil(args.collect_steps / episode_limit(agents.env, **agents.env_options)))


def serve_base_checkpoint(path: str) -> None:
    from moedream.platform.serve.deploy import push_checkpoint
    from moedream.platform.serve.names import APP_NAME, DEPLOYMENT_NAME

    push_checkpoint(path, app_name=APP_NAME, deployment_name=DEPLOYMENT_NAME, timeout_s=300)


def curve(
    history: list[dict[str, float]], count_provider_steps: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(real env steps, team return) per iteration; stand-in providers' steps count as real."""
    steps = np.array(
        [
            h["charts/real_env_steps"]
            + (h["charts/provider_env_steps"] if count_provider_steps else 0)
            for h in history
        ]
    )
    returns = np.array([h["charts/team_return"] for h in history])
    return steps, returns


def smooth(steps: np.ndarray, returns: np.ndarray, window: int) -> np.ndarray:
    """Per point i: the mean return of the points j <= i with steps[j] > steps[i] - window
    (a trailing window in real steps; NaN returns are skipped)."""
    out = np.full(len(returns), np.nan)
    for i in range(len(returns)):
        inside = (steps <= steps[i]) & (steps > steps[i] - window) & ~np.isnan(returns)
        if inside.any():
            out[i] = float(np.mean(returns[inside]))
    return out


DIAGNOSTIC_HEADERS = [
    "env",
    "seed",
    "gate approve rate",
    "imagined reward/step",
    "real reward/step",
    "WM reward MAE (const MAE)",
    "WM reward corr",
    "WM next-obs rel. err",
    "WM retrain s/iter",
]


def diagnose(history: list[dict[str, float]]) -> list:
    """Mean over the model-based run's imagining iterations: gate approvals, per-step reward
    the learner saw (imagined vs real), and the world model's held-out one-step scores."""

    def mean(key: str) -> float:
        values = [h.get(key, float("nan")) for h in history if h.get("imagination/rounds", 1)]
        values = [v for v in values if v == v]
        return round(float(np.mean(values)), 4) if values else float("nan")

    return [
        mean("gate/approve_rate"),
        mean("imagination/imagined_reward_per_step"),
        mean("imagination/real_reward_per_step"),
        f"{mean('provider/wm_eval_reward_mae')} ({mean('provider/wm_eval_reward_mae_const')})",
        mean("provider/wm_eval_reward_corr"),
        mean("provider/wm_eval_obs_rel_err"),
        mean("provider/wm_retrain_seconds"),
    ]


PROFILE_STAGES = ("sample", "wm_evaluate", "wm_observe", "wm_retrain", "imagine", "gate",
                  "episodes", "learn", "copy", "sync", "other")  # fmt: skip
PROFILE_HEADERS = ["env", "run", *(f"{s} s" for s in PROFILE_STAGES), "RLlib s", "iteration s",
                   "real steps/iter", "s per 1k real steps"]  # fmt: skip


def profile(env: str, label: str, histories: list[list[dict[str, float]]]) -> list:
    """Mean seconds per iteration in each MBMAPPO stage over every iteration of ``histories``
    (one per seed); "RLlib s" is what Algorithm.train spends outside training_step."""
    its = [h for history in histories for h in history]

    def mean(key: str) -> float:
        return float(np.mean([h.get(key, np.nan) for h in its]))

    iteration, real = mean("time/iteration_s"), mean("charts/real_env_steps_iter")
    return [env, label, *(round(mean(f"time/{s}_s"), 2) for s in PROFILE_STAGES),
            round(iteration - mean("time/training_step_s"), 2), round(iteration, 2), round(real),
            round(1000 * iteration / real, 2)]  # fmt: skip


def steps_to_reach(steps: np.ndarray, returns: np.ndarray, target: float) -> float:
    """First real-step count at which the return reaches ``target`` (NaN if never)."""
    hit = np.flatnonzero(np.nan_to_num(returns, nan=-np.inf) >= target)
    return float(steps[hit[0]]) if hit.size else float("nan")


def compare(mf: tuple, mb: tuple) -> list:
    """Table cells of one model-free vs model-based pair of (steps, smoothed returns, seconds,
    last metrics): the MB real steps to reach MF's final smoothed return, and the ratio."""
    x_mf, y_mf, t_mf, _ = mf
    x_mb, y_mb, t_mb, last_mb = mb
    reach = steps_to_reach(x_mb, y_mb, y_mf[-1])
    imagined = last_mb.get("charts/imagined_env_steps", np.nan)
    return [
        int(x_mf[-1]),
        round(float(y_mf[-1]), 2),
        round(t_mf) if t_mf == t_mf else "",
        int(x_mb[-1]),
        round(float(y_mb[-1]), 2),
        int(imagined) if imagined == imagined else "",
        round(t_mb) if t_mb == t_mb else "",
        reach,
        float(x_mf[-1] / reach) if reach == reach and reach > 0 else float("nan"),
    ]


BUDGET_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def by_budget(mf: tuple, mb: tuple) -> list[str]:
    """Per model-free budget (a fraction of its run): "ratio (MF smoothed return)", the ratio
    being that budget over the MB real steps to first reach MF's return there."""
    x_mf, y_mf = mf[0], mf[1]
    cells = []
    for fraction in BUDGET_FRACTIONS:
        inside = np.flatnonzero(x_mf <= fraction * x_mf[-1] + 1e-9)
        if not inside.size:
            cells.append("")
            continue
        i = inside[-1]
        reach = steps_to_reach(mb[0], mb[1], y_mf[i])
        ratio = f"{x_mf[i] / reach:.2f}x" if reach == reach and reach > 0 else "never"
        cells.append(f"{ratio} ({y_mf[i]:.1f})")
    return cells


def plot(env: str, curves: dict[str, list[tuple]], path: Path) -> None:
    """Per label and seed: (steps, per-iteration return, smoothed return) lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, runs in curves.items():
        color = "C0" if label == "model-free" else "C1"
        for k, (x, y, smoothed) in enumerate(runs):
            ax.plot(x, y, color=color, alpha=0.25, lw=1)  # per iteration
            ax.plot(x, smoothed, label=label if k == 0 else None, color=color, alpha=0.9)
    ax.set_xlabel("real env steps")
    ax.set_ylabel("team return per episode (thin: per iteration)")
    ax.set_title(f"{env}: team return vs real env steps")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    import torch

    from moedream.platform.agents import train
    from moedream.platform.ray_setup import init_ray

    args = parse_args(Args, __doc__.split("\n\n")[0], argv)
    if args.real_every_update not in ("config", "true", "false"):
        raise SystemExit(
            f"--real-every-update {args.real_every_update!r}: use config, true or false"
        )
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray()
    stand_in = args.provider in STAND_INS
    mb_label = (
        f"{args.provider} stand-in (not a world model)"
        if stand_in
        else f"model-based ({args.provider})"
    )
    rows, budget_rows, plots, diagnostics, profiles = [], [], [], [], []
    for env in args.envs:
        curves: dict[str, list] = {"model-free": [], mb_label: []}
        histories: dict[str, list] = {"model-free": [], mb_label: []}
        prep_start = time.perf_counter()
        offset, base = prepare_world_model(args, env) if args.provider == "world_model" else (0, "")
        prep_seconds = time.perf_counter() - prep_start
        for seed in args.seeds:
            results = {}
            for imagination, label in ((False, "model-free"), (True, mb_label)):
                if imagination and base and args.retrain_every and seed != args.seeds[0]:
                    serve_base_checkpoint(base)  # every seed fine-tunes from the same model
                start = time.perf_counter()
                result = train(
                    run_config(args, env, seed, imagination),
                    args.storage_path,
                    env_steps=args.env_steps,
                    run_name=f"{env}_s{seed}_{'mb' if imagination else 'mf'}",
                    checkpoint=False,
                )
                history_path = Path(result.run_dir) / "history.json"
                history_path.write_text(json.dumps(result.history, indent=1))
                histories[label].append(result.history)
                if imagination:
                    diagnostics.append([env, seed, *diagnose(result.history)])
                x, y = curve(result.history, count_provider_steps=imagination and stand_in)
                if imagination:  # the world model's training data were real steps too
                    x = x + offset
                smoothed = smooth(x, y, args.smooth_steps)
                curves[label].append((x, y, smoothed))
                results[label] = (x, smoothed, time.perf_counter() - start, result.history[-1])
            rows.append([env, seed, *compare(results["model-free"], results[mb_label])])
            budget_rows.append([env, seed, *by_budget(results["model-free"], results[mb_label])])
        if len(args.seeds) > 1:  # the seeds' mean curves (the same iterations in every seed)
            mean = {
                label: (runs[0][0], np.mean([r[2] for r in runs], 0), np.nan, {})
                for label, runs in curves.items()
            }
            rows.append([env, "mean", *compare(mean["model-free"], mean[mb_label])])
            budget_rows.append([env, "mean", *by_budget(mean["model-free"], mean[mb_label])])
        profiles += [profile(env, label, runs) for label, runs in histories.items()]
        mf_rate, mb_rate = profiles[-2][-1], profiles[-1][-1]
        profiles.append([env, "MB / MF", *[""] * (len(PROFILE_HEADERS) - 3),
                         f"{mb_rate / mf_rate:.1f}x"])  # fmt: skip
        print(f"{env}: world model prepared in {prep_seconds:.0f} s (collect, Train, Serve, gate)")
        print(markdown_table(PROFILE_HEADERS, profiles[-3:]), flush=True)
        path = Path(args.plots) / f"{block_name(args)}_{env}.png"
        plot(env, curves, path)
        plots.append(path)
    headers = [
        "env",
        "seed",
        "MF real steps",
        "MF final return (smoothed)",
        "MF time s",
        "MB real steps",
        "MB final return (smoothed)",
        "MB imagined steps",
        "MB time s",
        "MB real steps to reach MF final",
        "real-step ratio to reach MF final",
    ]
    ratios = {(r[0], r[1]): r[-1] for r in rows}
    verdicts = [
        f"{env} seed {seed}: "
        + (f"{ratio:.2f}x ({'met' if ratio >= GOAL else 'not met'})" if ratio == ratio else
           "never reached MF's final return (not met)")
        for (env, seed), ratio in ratios.items()
    ]  # fmt: skip
    body = (
        f"Model-based run: **{mb_label}**, imagination horizon "
        f"{args.horizon or 'of each env config (' + horizons(args) + ')'}, "
        f"{args.imagination_updates} imagination update(s) per real batch (the first on real + "
        f"imagined episodes, the others on fresh imagination under the updated planner"
        + {"true": ", each with the real batch too", "false": ""}.get(
            args.real_every_update, ", with the real batch too where the env config says so"
        )
        + "), "
        f"imagined:real {args.imagined_ratio} per update "
        f"({args.imagined_ratio * args.imagination_updates:g} in all), world model "
        f"{args.world_model_steps} Ray Train steps on random-policy episodes of "
        f"{args.collect_steps} real steps (rounded up to whole episodes), "
        f"fine-tuned {args.retrain_steps} steps every {args.retrain_every} iteration(s) on the "
        f"real episodes so far{speed_text(args)}; budget {args.env_steps} real env steps per run, batch "
        f"{args.train_batch_size}, minibatch {args.minibatch_size}, {args.num_epochs} epochs"
        f"{clip_text(args)}. MB real steps include the "
        "random episodes the world model was first trained on. Returns are smoothed alike for "
        f"both runs: each point is the mean over the iterations of the last {args.smooth_steps} "
        "real steps of its run; the target is model-free's final smoothed return.\n\n"
        f"Headline (goal >= {GOAL:g}x fewer real steps to reach model-free's final return): "
        + "; ".join(verdicts)
        + ".\n\n"
        + markdown_table(headers, rows)
        + "\n\nThe same ratio against the model-free run's smoothed return at a part of its "
        "budget (model-free real steps there / model-based real steps to first reach it; in "
        "brackets the model-free return):\n\n"
        + markdown_table(
            ["env", "seed", *(f"MF at {f:g} of its budget" for f in BUDGET_FRACTIONS)],
            budget_rows,
        )
        + "\n\nDiagnostics of the model-based runs (means over iterations; the world-model "
        "scores are one-step predictions on each iteration's NEW real episodes, before the "
        "model trains on them; a reward MAE not below the constant predictor's means the model "
        "has not learnt the reward):\n\n"
        + markdown_table(DIAGNOSTIC_HEADERS, diagnostics)
        + "\n\nWhere the wall-clock goes (mean seconds per iteration over every seed; the "
        "stages of MBMAPPO.training_step, `time/<stage>_s` in TensorBoard; the first world "
        "model's preparation is not in these rows; load average at the end "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} logical CPUs):\n\n"
        + markdown_table(PROFILE_HEADERS, profiles)
        + "\n\n"
        + "\n".join(f"![{p.stem}]({os.path.relpath(p, 'benchmarks')})" for p in plots)
        + (
            "\n\nThe env-replay stand-in is real env data: its own env steps are counted as real "
            "steps and it is not evidence for model-based learning."
            if stand_in
            else ""
        )
    )
    title = "Sample efficiency: return vs real env steps" + (f" ({args.tag})" if args.tag else "")
    publish(block_name(args), title, body, args.record)


if __name__ == "__main__":
    main()
