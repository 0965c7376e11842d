"""Long imagined rollouts of a world model with memory experts against real episodes.

Shared by ``tests/unit/test_memory_overcooked.py``, ``benchmarks/memory_overcooked.py`` and
``benchmarks/memory_experts.py``.
Protocol per held-out episode: the first ``prefix`` steps are real and observed (they fill the
spatial memory and finetune the episode's LoRA adapter); from o_prefix the model imagines
``horizon`` steps replaying the episode's REAL actions, with a backbone context of only
``max_context`` steps. Metrics against the real observations o_{prefix+1 ..}:

- horizon error: mean squared error of each imagined joint observation, per step ahead [H];
- recall error: the same, restricted to (step, agent) where the agent really stands on a cell
  it (or the other agent) stood on during the observed prefix, and not during the last
  ``max_context`` real steps (what the short context cannot hold);
- standardised error: each feature's squared error divided by its variance (raw MSE is
  dominated by a few wide features, e.g. a pot's cook time counting 20 .. 0);
- spread: the variance between the samples of one episode, standardised the same way (how
  diverse the imagined futures are; a composition that collapses modes lowers it).
Ablations are paired (same sampling noise, see ``evaluate_rollouts``): compare them per
episode with ``paired_difference``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

import moedream.envs._compat  # noqa: F401  (numpy aliases before overcooked_ai_py is imported)
from moedream.data import Episode, episode_windows, rollout_episode
from moedream.envs import env_spec, make_env
from moedream.envs.spec import EnvSpec
from moedream.world_model.memory import MemoryExperts
from moedream.world_model.model import WorldModelConfig


def small_world_model(context: int, diffusion_hidden: int = 128) -> WorldModelConfig:
    """The small WorldModel the memory benchmarks and tests train: d_model 64, 2 layers,
    4 experts, a ``context``-step backbone (the short-term expert's memory)."""
    return WorldModelConfig.from_dict(
        {
            "d_model": 64,
            "cond_dim": 128,
            "backbone": {"num_layers": 2, "num_heads": 4, "max_context": context},
            "moe": {"d_hidden": 128, "num_experts": 4, "top_k": 2},
            "diffusion": {"hidden": diffusion_hidden, "layers": 2},
            "heads": {"hidden": 128, "ensemble_size": 2, "ensemble_hidden": 32},
        }
    )


def random_episodes(
    env_name: str, options: dict, seeds: range | list[int]
) -> tuple[EnvSpec, list[Episode]]:
    """Random-policy episodes of a real env, one per seed (reproducible)."""
    env, spec = make_env(env_name, **options), env_spec(env_name, **options)
    episodes = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        policy = lambda obs, rng=rng: {a: int(rng.integers(spec.action_dims[0])) for a in obs}  # noqa: E731
        episodes.append(rollout_episode(env, spec, seed, f"{env_name}-{seed}", policy))
    env.close()
    return spec, episodes


def training_windows(episodes: list[Episode], spec: EnvSpec, window: int) -> dict[str, np.ndarray]:
    parts = [episode_windows(e, spec, window, stride=1) for e in episodes]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def revisits(positions: np.ndarray, prefix: int, horizon: int, context: int) -> np.ndarray:
    """[H, N] bool: at step prefix + h + 1 the agent stands on a cell occupied during
    o_0..o_prefix, but not during the ``context`` real steps before it."""
    seen = positions[: prefix + 1].reshape(-1, positions.shape[-1])  # [(P+1)*N, P]
    out = np.zeros((horizon, positions.shape[1]), dtype=bool)
    for h in range(horizon):
        j = prefix + h + 1
        recent = positions[max(0, j - context) : j].reshape(-1, positions.shape[-1])
        for agent in range(positions.shape[1]):
            here = positions[j, agent]
            in_prefix = np.all(seen == here, axis=-1).any()
            in_context = np.all(recent == here, axis=-1).any()
            out[h, agent] = in_prefix and not in_context
    return out


@dataclasses.dataclass
class RolloutResult:
    horizon_mse: np.ndarray  # [H] mean over episodes and samples
    recall_mse: float
    n_recall: int
    seconds: float
    episode_mse: np.ndarray  # [E] mean over steps, agents, features and samples
    episode_std_mse: np.ndarray  # [E] the same, each feature divided by its variance
    episode_recall_sq: np.ndarray  # [E] summed squared error on revisits (per (step, agent))
    episode_recall_n: np.ndarray  # [E] revisits per episode
    episode_spread: np.ndarray  # [E] standardised variance between samples (0 with one)

    @property
    def long_horizon_mse(self) -> float:
        return float(self.horizon_mse.mean())

    @property
    def standardized_mse(self) -> float:
        return float(self.episode_std_mse.mean())


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
    """Per-episode a - b -> (mean, its standard error, episodes where a < b)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se, int((d < 0).sum())


@torch.no_grad()
def evaluate_rollouts(
    memory: MemoryExperts,
    episodes: list[Episode],
    *,
    prefix: int,
    horizon: int,
    samples: int = 2,
    seed: int = 0,
    remember: bool = True,
    feature_var: np.ndarray | None = None,
) -> RolloutResult:
    """Imagine ``horizon`` steps after ``prefix`` real ones of each episode with the world
    model of ``memory`` and the experts enabled in ``memory.cfg`` (``samples`` draws per
    episode, batched). With ``remember`` each episode's memory is (re)built first; else it
    must be stored already under the id ``episode.episode_id``.

    Paired across ablations: the memories are built with their own random streams, and the
    imagination (RSSM latents, diffusion noise) always starts from the same seeded streams, so
    two expert configurations see the same sampling noise and their per-episode errors can be
    compared pairwise. ``feature_var`` [N, D] (default: the model's obs_std^2) divides each
    feature's squared error in ``episode_std_mse`` (floored at 0.01: near-constant features)."""
    import time

    model = memory.model
    spec, device = model.spec, model.obs_mean.device
    if remember and len(episodes) > memory.cfg.max_adapters:
        raise ValueError(
            f"evaluate_rollouts: {len(episodes)} episodes but memory.max_adapters = "
            f"{memory.cfg.max_adapters}: the first memories would be evicted"
        )
    obs = torch.as_tensor(np.stack([e.obs[: prefix + 1] for e in episodes]), device=device)
    act = spec.encode_actions(np.stack([e.action for e in episodes]))  # [E, L, N, A]
    act = torch.as_tensor(act, dtype=torch.float32, device=device)
    if remember:
        build = torch.Generator(device=device).manual_seed(seed + 1)
        for i, e in enumerate(episodes):
            memory.forget(e.episode_id)
            with torch.random.fork_rng(devices=[]):  # LoRA init draws from the global RNG
                torch.manual_seed(seed + 1 + i)
                memory.remember(e.episode_id, obs[i], act[i, :prefix], generator=build)
    recall = memory.recall([e.episode_id for e in episodes for _ in range(samples)])
    rep = lambda x: x.repeat_interleave(samples, 0)  # noqa: E731
    gen = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # observe samples z from the global RNG
        torch.manual_seed(seed)
        state = model.observe(rep(obs), rep(act[:, :prefix]))
    plan = rep(act[:, prefix : prefix + horizon])  # [B, H, N, A]
    traj = model.imagine(state, plan, horizon, generator=gen, memory=recall)
    seconds = time.perf_counter() - start
    imagined = traj.obs[:, 1:].reshape(len(episodes), samples, horizon, *traj.obs.shape[2:])
    real = np.stack([e.obs[prefix + 1 : prefix + 1 + horizon] for e in episodes])  # [E,H,N,D]
    sq_feat = ((imagined - real[:, None]) ** 2).mean(axis=1)  # [E, H, N, D]
    if feature_var is None:
        feature_var = (model.obs_std**2).cpu().numpy()
    std_sq = sq_feat / np.maximum(feature_var, 0.01)  # [E, H, N, D]
    spread = imagined.var(axis=1) / np.maximum(feature_var, 0.01)  # [E, H, N, D]
    sq = sq_feat.mean(-1)  # [E, H, N]
    context = model.config.backbone.max_context
    positions = [memory.positions(torch.as_tensor(e.obs)).cpu().numpy() for e in episodes]
    masks = [revisits(p, prefix, horizon, context) for p in positions]
    mask = np.stack(masks)  # [E, H, N]
    return RolloutResult(
        horizon_mse=sq.mean(axis=(0, 2)),
        recall_mse=float(sq[mask].mean()) if mask.any() else float("nan"),
        n_recall=int(mask.sum()),
        seconds=seconds,
        episode_mse=sq.mean(axis=(1, 2)),
        episode_std_mse=std_sq.mean(axis=(1, 2, 3)),
        episode_recall_sq=(sq * mask).sum(axis=(1, 2)),
        episode_recall_n=mask.sum(axis=(1, 2)),
        episode_spread=spread.mean(axis=(1, 2, 3)),
    )


def seconds_per_step(model, memory, obs: torch.Tensor, act: torch.Tensor, steps: int) -> float:
    """Seconds per imagined step (batch 1) after observing obs [L+1, N, D] and encoded actions
    [L, N, A], with ``memory`` (a Recall or None); best of 3 (on a shared machine noise only
    adds time)."""
    import time

    state = model.observe(obs[None], act[None])
    plan = act[-1].expand(1, steps, *act.shape[1:])
    model.imagine(state, plan[:, :1], 1, memory=memory)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        model.imagine(state, plan, steps, memory=memory)
        best = min(best, (time.perf_counter() - start) / steps)
    return best
