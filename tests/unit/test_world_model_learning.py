"""The world model learns the dynamics of both envs (short training on random-policy episodes,
evaluated on held-out episodes):

- one-step next-observation error at least 50% below the copy baseline (o_{t+1} = o_t), for
  the diffusion head's sample and for its regressed mean,
- reward error below the mean predictor's,
- ensemble spread larger on out-of-distribution observations than on held-out ones.

Small models (d_model 64, 2 layers, 4 experts); budgets sized for a busy 2-core CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moedream.envs._compat  # noqa: F401  (numpy aliases before overcooked_ai_py is imported)
from moedream.data import episode_windows, rollout_episode
from moedream.envs import env_spec, make_env
from moedream.world_model.model import WorldModel, WorldModelConfig
from moedream.world_model.train_local import TrainConfig, evaluate, fit

WINDOW = 8
CASES = {
    # Shaped reward so that a random policy sees non-zero rewards (onions into pots, dishes).
    # (env options, training steps, training episodes)
    "overcooked": (
        {"layout": "cramped_room", "horizon": 200, "shaped_reward_weight": 1.0},
        700,  # enough for the diffusion SAMPLE to clear the copy bar with a margin
        30,
    ),
    "mamujoco": (
        {"scenario": "HalfCheetah", "agent_conf": "2x3", "max_episode_steps": 200},
        120,
        20,
    ),
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small models; avoids OpenMP spinning on a shared CPU
    yield
    torch.set_num_threads(before)


def random_windows(name: str, options: dict, seeds: range) -> tuple:
    """Training windows from random-policy episodes of the real env (seeded, reproducible)."""
    env, spec = make_env(name, **options), env_spec(name, **options)
    parts = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        if spec.action_kind == "discrete":
            policy = lambda obs: {a: int(rng.integers(spec.action_dims[0])) for a in obs}  # noqa: E731
        else:
            policy = lambda obs: {
                a: rng.uniform(-1, 1, spec.action_dims[0]).astype(np.float32) for a in obs
            }  # noqa: E731
        episode = rollout_episode(env, spec, seed, f"{name}-{seed}", policy)
        parts.append(episode_windows(episode, spec, WINDOW, stride=2))
    env.close()
    return spec, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def small_config() -> WorldModelConfig:
    return WorldModelConfig.from_dict(
        {
            "d_model": 64,
            "cond_dim": 128,
            "backbone": {"num_layers": 2, "num_heads": 4, "max_context": WINDOW},
            "moe": {"d_hidden": 128, "num_experts": 4, "top_k": 2},
            "diffusion": {"hidden": 128, "layers": 2},
            "heads": {"hidden": 128, "ensemble_size": 4, "ensemble_hidden": 64},
        }
    )


@pytest.mark.parametrize("name", [pytest.param("overcooked", marks=pytest.mark.slow), "mamujoco"])
def test_world_model_learns_env_dynamics(name):
    options, steps, episodes = CASES[name]
    spec, train = random_windows(name, options, range(episodes))
    _, held_out = random_windows(name, options, range(1000, 1005))
    torch.manual_seed(0)
    model = WorldModel(small_config(), spec)
    cfg = TrainConfig(steps=steps, batch_size=32, window=WINDOW, lr=2e-3, warmup=20, eval_every=10**6,
                      log_every=10**6, checkpoint_every=10**6, precision="fp32")  # fmt: skip
    logs = fit(model, train, cfg, progress=False)
    assert np.isfinite(logs["wm/loss"])

    metrics = evaluate(model, held_out, generator=torch.Generator().manual_seed(0))
    report = {k: round(v, 5) for k, v in metrics.items()}
    # both the diffusion head's SAMPLE and its regressed mean beat copying by 50%
    assert metrics["eval/obs_sample_mse"] <= 0.5 * metrics["eval/copy_mse"], report
    assert metrics["eval/obs_mse"] <= 0.5 * metrics["eval/copy_mse"], report
    assert metrics["eval/reward_mse"] < metrics["eval/reward_mean_mse"], report

    far = dict(held_out, obs=held_out["obs"] * 4.0 + 3.0 * model.obs_std.numpy())
    far_spread = evaluate(model, far)["eval/uncertainty"]
    assert far_spread > 2.0 * metrics["eval/uncertainty"], (far_spread, report)
