"""World model: shapes, parameter counts, the block-causal mask, imagination, checkpoints,
the local trainer and the CLI. Tiny models on fake or short real data; no Ray."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from moedream.config import ConfigError
from moedream.envs.spec import EnvSpec
from moedream.world_model.backbone import block_causal_mask
from moedream.world_model.diffusion import SamplerConfig
from moedream.world_model.model import (
    CheckpointError,
    WorldModel,
    WorldModelConfig,
    WorldModelState,
)
from moedream.world_model.rssm import RSSMConfig, balanced_kl, latent_kl
from moedream.world_model.trajectory import Trajectories
from tests.world_models import tiny_config

SPEC = EnvSpec("fake", ("a0", "a1", "a2"), (5, 5, 4), "continuous", (2, 2, 2))
DISCRETE = EnvSpec("fake_discrete", ("a0", "a1"), (6, 6), "discrete", (4, 4))
B, T = 3, 4


def fake_batch(
    spec: EnvSpec = SPEC, b: int = B, t: int = T, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, d, a = spec.n_agents, spec.obs_dim, spec.action_dim
    obs = rng.normal(size=(b, t + 1, n, d)).astype(np.float32)
    for i, dim in enumerate(spec.obs_dims):
        obs[:, :, i, dim:] = 0.0  # padding, as EnvSpec.stack_obs writes it
    if spec.action_kind == "discrete":
        action = spec.encode_actions(rng.integers(0, a, size=(b, t, n)))
    else:
        action = rng.uniform(-1, 1, size=(b, t, n, a)).astype(np.float32)
    return {
        "obs": obs,
        "action": action,
        "reward": rng.normal(size=(b, t, n)).astype(np.float32),
        "terminated": (rng.random((b, t, n)) < 0.1).astype(np.float32),
    }


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, oversubscribed CPU
    two spinning OpenMP threads make each op ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model() -> WorldModel:
    torch.manual_seed(0)
    m = WorldModel(tiny_config(), SPEC)
    m.fit_normalization(fake_batch(b=8, seed=1))
    return m


# ------------------------------------------------------------------------------ shapes & loss


def test_loss_is_finite_with_namespaced_logs_and_reaches_every_trained_part(model):
    loss, logs = model.loss(fake_batch())
    assert loss.dim() == 0 and torch.isfinite(loss)
    for key in ("wm/diffusion", "wm/reward", "wm/termination", "wm/kl", "wm/mean", "wm/ensemble",
                "moe/balance", "moe/dropped", "moe/load_l0_e0", "moe/load_l1_e3", "wm/loss"):  # fmt: skip
        assert key in logs, key
    loads = np.array([[logs[f"moe/load_l{i}_e{j}"] for j in range(4)] for i in range(2)])
    np.testing.assert_allclose(loads.sum(1), 1.0, atol=1e-5)
    loss.backward()
    for name in ("backbone", "rssm", "cond_proj", "denoiser", "mean_head", "reward_head",
                 "termination_head", "ensemble"):  # fmt: skip
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name} got no gradient"


def test_param_counts_table():
    cfg = tiny_config()
    m = WorldModel(cfg, SPEC)
    counts = m.param_counts()
    assert counts["total"] == sum(p.numel() for p in m.parameters())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    d, n, obs_dim, act_dim, ctx = 16, 3, 5, 2, 6
    attention = (d * 3 * d + 3 * d) + (d * d + d)  # qkv + out projections
    norms = 2 * (2 * d)  # two LayerNorms per block
    embeddings = (obs_dim * d + d) + (act_dim * d + d) + n * d + ctx * d + 2 * d  # + final norm
    ff = sum(p.numel() for p in m.backbone.blocks[0].ff.parameters())
    assert counts["backbone"] == embeddings + 2 * (attention + norms + ff)
    # MoE: 4 experts of (d*h + h + h*d + d) plus the router (E x d)
    assert ff == 4 * (d * 16 + 16 + 16 * d + d) + 4 * d
    dense = WorldModel(
        tiny_config(moe={"d_hidden": 16, "num_experts": 4, "top_k": 2, "backend": "dense"}), SPEC
    )
    dense_ff = sum(p.numel() for p in dense.backbone.blocks[0].ff.parameters())
    assert dense_ff == d * 32 + 32 + 32 * d + d  # one MLP of top_k * d_hidden: same active width
    # K ensemble members of 3 layers, each independent
    k, i, h, o = 3, 24 + n * (obs_dim + act_dim), 16, n * obs_dim + n
    assert counts["ensemble"] == k * ((i * h + h) + (h * h + h) + (h * o + o))


def test_config_wiring_and_errors():
    cfg = tiny_config()
    assert cfg.moe.d_model == cfg.d_model == 16
    with pytest.raises(ConfigError, match="moe.d_model"):
        WorldModelConfig.from_dict({"d_model": 32, "moe": {"d_model": 16}})
    with pytest.raises(ConfigError, match="scheduler"):
        WorldModelConfig.from_dict(
            {"diffusion": {"objective": "flow"}, "sampler": {"scheduler": "ddim"}}
        )
    with pytest.raises(ConfigError, match="num_heads"):
        WorldModelConfig.from_dict({"d_model": 30, "backbone": {"num_heads": 4}})
    with pytest.raises(ConfigError, match="ensemble_size"):
        WorldModelConfig.from_dict({"heads": {"ensemble_size": 1}})


def test_bad_batch_shapes_name_the_expected_shapes(model):
    batch = fake_batch()
    batch["action"] = batch["action"][:, :-1]
    with pytest.raises(ValueError, match=r"one observation more than actions"):
        model.loss(batch)
    del batch["reward"]
    with pytest.raises(ValueError, match="reward"):
        model.loss(batch)


# ------------------------------------------------------------------------------ causal mask


def test_block_causal_mask_layout():
    mask = block_causal_mask(3, 2)
    expected = torch.tensor(
        [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0],
         [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool,
    )  # fmt: skip
    assert torch.equal(mask, expected)


def test_backbone_is_causal_in_time_and_mixes_agents_within_a_step(model):
    model.eval()
    batch = fake_batch()
    obs = torch.as_tensor(batch["obs"][:, :T])
    action = torch.as_tensor(batch["action"])
    features, _ = model.backbone(obs=obs, action=action)  # [B, T, N, d]
    future = obs.clone()
    future[:, 2] += 5.0  # change step 2 for every agent
    changed, _ = model.backbone(obs=future, action=action)
    torch.testing.assert_close(changed[:, :2], features[:, :2], rtol=0, atol=1e-6)
    assert (changed[:, 2:] - features[:, 2:]).abs().amax() > 1e-3
    one_agent = obs.clone()
    one_agent[:, 1, 2] += 5.0  # agent 2 at step 1
    mixed, _ = model.backbone(obs=one_agent, action=action)
    assert (mixed[:, 1, 0] - features[:, 1, 0]).abs().amax() > 1e-3, "agent 0 must see agent 2 at t"
    torch.testing.assert_close(mixed[:, 0], features[:, 0], rtol=0, atol=1e-6)


def test_backbone_rejects_context_longer_than_max_context(model):
    obs = torch.zeros(1, 7, 3, 5)
    with pytest.raises(ValueError, match="max_context"):
        model.backbone(obs=obs, action=torch.zeros(1, 7, 3, 2))


# ------------------------------------------------------------------------------ RSSM KL


@pytest.mark.parametrize("latent", ["gaussian", "categorical"])
def test_balanced_kl_is_zero_gradient_below_free_bits_and_matches_reference(latent):
    cfg = RSSMConfig(latent=latent, stoch=3, groups=2, classes=3, free_bits=1.0)
    torch.manual_seed(0)
    if latent == "gaussian":
        p = torch.cat([torch.randn(2, 5, 3), torch.rand(2, 5, 3) + 0.5], -1)
        q = torch.cat([torch.randn(2, 5, 3), torch.rand(2, 5, 3) + 0.5], -1)
        ref = torch.distributions.kl_divergence(
            torch.distributions.Normal(p[..., :3], p[..., 3:]),
            torch.distributions.Normal(q[..., :3], q[..., 3:]),
        ).sum(-1)
    else:
        p = torch.log_softmax(torch.randn(2, 5, 2, 3), -1)
        q = torch.log_softmax(torch.randn(2, 5, 2, 3), -1)
        ref = torch.distributions.kl_divergence(
            torch.distributions.Categorical(logits=p), torch.distributions.Categorical(logits=q)
        ).sum(-1)
    torch.testing.assert_close(latent_kl(p, q, cfg), ref)
    post = p.clone().requires_grad_()
    loss, logs = balanced_kl(post, p.clone(), cfg)  # KL 0 < free bits: constant, no gradient
    assert abs(float(loss.detach()) - (cfg.dyn_weight + cfg.rep_weight) * cfg.free_bits) < 1e-6
    loss.backward()
    assert post.grad.abs().sum() == 0
    assert logs["wm/kl"] == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------ imagination


def test_imagine_shapes_from_raw_obs_and_from_observed_context(model):
    batch = fake_batch()
    policy = lambda obs: torch.zeros(obs.shape[0], 3, 2)  # noqa: E731
    traj = model.imagine(batch["obs"][:, 0], policy, 5, generator=torch.Generator().manual_seed(0))
    assert isinstance(traj, Trajectories)
    assert traj.obs.shape == (B, 6, 3, 5) and traj.action.shape == (B, 5, 3, 2)
    assert traj.reward.shape == (B, 5, 3) and traj.terminated.shape == (B, 5, 3)
    assert traj.uncertainty.shape == (B, 5) and traj.obs_std.shape == (B, 5, 3, 5)
    assert traj.expert_load.shape == (2, 4)
    np.testing.assert_allclose(traj.expert_load.sum(1), 1.0, atol=1e-5)
    assert np.all((traj.terminated >= 0) & (traj.terminated <= 1))
    assert np.all(traj.uncertainty >= 0) and np.isfinite(traj.obs).all()
    assert np.all(traj.obs[:, :, 2, 4] == 0), "padding of the smaller agent stays zero"
    np.testing.assert_array_equal(traj.obs[:, 0], batch["obs"][:, 0])

    state = model.observe(batch["obs"], batch["action"])  # context longer than... 5 obs <= 6
    assert isinstance(state, WorldModelState) and state.obs.shape == (B, T + 1, 3, 5)
    traj = model.imagine(state, policy, 4)
    np.testing.assert_array_equal(traj.obs[:, 0], batch["obs"][:, -1])
    assert traj.obs.shape == (B, 5, 3, 5)
    # a context longer than max_context is cut to its last max_context steps
    long = fake_batch(t=9)
    state = model.observe(long["obs"], long["action"])
    assert state.obs.shape[1] == 6 and state.action.shape[1] == 5
    assert model.imagine(state, policy, 2).obs.shape == (B, 3, 3, 5)


def test_a_seeded_imagine_after_context_never_touches_the_global_rng(model):
    """Every draw of a seeded imagine/step, the context's posterior latents included, comes
    from its generator: the answer does not depend on what the process drew before (a Serve
    replica answers the same request alike whatever it served earlier)."""
    batch = fake_batch(t=5)
    policy = lambda obs: torch.zeros(obs.shape[0], 3, 2)  # noqa: E731
    start, context = batch["obs"][:, -1], {"obs": batch["obs"][:, :-1], "action": batch["action"]}

    def imagine_and_step() -> tuple[np.ndarray, np.ndarray]:
        traj = model.imagine(start, policy, 2, context=context,
                             generator=torch.Generator().manual_seed(7))  # fmt: skip
        out = model.step(start, np.zeros((B, 3, 2), np.float32),
                         generator=torch.Generator().manual_seed(7))  # fmt: skip
        return traj.obs, out["next_obs"]

    torch.manual_seed(1)
    global_state = torch.get_rng_state()
    first = imagine_and_step()
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.manual_seed(2)
    for a, b in zip(first, imagine_and_step(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_mean_prediction_is_the_mean_heads_not_a_diffusion_draw(model):
    """prediction "mean" (the diffusion ablation) moves with the mean head only: changing the
    denoiser or the sampling noise leaves it as it is, and it differs from the sample."""
    start, action = fake_batch()["obs"][:, 0], np.full((B, 3, 2), 0.5, np.float32)

    def next_obs(prediction: str, noise_scale: float = 1.0) -> np.ndarray:
        out = model.step(start, action, generator=torch.Generator().manual_seed(3),
                         noise_scale=noise_scale, prediction=prediction)  # fmt: skip
        return out["next_obs"]

    mean, sample = next_obs("mean"), next_obs("sample")
    assert not np.allclose(mean, sample)
    np.testing.assert_array_equal(next_obs("mean", noise_scale=0.3), mean)
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(0.1)
    np.testing.assert_array_equal(next_obs("mean"), mean)
    assert not np.allclose(next_obs("sample"), sample)
    with torch.no_grad():
        model.mean_head[-1].bias.add_(0.5)  # half a delta std more on every feature
    assert not np.allclose(next_obs("mean"), mean)
    with pytest.raises(ValueError, match=r"prediction = 'median' must be one of"):
        next_obs("median")


def test_imagined_observations_stay_inside_the_data_support():
    """Features real data never moves (a constant flag here) stay put, and every imagined
    feature stays within the fitted [min, max]; support_margin None turns the clamp off."""
    batch = fake_batch(b=8, seed=1)
    batch["obs"][..., 0, 1] = 0.25  # a feature that never changes in the data
    torch.manual_seed(0)
    clamped = WorldModel(tiny_config(), SPEC)
    clamped.fit_normalization(batch)
    policy = lambda obs: torch.zeros(obs.shape[0], 3, 2)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    traj = clamped.imagine(batch["obs"][:, 0], policy, 6, noise_scale=3.0, generator=gen)
    low, high = batch["obs"].min(axis=(0, 1)), batch["obs"].max(axis=(0, 1))
    assert np.all(traj.obs >= low - 1e-6) and np.all(traj.obs <= high + 1e-6)
    np.testing.assert_array_equal(traj.obs[:, :, 0, 1], 0.25)
    torch.manual_seed(0)
    free = WorldModel(tiny_config(support_margin=None), SPEC)
    free.fit_normalization(batch)
    gen = torch.Generator().manual_seed(0)
    traj = free.imagine(batch["obs"][:, 0], policy, 6, noise_scale=3.0, generator=gen)
    assert np.any(traj.obs[:, 1:, 0, 1] != 0.25), "untrained and unclamped, the flag drifts"


def test_constant_features_and_reward_free_data_keep_their_raw_scale():
    """A feature constant in the fitted data (a pot that never cooked under a random policy)
    and a collection without any reward get std 1, not the 1e-3 floor that made their first
    real value a 1000-sigma input or target."""
    batch = fake_batch(b=8, seed=1)
    batch["obs"][..., 0, 1] = 0.25
    batch["reward"][:] = 0.0
    m = WorldModel(tiny_config(), SPEC)
    m.fit_normalization(batch)
    assert float(m.obs_std[0, 1]) == 1.0 and float(m.obs_mean[0, 1]) == pytest.approx(0.25)
    torch.testing.assert_close(m.reward_std, torch.ones(3))
    moving = batch["obs"][..., 0, 0].std()
    assert float(m.obs_std[0, 0]) == pytest.approx(float(moving), rel=1e-4)


def test_refit_reward_normalization_keeps_raw_predictions_and_widen_support_grows_bounds():
    """PopArt: new reward statistics, the same rewards in raw units (exact for a team reward,
    the shared head's case); the support grows to cover new data and never shrinks."""
    batch = fake_batch(b=8, seed=2)
    batch["reward"][:] = batch["reward"][..., :1]  # one team reward
    torch.manual_seed(0)
    model = WorldModel(tiny_config(), SPEC)
    model.fit_normalization(batch)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    model.eval()
    before = model.predict_windows(batch, generator=gen())
    hidden = torch.randn(3, 5, 16)  # [K, M, ensemble_hidden] into the ensemble's last layer

    def ensemble_raw_rewards() -> torch.Tensor:
        with torch.no_grad():
            out = model.ensemble.layers[-1](hidden)[..., -3:]  # normalised rewards [K, M, N]
            return out * model.reward_std + model.reward_mean

    ensemble_before = ensemble_raw_rewards()
    wider = {**batch, "reward": (batch["reward"] * 25.0 + 7.0).astype(np.float32)}
    model.refit_reward_normalization(wider)
    flat = wider["reward"].reshape(-1, 3)
    np.testing.assert_allclose(model.reward_mean.numpy(), flat.mean(0), rtol=1e-4)
    np.testing.assert_allclose(model.reward_std.numpy(), flat.std(0), rtol=1e-4)
    after = model.predict_windows(batch, generator=gen())
    torch.testing.assert_close(
        torch.as_tensor(after["reward"]), torch.as_tensor(before["reward"]), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(ensemble_raw_rewards(), ensemble_before, rtol=1e-4, atol=1e-4)
    low, high = model.obs_low.clone(), model.obs_high.clone()
    far = {**batch, "obs": batch["obs"] * 10.0}
    model.widen_support(far)
    flat_obs = torch.as_tensor(far["obs"]).flatten(0, 1)
    assert torch.all(model.obs_low <= torch.minimum(low, flat_obs.amin(0)) + 1e-6)
    assert torch.all(model.obs_high >= torch.maximum(high, flat_obs.amax(0)) - 1e-6)
    assert torch.any(model.obs_high > high), "the wider data must widen the bounds"
    model.widen_support(batch)  # narrower data: the bounds stay
    assert torch.all(model.obs_high >= flat_obs.amax(0) - 1e-6)


def test_policy_callable_and_action_plan_give_the_same_rollout(model):
    start = fake_batch()["obs"][:, 0]
    plan = np.random.default_rng(3).uniform(-1, 1, size=(B, 4, 3, 2)).astype(np.float32)
    calls = []

    def policy(obs: torch.Tensor) -> np.ndarray:
        assert obs.shape == (B, 3, 5)
        calls.append(obs)
        return plan[:, len(calls) - 1]

    a = model.imagine(start, policy, 4, generator=torch.Generator().manual_seed(7))
    b = model.imagine(start, plan, 4, generator=torch.Generator().manual_seed(7))
    assert len(calls) == 4
    np.testing.assert_array_equal(a.action, plan)
    np.testing.assert_allclose(a.obs, b.obs, atol=1e-6)
    np.testing.assert_allclose(a.reward, b.reward, atol=1e-6)
    with pytest.raises(ValueError, match="action plan"):
        model.imagine(start, plan[:, :2], 4)
    with pytest.raises(ValueError, match="encoded actions"):
        model.imagine(start, lambda obs: torch.zeros(B, 3, 7), 2)


class RecordingMemory:
    """A ``memory`` argument: records what each step asks, samples with ``predict``."""

    def __init__(self, predict=None) -> None:
        self.predict, self.calls = predict, []

    def predict_fn(self, model, state, action, cond):
        self.calls.append((state.step.tolist(), tuple(action.shape), tuple(cond.shape)))
        return self.predict


def test_memory_argument_supplies_each_steps_predict_fn_and_the_state_counts_steps(model):
    batch = fake_batch()
    state = model.observe(batch["obs"], batch["action"])
    assert state.step.tolist() == [T] * B  # steps observed before the current observation
    plan = np.random.default_rng(3).uniform(-1, 1, size=(B, 3, 3, 2)).astype(np.float32)
    run = lambda memory: model.imagine(  # noqa: E731
        state, plan, 3, generator=torch.Generator().manual_seed(2), memory=memory
    )
    plain = run(None)
    # None from predict_fn, or the denoiser itself: the same rollout as without memory
    for memory in (RecordingMemory(), RecordingMemory(model.denoiser)):
        np.testing.assert_array_equal(run(memory).obs, plain.obs)
    assert memory.calls == [([T + k] * B, (B, 3, 2), (B, 24)) for k in range(3)]
    # another predict_fn changes the sample: a zero prediction of the flow velocity
    zero = RecordingMemory(lambda x_t, t, cond: torch.zeros_like(x_t))
    assert np.abs(run(zero).obs - plain.obs).max() > 1e-3
    out = model.step(batch["obs"][:, -1], plan[:, 0], state=state, memory=RecordingMemory())
    assert out["state"].step.tolist() == [T + 1] * B


def test_discrete_policies_may_return_indices_and_noise_scale_zero_is_deterministic():
    m = WorldModel(tiny_config(), DISCRETE)
    m.fit_normalization(fake_batch(DISCRETE, b=8))
    start = fake_batch(DISCRETE)["obs"][:, 0]
    idx = lambda obs: torch.full((obs.shape[0], 2), 3)  # noqa: E731
    a = m.imagine(start, idx, 3, noise_scale=0.0, sampler=SamplerConfig(num_steps=2))
    b = m.imagine(start, idx, 3, noise_scale=0.0, sampler=SamplerConfig(num_steps=2))
    assert a.action.shape == (B, 3, 2, 4) and np.all(a.action[..., 3] == 1)
    # the RSSM samples its latent; with a seeded generator both runs are equal
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = m.imagine(start, idx, 3, noise_scale=0.0, generator=g())
    b = m.imagine(start, idx, 3, noise_scale=0.0, generator=g())
    np.testing.assert_array_equal(a.obs, b.obs)


def test_step_returns_one_joint_transition_and_a_state_to_continue(model):
    batch = fake_batch()
    out = model.step(batch["obs"][:, 0], batch["action"][:, 0])
    assert out["next_obs"].shape == (B, 3, 5) and out["reward"].shape == (B, 3)
    assert out["uncertainty"].shape == (B,) and out["terminated"].shape == (B, 3)
    again = model.step(None, batch["action"][:, 1], state=out["state"])
    assert again["state"].obs.shape == (B, 3, 3, 5)
    assert model.training, "imagination must not leave the model in eval mode"


def test_ensemble_spread_grows_far_from_the_data(model):
    batch = fake_batch(b=8)
    near = model.predict_windows(batch)["uncertainty"].mean()
    far = dict(batch, obs=batch["obs"] * 20 + 10)
    assert model.predict_windows(far)["uncertainty"].mean() > 3 * near


# ------------------------------------------------------------------------------ checkpoints


def test_save_load_round_trip_gives_identical_outputs(model, tmp_path):
    path = model.save(tmp_path / "wm.safetensors")
    loaded = WorldModel.load(path, expected_config=tiny_config())
    assert loaded.spec == SPEC and loaded.config == model.config
    start = fake_batch()["obs"][:, 0]
    plan = np.zeros((B, 3, 3, 2), np.float32)
    a = model.imagine(start, plan, 3, generator=torch.Generator().manual_seed(1))
    b = loaded.imagine(start, plan, 3, generator=torch.Generator().manual_seed(1))
    for field in ("obs", "reward", "terminated", "uncertainty", "expert_load"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    # a directory path holds world_model.safetensors
    folder = tmp_path / "ckpt"
    folder.mkdir()
    model.save(folder)
    assert (folder / "world_model.safetensors").is_file()
    assert WorldModel.load(folder).param_counts() == model.param_counts()
    # the state-dict helpers round-trip through torch.save / torch.load(weights_only=True)
    torch.save(model.checkpoint_state(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    again = WorldModel.from_checkpoint_state(state)
    c = again.imagine(start, plan, 3, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(a.obs, c.obs)


def test_loading_bad_checkpoints_raises_clear_errors(model, tmp_path):
    path = model.save(tmp_path / "wm.safetensors")
    other = tiny_config(d_model=32)
    with pytest.raises(
        CheckpointError, match=r"wm\.safetensors.*different world-model config.*d_model"
    ):
        WorldModel.load(path, expected_config=other)

    raw = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors.*not a readable"):
        WorldModel.load(truncated)

    flipped = bytearray(raw)
    flipped[-100] ^= 0xFF  # inside the weights
    corrupted = tmp_path / "corrupted.safetensors"
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"corrupted\.safetensors.*sha256"):
        WorldModel.load(corrupted)

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.txt"):
        WorldModel.load(text)
    with pytest.raises(CheckpointError, match="does not exist"):
        WorldModel.load(tmp_path / "missing.safetensors")

    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a moedream world-model checkpoint"):
        WorldModel.load(foreign)


# ------------------------------------------------------------------------------ trainer + CLI


@pytest.fixture(scope="module")
def episode_dir(tmp_path_factory):
    from moedream.data import collect_episodes

    out = tmp_path_factory.mktemp("episodes")
    collect_episodes("mamujoco", {"max_episode_steps": 30}, 3, out / "shard0.parquet", seed=0)
    return out


def test_train_local_writes_tensorboard_checkpoints_and_metrics(episode_dir, tmp_path):
    from moedream.world_model.train_local import TrainConfig, load_trainer_state, train_local

    cfg = TrainConfig(steps=4, batch_size=4, window=4, eval_every=2, checkpoint_every=2, log_every=1,
                      holdout=0.34, precision="fp32")  # fmt: skip
    metrics = train_local(cfg, episode_dir, tmp_path, model_config=tiny_config(), progress=False)
    for key in ("wm/loss", "eval/obs_mse", "eval/copy_mse", "eval/reward_mse", "perf/tokens_per_s"):
        assert np.isfinite(metrics[key]), key
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "step_2" / "world_model.safetensors").is_file()
    assert load_trainer_state(tmp_path / "checkpoints" / "step_4")["step"] == 4
    assert json.loads((tmp_path / "metrics.json").read_text())["wm/loss"] == pytest.approx(
        metrics["wm/loss"]
    )
    model = WorldModel.load(tmp_path / "world_model.safetensors", expected_config=tiny_config())
    assert model.spec.env_name == "mamujoco" and bool(model.normalization_fitted)


def test_train_config_errors_name_the_field(episode_dir, tmp_path):
    from moedream.world_model.train_local import TrainConfig, train_local

    with pytest.raises(ConfigError, match="train.window"):
        train_local(TrainConfig(window=12), episode_dir, tmp_path, model_config=tiny_config())
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig.from_dict({"batch_size": 0})


def test_cli_train_world_model_local(episode_dir, tmp_path):
    import yaml

    from moedream.platform.cli import main

    config = tmp_path / "wm.yaml"
    config.write_text(yaml.safe_dump({
        "model": tiny_config().to_dict() | {"moe": {k: v for k, v in tiny_config().moe.to_dict().items() if k != "d_model"}},
        "train": {"batch_size": 4, "window": 4, "eval_every": 1, "log_every": 1, "holdout": 0.34},
    }))  # fmt: skip
    out = tmp_path / "out"
    code = main(["train-world-model", "--config", str(config), "--data", str(episode_dir),
                 "--out", str(out), "--local", "--steps", "2", "--no-progress"])  # fmt: skip
    assert code == 0
    assert (out / "world_model.safetensors").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"d_modle": 8}}))
    with pytest.raises(SystemExit, match="d_modle"):
        main(
            [
                "train-world-model",
                "--config",
                str(bad),
                "--data",
                str(episode_dir),
                "--out",
                str(out),
                "--local",
            ]
        )


def test_training_on_windows_shorter_than_the_context_warns_with_the_fix():
    from moedream.world_model.train_local import warn_untrained_context

    with pytest.warns(UserWarning, match=r"set backbone.max_context = 8"):
        warn_untrained_context(max_context=16, window=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_untrained_context(max_context=8, window=8)  # matched: silent
