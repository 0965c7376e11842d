"""Coherence gate under fault injection: does it reject imagination from broken world models
while approving a good model's and real data?

Real data: Overcooked cramped_room random-policy episodes, split by episode into the world
model's training set, the gate's calibration set (φ is fitted on the training episodes, the
model terms on the calibration episodes' windows) and a test set (held-out real windows are
judged; imagined rollouts start at its states). Four tiny world models imagine ``horizon``
steps under uniformly random actions:

- good: trained on cramped_room;
- reward_bias: the good model with its reward head's output shifted by ``reward_bias`` per
  step (what a planner exploiting hallucinated rewards finds);
- corrupt_dynamics: the good model with Gaussian noise of ``corrupt_scale`` times the weights'
  own std added to the last layer of its dynamics (mean) head;
- other_layout: trained the same way on ``other_layout`` episodes;
- action_bias: the good model imagining ``action_bias`` extra reward on every agent step that
  takes action ``bias_action`` (STAY), the exploitable fault of benchmarks/gate_training.py.

The reflector's term (kernel section 6b) needs a team critic; here it is a linear critic fitted
by least squares to the discounted real returns of the training episodes (a random team's
critic), calibrated on the calibration windows' real TD residuals. "approved whole without the
reflector's term" judges the same trajectories with its weight at 0: the difference to
"approved whole" is what the term adds.

A rollout counts as caught when the gate rejects it or truncates it; "steps kept" is the
fraction of all imagined steps that would reach the learner (whole approved rollouts and the
kept prefixes of truncated ones: those steps passed every term, but a faulty model made them). "old gate" judges with the real-data metrics alone (this kernel without the
model terms: drift, stall, support), as the gate did before the model terms. The second table
says which term sees each fault: the fraction of rollouts not approved whole by the gate with
that model term alone (on top of the real-data checks, the "old gate" column). Models are
cached in ``--cache`` (delete it to retrain).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import markdown_table, parse_args, publish  # noqa: E402
from _faults import (  # noqa: E402
    with_action_reward_bias,
    with_corrupt_dynamics,
    with_reward_bias,
)

from moedream.coherence.kernel import (  # noqa: E402
    MODEL_TERMS,
    GateConfig,
    Normalizer,
    Verdict,
    judge,
    td_residuals,
    truncate,
)
from moedream.coherence.model_calibration import calibrate_model_terms, model_view  # noqa: E402
from moedream.platform.commands.calibrate_gate import (  # noqa: E402
    collect_random_episodes,
    windows_from_episodes,
)
from moedream.world_model.model import WorldModel, WorldModelConfig  # noqa: E402
from moedream.world_model.train_local import TrainConfig, fit  # noqa: E402

MODEL = {
    "d_model": 32,
    "cond_dim": 32,
    "backbone": {"num_layers": 1, "num_heads": 2, "max_context": 6},
    "moe": {"d_hidden": 32, "num_experts": 4, "top_k": 2},
    "rssm": {"deter": 16, "hidden": 16, "stoch": 4},
    "diffusion": {"hidden": 32, "layers": 1},
    "sampler": {"num_steps": 2},
    "heads": {"hidden": 32, "ensemble_size": 4, "ensemble_hidden": 32},
}


@dataclasses.dataclass
class Args:
    layout: str = "cramped_room"
    other_layout: str = "coordination_ring"
    episodes: int = 48
    """Random-policy episodes of ``layout``: 2/3 train, 1/6 calibrate, 1/6 test."""
    max_steps: int = 100
    train_steps: int = 800
    horizon: int = 5
    rollouts: int = 256
    reward_bias: float = 0.25
    """Added to every imagined reward (raw units when real rewards never vary; the README's
    exploited MaMuJoCo model imagined +0.24 per step against a real -0.25)."""
    corrupt_scale: float = 3.0
    bias_action: int = 4
    """Action the action_bias model rewards (4: Overcooked's STAY)."""
    action_bias: float = 1.0
    """Extra imagined reward per agent step on that action (as in gate_training.py)."""
    gamma: float = 0.99
    """Discount of the linear critic behind the reflector's term."""
    seed: int = 0
    cache: str = "runs/gate_faults"
    threads: int = 1
    record: bool = True
    """Write the table to RESULTS.md (else only print it)."""


def train_model(episodes: list[dict], args: Args, name: str) -> WorldModel:
    """A tiny world model trained on the episodes' windows (cached by ``name``)."""
    from moedream.envs import env_spec

    layout = args.other_layout if name == "other_layout" else args.layout
    spec = env_spec("overcooked", layout=layout)
    path = Path(args.cache) / name / "world_model.safetensors"
    if path.is_file():
        return WorldModel.load(path, map_location="cpu")
    model = WorldModel(WorldModelConfig.from_dict(MODEL), spec)
    windows = windows_from_episodes(episodes, 6, stride=2)
    data = {k: getattr(windows, k) for k in ("obs", "action", "reward", "terminated")}
    cfg = TrainConfig(steps=args.train_steps, batch_size=32, window=6, warmup=50,
                      eval_every=10**9, checkpoint_every=10**9, seed=args.seed)  # fmt: skip
    start = time.perf_counter()
    fit(model, data, cfg, progress=False)
    print(f"trained {name} in {time.perf_counter() - start:.0f}s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return model


def imagine(model: WorldModel, start: np.ndarray, args: Args):
    rng = np.random.default_rng(args.seed + 1)
    n, a = model.spec.n_agents, model.spec.action_dims[0]
    plan = rng.integers(0, a, size=(len(start), args.horizon, n))
    gen = torch.Generator().manual_seed(args.seed)
    return model.imagine(start, plan, args.horizon, generator=gen)


def one_step_error(model: WorldModel, windows: dict[str, np.ndarray]) -> float:
    """RMS error of the model's next obs (teacher-forced, noise 0) over that of predicting no
    change, on real windows: < 1 beats the copy predictor."""
    pred = model.predict_windows(windows, noise_scale=0.0)["next_obs"].numpy()  # [B, T, N, D]
    nxt, now = windows["obs"][:, 1:], windows["obs"][:, :-1]
    return float(np.sqrt(np.mean((pred - nxt) ** 2)) / np.sqrt(np.mean((nxt - now) ** 2)))


def fit_critic(episodes: list[dict], normalizer: Normalizer, gamma: float):
    """values(obs [M, N, D]) -> [M]: least squares of the discounted returns of ``episodes``
    (team-mean reward) on the normalised states, with a small ridge."""
    xs, ys = [], []
    for e in episodes:
        reward = e["reward"].mean(axis=1)  # [T]
        returns = np.zeros(len(reward) + 1)
        for t in range(len(reward) - 1, -1, -1):
            returns[t] = reward[t] + gamma * returns[t + 1]
        xs.append(normalizer.normalised_state(e["obs"][:-1]).reshape(len(reward), -1))
        ys.append(returns[:-1])
    x = np.concatenate(xs)
    x = np.concatenate([x, np.ones((len(x), 1))], 1)  # [M, N*D + 1]
    w = np.linalg.solve(x.T @ x + 1e-3 * np.eye(x.shape[1]), x.T @ np.concatenate(ys))
    return lambda obs: normalizer.normalised_state(obs).reshape(len(obs), -1) @ w[:-1] + w[-1]


def with_critic(trajs, values, gamma: float):
    """The trajectories with their TD residuals under the critic ``values``."""
    b, h1 = trajs.obs.shape[:2]
    value = values(trajs.obs.reshape(b * h1, *trajs.obs.shape[2:])).reshape(b, h1)
    residual = td_residuals(value, trajs.reward, trajs.terminated, gamma)
    return dataclasses.replace(trajs, td_residual=residual.astype(np.float32))


def rates(trajs, normalizer: Normalizer, config: GateConfig) -> dict[str, float]:
    """Verdict rates after truncation: approved whole, truncated, rejected; and main causes."""
    first = judge(trajs, normalizer, config)
    final, kept = truncate(first, trajs, config)
    whole = float(np.mean(first.verdicts == Verdict.APPROVE))
    cut = float(np.mean(final.truncated))
    causes = [c for c, v in zip(first.cause, first.verdicts, strict=True) if v != Verdict.APPROVE]
    top = {c: causes.count(c) / len(first) for c in sorted(set(causes))}
    approved = final.verdicts == Verdict.APPROVE
    steps = float(np.sum(kept.lengths()[approved]) / (trajs.batch_size * trajs.horizon))
    return {"approved": whole, "truncated": cut, "rejected": 1.0 - whole - cut, "causes": top,
            "steps": steps}  # fmt: skip


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    episodes = collect_random_episodes("overcooked", args.episodes, args.max_steps, args.seed,
                                       layout=args.layout)  # fmt: skip
    k = args.episodes // 6
    train_eps, calib_eps, test_eps = episodes[: -2 * k], episodes[-2 * k : -k], episodes[-k:]
    other_eps = collect_random_episodes("overcooked", len(train_eps), args.max_steps,
                                        args.seed + 10_000, layout=args.other_layout)  # fmt: skip
    good = train_model(train_eps, args, "good")
    train_windows = windows_from_episodes(train_eps, MODEL["backbone"]["max_context"])
    action_bias, _ = with_action_reward_bias(
        good, {f: getattr(train_windows, f) for f in ("obs", "action", "reward", "terminated")},
        args.bias_action, args.action_bias,
    )  # fmt: skip
    models = {
        "good": good,
        "reward_bias": with_reward_bias(good, args.reward_bias),
        "corrupt_dynamics": with_corrupt_dynamics(good, args.corrupt_scale, args.seed),
        "other_layout": train_model(other_eps, args, "other_layout"),
        "action_bias": action_bias,
    }
    config = GateConfig()
    old = GateConfig(**{f"weight_{t}": 0.0 for t in MODEL_TERMS})
    no_reflector = GateConfig(weight_value_gap=0.0)
    normalizer = Normalizer.fit([e["obs"] for e in train_eps], config)
    calib = windows_from_episodes(calib_eps, args.horizon, stride=1)
    calib_windows = {f: getattr(calib, f) for f in ("obs", "action", "reward", "terminated")}
    fitted = calibrate_model_terms(normalizer, good, calib_windows, config)
    critic = fit_critic(train_eps, normalizer, args.gamma)
    scored = lambda trajs: with_critic(trajs, critic, args.gamma)  # noqa: E731
    fitted["value_gap"] = normalizer.calibrate_value_term(scored(calib).td_residual, config)
    test = windows_from_episodes(test_eps, args.horizon, stride=args.horizon)
    test_windows = {f: getattr(test, f) for f in ("obs", "action", "reward", "terminated")}
    rng = np.random.default_rng(args.seed)
    pick = rng.integers(0, len(test.obs), size=args.rollouts)
    start = test.obs[pick, rng.integers(0, args.horizon, size=args.rollouts)]  # [B, N, D]

    rows, term_rows = [], []
    for label, trajs in (
        ("real held-out (no model)", test),
        ("real held-out, good model's view", model_view(good, test_windows)),
    ):
        trajs = scored(trajs)
        rows.append([label, *_row(rates(trajs, normalizer, config)),
                     _approved(trajs, normalizer, no_reflector), "", ""])  # fmt: skip
    for name, model in models.items():
        trajs = scored(imagine(model, start, args))
        new, before = rates(trajs, normalizer, config), rates(trajs, normalizer, old)
        error = one_step_error(model, test_windows)
        rows.append([f"{name}: imagined", *_row(new), _approved(trajs, normalizer, no_reflector),
                     f"{before['approved']:.3f}", f"{error:.3f}"])  # fmt: skip
        term_rows.append([name, f"{1 - before['approved']:.3f}",
                          *(f"{caught:.3f}" for caught in _caught_per_term(trajs, normalizer))])  # fmt: skip
    headers = ["trajectories", "approved whole", "truncated", "rejected",
               "steps kept (of all imagined)", "main causes of "
               "non-approval (fraction of all)", "approved whole without the reflector's term",
               "old gate approved", "one-step obs error / copy's (real windows)"]  # fmt: skip
    note = (
        f"Overcooked {args.layout}, {args.episodes} random-policy episodes x {args.max_steps} "
        f"steps; horizon {args.horizon}; {args.rollouts} rollouts per model under random "
        f"actions from held-out real states; reward bias +{args.reward_bias} per step, "
        f"dynamics noise {args.corrupt_scale} x weight std, other layout {args.other_layout}, "
        f"+{args.action_bias} per agent step on action {args.bias_action}. "
        "Model-term quantiles fitted on the calibration episodes (reward terms in raw reward "
        "units: random play's real rewards never vary here, so the linear critic is 0 and the "
        "reflector's residual is the imagined reward itself): "
        + ", ".join(f"{k} {v:.3g}" for k, v in fitted.items())
        + f". Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
        "(a shared machine)."
    )
    per_term = markdown_table(
        ["imagined by", "real-data checks alone", *(f"+ {t} alone" for t in MODEL_TERMS)],
        term_rows,
    )
    body = (note + "\n\n" + markdown_table(headers, rows) + "\n\nRollouts not approved whole "
            "with one model term at a time:\n\n" + per_term)  # fmt: skip
    publish("gate_faults", "Coherence gate under fault injection", body, args.record)


def _caught_per_term(trajs, normalizer: Normalizer) -> list[float]:
    """Per model term (MODEL_TERMS order), the fraction of rollouts the gate with that term
    alone (and the real-data checks) does not approve whole."""
    out = []
    for term in MODEL_TERMS:
        alone = GateConfig(**{f"weight_{t}": float(t == term) for t in MODEL_TERMS})
        out.append(float(np.mean(judge(trajs, normalizer, alone).verdicts != Verdict.APPROVE)))
    return out


def _approved(trajs, normalizer: Normalizer, config: GateConfig) -> str:
    return f"{np.mean(judge(trajs, normalizer, config).verdicts == Verdict.APPROVE):.3f}"


def _row(r: dict) -> list[str]:
    causes = ", ".join(f"{c} {v:.2f}" for c, v in r["causes"].items()) or "-"
    cells = (r["approved"], r["truncated"], r["rejected"], r["steps"])
    return [*(f"{v:.3f}" for v in cells), causes]


if __name__ == "__main__":
    main(parse_args(Args, __doc__.splitlines()[0]))
