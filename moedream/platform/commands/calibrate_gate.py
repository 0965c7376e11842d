"""``moedream calibrate-gate``: fit the coherence gate's normalizer (φ) on real episodes and report
the approval rate on held-out real trajectories.

    moedream calibrate-gate --env overcooked --episodes 20 --out runs/gate/overcooked.json
    moedream calibrate-gate --env mamujoco --data runs/episodes/mamujoco --out gate.json
    moedream calibrate-gate --data runs/quickstart/data --checkpoint MODEL.safetensors --out gate.json

With ``--checkpoint`` the model terms (accuracy, rewards, disagreement: kernel.py's docstring)
are calibrated too, on that world model's view of the held-out windows.

Episodes are split by episode (not by step) into fit and held-out sets, so held-out windows
were never seen while fitting. No Ray is needed: the kernel is plain numpy.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from moedream.config import ConfigError

HELP = "fit the coherence gate on episode data and report its approval rate"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", default="overcooked", help="env name (overcooked, mamujoco)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="episode shards (folder or file) from `moedream collect`")
    source.add_argument(
        "--episodes", type=int, help="collect this many random-policy episodes in-process"
    )
    parser.add_argument("--out", required=True, help="where to write the normalizer JSON")
    parser.add_argument("--holdout", type=float, default=0.2, help="fraction of held-out episodes")
    parser.add_argument("--horizon", type=int, default=15, help="judged window length H")
    parser.add_argument("--max-steps", type=int, default=200, help="steps per collected episode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", help="YAML file whose `gate` section is a GateConfig")
    parser.add_argument(
        "--checkpoint", help="world model (.safetensors) whose model terms to calibrate"
    )


def run(args: argparse.Namespace) -> int:
    from moedream.coherence.kernel import GateConfig, Normalizer, judge

    config = GateConfig.from_yaml(args.config, section="gate") if args.config else GateConfig()
    if not 0.0 < args.holdout < 1.0:
        raise ConfigError(f"--holdout {args.holdout} must be in (0, 1), e.g. 0.2")
    start = time.perf_counter()
    if args.data:
        fit_obs, held = load_real_windows(
            args.data, args.horizon, args.holdout, args.seed, args.env
        )
    else:
        episodes = collect_random_episodes(args.env, args.episodes, args.max_steps, args.seed)
        fit_eps, held_eps = split_episodes(episodes, args.holdout)
        fit_obs = [e["obs"] for e in fit_eps]
        held = windows_from_episodes(held_eps, args.horizon)
    normalizer = Normalizer.fit(fit_obs, config)
    result = judge(held, normalizer, config)
    if args.checkpoint:
        _calibrate_model_terms(normalizer, args.checkpoint, held, config)
    normalizer.save(args.out)
    counts = result.counts()
    rate = counts["APPROVE"] / max(len(result), 1)
    print(
        f"env {args.env}: fitted on {normalizer.n_steps} real steps in {time.perf_counter() - start:.1f}s"
    )
    print(f"  drift quantiles: {normalizer.quantiles}")
    print(
        f"  stall: floor {normalizer.stall_floor:.4g}, real stall rate {normalizer.stall_rate:.3f}, "
        f"max stall run {normalizer.max_stall_run}"
    )
    print(f"  held-out windows (H={args.horizon}): {len(result)}, verdicts {counts}")
    print(f"  approval rate on held-out real trajectories: {rate:.3f}")
    print(f"  normalizer written to {args.out}")
    if rate < 0.95:
        print("  WARNING: below 0.95; collect more episodes or check the data")
    return 0


def _calibrate_model_terms(normalizer: Any, checkpoint: str, held: Any, config: Any) -> None:
    from pathlib import Path

    from moedream.coherence.kernel import judge
    from moedream.coherence.model_calibration import calibrate_model_terms, model_view
    from moedream.world_model.model import WorldModel

    if not Path(checkpoint).is_file():
        raise ConfigError(f"--checkpoint {checkpoint!r} is not a file; pass a world model's "
                          ".safetensors (e.g. the quickstart's printed checkpoint)")  # fmt: skip
    model = WorldModel.load(checkpoint, map_location="cpu")
    if held.horizon > model.config.backbone.max_context:
        raise ConfigError(
            f"--horizon {held.horizon} exceeds the model's context "
            f"({model.config.backbone.max_context}); pass --horizon <= it with --checkpoint"
        )
    windows = {k: getattr(held, k) for k in ("obs", "action", "reward", "terminated")}
    fitted = calibrate_model_terms(normalizer, model, windows, config)
    seen = judge(model_view(model, windows), normalizer, config).counts()
    print(f"  model terms calibrated on {len(held.obs)} held-out windows: "
          + ", ".join(f"{k} {v:.3g}" for k, v in fitted.items()))  # fmt: skip
    print(f"  held-out windows through the model's outputs: verdicts {seen}")


def load_real_windows(
    path: str, horizon: int, holdout: float = 0.2, seed: int = 0, env_name: str | None = None
) -> tuple[list[np.ndarray], Any]:
    """Real data from episode shards (``moedream collect``), split by episode.

    Returns (fit_sequences, held_out): the observations [T_i+1, N, D] of the fitting episodes
    (whole episodes, so step changes never cross a window edge) and a Trajectories batch of
    non-overlapping held-out windows of ``horizon`` steps from the other episodes.
    """
    from moedream.data import episode_windows, read_episodes
    from moedream.world_model.trajectory import Trajectories

    spec, episodes = read_episodes(path)
    if env_name is not None and spec.env_name != env_name:
        raise ConfigError(f"--data {path!r} holds {spec.env_name} episodes, not --env {env_name}")
    order = np.random.default_rng(seed).permutation(len(episodes))
    n_held = min(max(1, round(holdout * len(episodes))), len(episodes) - 1)
    if len(episodes) < 2:
        raise ConfigError(f"--data {path!r} holds {len(episodes)} episode(s); need >= 2")
    held = [episodes[i] for i in order[:n_held]]
    fit = [episodes[i].obs for i in order[n_held:]]
    parts = [w for w in (episode_windows(e, spec, horizon) for e in held) if w]
    if not parts:
        raise ConfigError(f"no held-out episode is longer than --horizon {horizon}")
    windows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return fit, Trajectories(**windows)


# ---------------------------------------------------------------------------------------------
# real trajectories without the data loader: random-policy rollouts of the real envs


def collect_random_episodes(
    env_name: str, n_episodes: int, max_steps: int, seed: int = 0, **env_options: Any
) -> list[dict[str, np.ndarray]]:
    """Roll out the real env with uniformly random actions. Each episode is a dict in the
    training-window layout without the batch axis: obs [T+1, N, D], action [T, N, A] (encoded),
    reward [T, N], terminated [T, N]."""
    from tqdm import tqdm

    # numpy-2 aliases before overcooked_ai_py loads (envs/overcooked.py imports them too late).
    from moedream.envs import (
        _compat,  # noqa: F401
        env_spec,
        make_env,
    )

    if n_episodes < 1 or max_steps < 1:
        raise ConfigError(f"need >= 1 episode and step, got {n_episodes} episodes x {max_steps}")
    spec = env_spec(env_name, **env_options)
    env = make_env(env_name, **env_options)
    episodes = [
        _random_episode(env, spec, max_steps, seed + i)
        for i in tqdm(range(n_episodes), desc=f"collect {env_name}", leave=False)
    ]
    env.close()
    return episodes


def _random_episode(env: Any, spec: Any, max_steps: int, seed: int) -> dict[str, np.ndarray]:
    obs, _ = env.reset(seed=seed)
    for i, agent in enumerate(spec.agent_ids):
        env.action_space(agent).seed(seed * 1000 + i)
    frames, actions, rewards, terms = [spec.stack_obs(obs)], [], [], []
    for _ in range(max_steps):
        act = {a: env.action_space(a).sample() for a in spec.agent_ids}
        obs, rew, term, trunc, _ = env.step(act)
        frames.append(spec.stack_obs(obs))
        actions.append(spec.encode_actions(spec.stack_actions(act)))
        rewards.append([float(rew[a]) for a in spec.agent_ids])
        terms.append([float(term[a]) for a in spec.agent_ids])
        if any(term.values()) or any(trunc.values()):
            break
    return {
        "obs": np.stack(frames).astype(np.float32),  # [T+1, N, D]
        "action": np.stack(actions).astype(np.float32),  # [T, N, A]
        "reward": np.asarray(rewards, dtype=np.float32),  # [T, N]
        "terminated": np.asarray(terms, dtype=np.float32),  # [T, N]
    }


def split_episodes(episodes: list[dict], holdout: float) -> tuple[list[dict], list[dict]]:
    """(fit, held-out) by episode; at least one episode in each."""
    if len(episodes) < 2:
        raise ConfigError(f"need >= 2 episodes to hold some out, got {len(episodes)}")
    n_held = min(max(1, round(holdout * len(episodes))), len(episodes) - 1)
    return episodes[:-n_held], episodes[-n_held:]


def windows_from_episodes(episodes: list[dict], horizon: int, stride: int | None = None):
    """Cut episodes into Trajectories windows of ``horizon`` steps (non-overlapping by default)."""
    from moedream.world_model.trajectory import Trajectories

    stride = stride or horizon
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "action", "reward", "terminated")}
    for ep in episodes:
        steps = ep["action"].shape[0]
        for s in range(0, steps - horizon + 1, stride):
            rows["obs"].append(ep["obs"][s : s + horizon + 1])
            for key in ("action", "reward", "terminated"):
                rows[key].append(ep[key][s : s + horizon])
    if not rows["obs"]:
        raise ConfigError(f"no episode is longer than horizon {horizon}; use a shorter --horizon")
    return Trajectories(**{k: np.stack(v) for k, v in rows.items()})
