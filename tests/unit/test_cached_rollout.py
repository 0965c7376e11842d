"""CachedContextRollout: each imagined step encoded once, yet Serve's stateless answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moedream.envs.spec import EnvSpec
from moedream.world_model.cached_rollout import CachedContextRollout, supports_cached_context
from moedream.world_model.heads import member_std
from moedream.world_model.model import WorldModel
from tests.world_models import SERVED, TINY, served_config, tiny_config

SPEC = EnvSpec("fake", ("a0", "a1"), (6, 5), "discrete", (4, 3))
ROWS, CHUNK, HORIZON = 10, 4, 4  # three request chunks, the last one short


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fitted_model(config) -> WorldModel:
    """A random-weight model in eval mode, normalised on data whose first two features are 0/1
    (so the discrete head, where there is one, predicts them)."""
    torch.manual_seed(0)
    model = WorldModel(config, SPEC)
    rng = np.random.default_rng(1)
    n, d = SPEC.n_agents, SPEC.obs_dim
    obs = rng.normal(size=(16, 5, n, d)).astype(np.float32)
    obs[..., :2] = rng.random((16, 5, n, 2)) < 0.3
    model.fit_normalization({
        "obs": obs,
        "action": SPEC.encode_actions(rng.integers(0, 3, size=(16, 4, n))),
        "reward": rng.normal(size=(16, 4, n)).astype(np.float32),
        "terminated": np.zeros((16, 4, n), np.float32),
    })  # fmt: skip
    return model.eval()


def stateless_rollout(model: WorldModel, start, plan, seeds, prediction: str) -> list[dict]:
    """What Serve's one-step requests give: per step and chunk of CHUNK rows, model.imagine
    over the whole context so far with a generator seeded by that step's seed."""
    obs, steps = [start], []
    for t, seed in enumerate(seeds):
        chunks = []
        for i in range(0, ROWS, CHUNK):
            rows = slice(i, i + CHUNK)
            context = None
            if t:
                context = {"obs": np.stack(obs[:-1], 1)[rows], "action": plan[rows, :t]}
            traj = model.imagine(
                obs[-1][rows], plan[rows, t : t + 1], 1, context=context,
                generator=torch.Generator().manual_seed(seed), prediction=prediction,
            )  # fmt: skip
            chunks.append(traj)
        steps.append({
            key: np.concatenate([getattr(c, key) for c in chunks])
            for key in ("obs", "reward", "terminated", "uncertainty", "obs_std", "ensemble_obs")
        } | {"expert_load": chunks[0].expert_load})  # fmt: skip
        obs.append(steps[-1]["obs"][:, 1])
    return steps


def cached_rollout(model: WorldModel, start, plan, seeds, prediction: str) -> list[dict]:
    rollout = CachedContextRollout(model, start, chunk_rows=CHUNK, prediction=prediction)
    return [rollout.step(plan[:, t], seed) for t, seed in enumerate(seeds)]


def start_and_plan(seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    start = rng.normal(size=(ROWS, SPEC.n_agents, SPEC.obs_dim)).astype(np.float32)
    start[..., :2] = rng.random((ROWS, SPEC.n_agents, 2)) < 0.3
    plan = SPEC.encode_actions(rng.integers(0, 3, size=(ROWS, HORIZON, SPEC.n_agents)))
    return start, plan


CASES = {
    "capacity MoE, diffusion head": (served_config(), "sample"),
    "dropless MoE, discrete head, modality routing": (
        tiny_config(obs_head="discrete", backbone={**TINY["backbone"], "modality_routing": True}),
        "sample",
    ),
    "regressed mean": (served_config(), "mean"),
    "dense FFN": (served_config(moe={**SERVED["moe"], "backend": "dense"}), "sample"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cached_steps_equal_the_stateless_requests(case):
    config, prediction = CASES[case]
    model = fitted_model(config)
    start, plan = start_and_plan()
    seeds = [11, 12, 13, 14]
    expected = stateless_rollout(model, start, plan, seeds, prediction)
    got = cached_rollout(model, start, plan, seeds, prediction)
    for t, (want, have) in enumerate(zip(expected, got, strict=True)):
        for key, value in want.items():  # the backbone runs on all rows at once: rounding
            np.testing.assert_allclose(have[key], value, rtol=1e-4, atol=1e-5,
                                       err_msg=f"step {t} {key}")  # fmt: skip
    # the comparison can fail: another seed at the last step draws other observations
    other = cached_rollout(model, start, plan, [11, 12, 13, 99], prediction)
    if prediction == "sample":
        assert np.abs(other[-1]["obs"] - got[-1]["obs"]).max() > 1e-3


def test_encode_next_gives_the_last_step_of_a_whole_encode():
    model = fitted_model(served_config())
    rng = np.random.default_rng(3)
    obs = torch.as_tensor(rng.normal(size=(5, 3, SPEC.n_agents, SPEC.obs_dim)), dtype=torch.float)
    action = torch.as_tensor(SPEC.encode_actions(rng.integers(0, 3, size=(5, 3, 2))))
    with torch.no_grad():
        whole = model.backbone.encode(obs=obs, action=action)
        past = None
        for t in range(3):
            step, past = model.backbone.encode_next(obs=obs[:, t], action=action[:, t], past=past)
            torch.testing.assert_close(step.tokens[:, 0], whole.tokens[:, t])
    assert past[0][0].shape[2] == 3 * SPEC.n_agents  # keys of every token so far


def test_where_the_cache_cannot_give_the_same_answers():
    model = fitted_model(served_config())
    assert supports_cached_context(model, 8)
    assert not supports_cached_context(model, 9)  # past max_context the window slides
    capacity = fitted_model(served_config(moe={**SERVED["moe"], "eval_dropless": False}))
    assert not supports_cached_context(capacity, 4)  # a token's output depends on the batch
    with pytest.raises(ValueError, match="eval mode"):
        CachedContextRollout(model.train(), np.zeros((2, 2, 6), np.float32), chunk_rows=2)


def test_member_std_is_torch_std_over_members():
    values = torch.randn(4, 7, 3, dtype=torch.float64) * 5 + 2
    torch.testing.assert_close(member_std(values), values.std(0))
