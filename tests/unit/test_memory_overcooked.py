"""Memory experts wired into the real WorldModel (MemoryWorldModel), and long Overcooked rollouts.

- Wiring (tiny untrained model): with only the short-term expert, or with memories that add
  nothing yet (fresh LoRA adapter, zero-initialised spatial adapter), imagination is exactly
  the plain WorldModel's; the composition equals the PoCE formula on the experts' outputs;
  test-time LoRA lowers the denoiser's loss on its episode and leaves the base unchanged.
- Long rollouts beyond the short context (issue 8's acceptance line): a small world model
  trained on random-policy cramped_room episodes imagines 40 steps past a 48-step real prefix
  of held-out episodes with their real actions; with all experts the long-horizon error and
  the recall error on revisited cells must be lower than with the short-term expert alone,
  measured in the same test with the same sampling noise. Full ablation:
  benchmarks/memory_overcooked.py and its block in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moedream.config import ConfigError
from moedream.world_model.memory.long_rollout import (
    evaluate_rollouts,
    random_episodes,
    revisits,
    training_windows,
)
from moedream.world_model.memory.world_model_memory import (
    MemoryState,
    MemoryWorldModel,
    WorldModelMemoryConfig,
    with_memory,
)
from moedream.world_model.model import WorldModel, WorldModelConfig
from moedream.world_model.train_local import TrainConfig, fit

CONTEXT = 4
ENV = {"layout": "cramped_room", "horizon": 100}
PREFIX, HORIZON = 48, 40
N_HELD_OUT = 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared CPU
    yield
    torch.set_num_threads(before)


def small_config(hidden: int = 128) -> WorldModelConfig:
    return WorldModelConfig.from_dict(
        {
            "d_model": 64,
            "cond_dim": 128,
            "backbone": {"num_layers": 2, "num_heads": 4, "max_context": CONTEXT},
            "moe": {"d_hidden": 128, "num_experts": 4, "top_k": 2},
            "diffusion": {"hidden": hidden, "layers": 2},
            "heads": {"hidden": 128, "ensemble_size": 2, "ensemble_hidden": 32},
        }
    )


@pytest.fixture(scope="module")
def data():
    spec, episodes = random_episodes("overcooked", ENV, range(20 + N_HELD_OUT))
    return spec, episodes[:20], episodes[20:]


def encoded(spec, episode):
    return torch.as_tensor(episode.obs), torch.as_tensor(spec.encode_actions(episode.action))


# ----- wiring ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(data):
    spec, train, _ = data
    torch.manual_seed(0)
    base = WorldModel(small_config(hidden=32), spec)
    base.fit_normalization(training_windows(train[:3], spec, CONTEXT))
    return base


def imagine_both(base, memory_model, episode, spec, ids, *, remember=True):
    obs, act = encoded(spec, episode)
    torch.manual_seed(5)  # observe samples the RSSM's z from the global generator
    state = memory_model.observe_episodes(ids, obs[None, :21], act[None, :20], remember=remember)
    assert isinstance(state, MemoryState) and state.episode_ids == tuple(ids)
    plan = act[None, 20:30]
    got = memory_model.imagine(state, plan, 10, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    want = base.imagine(
        base.observe(obs[None, :21], act[None, :20]), plan, 10,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    return got, want


def test_short_term_alone_and_empty_memories_reproduce_the_world_model(tiny, data):
    spec, train, _ = data
    cfg = WorldModelMemoryConfig(lora_steps=2)
    short = with_memory(tiny, cfg.only("short"))
    got, want = imagine_both(tiny, short, train[0], spec, ["a"])
    assert isinstance(short, MemoryWorldModel) and got.obs.shape == (1, 11, 2, 96)
    np.testing.assert_allclose(got.obs, want.obs, rtol=0, atol=1e-6)
    # every expert on, memories stored but adding nothing yet (no LoRA finetuning: base
    # weights; spatial adapter zero-initialised): both contrasts vanish
    every = with_memory(tiny, cfg)
    obs, act = encoded(spec, train[0])
    every.remember("a", obs[:21], act[:20], finetune=False)
    assert len(every.spatial_stores["a"]) == 21 * 2
    got, want = imagine_both(tiny, every, train[0], spec, ["a"], remember=False)
    np.testing.assert_allclose(got.obs, want.obs, rtol=0, atol=1e-5)


def test_composition_is_the_poce_formula_on_the_experts(tiny, data):
    spec, train, _ = data
    cfg = WorldModelMemoryConfig(
        lora_steps=5, lora_validation=0.0, alpha_long=0.5, alpha_spatial=1.5, spatial_mode="adapter"
    )
    model = with_memory(tiny, cfg)
    torch.nn.init.normal_(model.spatial_adapter.out.weight, std=0.1)  # a non-zero offset
    obs, act = encoded(spec, train[1])
    model.remember("e", obs[:30], act[:29], generator=torch.Generator().manual_seed(0))
    entries = model._retrievals(obs[None, 29], ["e"], torch.tensor([29]))  # [1, N, k, S]
    assert entries[..., -1].sum() > 0  # cells of the prefix were retrieved
    x_t, t, cond = torch.randn(1, model.denoiser.x_dim), torch.tensor([500.0]), torch.randn(1, 128)
    with torch.no_grad():
        offset = model.spatial_adapter(entries, cond)
        experts = model.expert_predictions(x_t, t, cond, ["e"], offset)
        composed = model.compose(experts)
        f = model.denoiser(x_t, t, cond)
        lora = model.store.predict(x_t, t, cond, ["e"])
        spatial = model.denoiser(x_t, t, cond + offset)
    assert list(experts) == ["short", "long", "spatial"]
    assert offset.abs().sum() > 0 and (lora - f).abs().max() > 0  # both memories act
    torch.testing.assert_close(composed, f + 0.5 * (lora - f) + 1.5 * (spatial - f))
    # alpha_short != 1 needs a denoiser trained with null conditions
    with pytest.raises(ConfigError, match="memory.alpha_short"):
        model.set_memory_config(cfg.replace(alpha_short=2.0))


def test_test_time_lora_fits_its_episode_and_keeps_the_base(tiny, data):
    spec, train, _ = data
    model = with_memory(
        tiny, WorldModelMemoryConfig(lora_steps=60, lora_lr=5e-3, lora_validation=0)
    )
    base_before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    obs, act = encoded(spec, train[2])
    cond, x0 = model.denoiser_pairs(obs[:41], act[:40])
    assert cond.shape == (40, 128) and x0.shape == (40, model.denoiser.x_dim)

    def episode_loss(adapter: str | None) -> float:
        g = torch.Generator().manual_seed(3)
        losses = []
        for _ in range(20):
            x_t, t, target = model.denoiser.noisy_input(x0, g)
            with torch.no_grad():
                pred = model.memory_store().predict(x_t, t, cond, [adapter] * len(x0))
            losses.append(float((pred - target).pow(2).mean()))
        return float(np.mean(losses))

    logs = model.remember("ep", obs[:41], act[:40], generator=torch.Generator().manual_seed(0))
    assert logs["lora/loss_last"] < logs["lora/loss_first"]
    assert episode_loss("ep") < 0.9 * episode_loss(None)
    for key, value in model.denoiser.state_dict().items():
        torch.testing.assert_close(value, base_before[key], rtol=0, atol=0)
    model.forget("ep")
    assert "ep" not in model.memory_store() and "ep" not in model.spatial_stores


def test_lora_validation_keeps_an_adapter_only_if_it_beats_the_base(tiny, data):
    spec, train, _ = data
    model = with_memory(tiny, WorldModelMemoryConfig(lora_steps=60, lora_lr=5e-3))
    obs, act = encoded(spec, train[2])
    logs = model.remember("ep", obs[:41], act[:40], generator=torch.Generator().manual_seed(0))
    kept = logs["lora/val_loss"] < logs["lora/val_loss_base"]  # on the latest 10 transitions
    assert logs["lora/kept"] == float(kept) and model.memory_store().last_kept["ep"] == kept
    x_t, t, cond = (
        torch.randn(4, model.denoiser.x_dim),
        torch.full((4,), 700.0),
        torch.randn(4, 128),
    )
    with torch.no_grad():
        lora = model.memory_store().predict(x_t, t, cond, ["ep"] * 4)
        base = model.denoiser(x_t, t, cond)
    if not kept:  # the expert abstains exactly
        torch.testing.assert_close(lora, base, rtol=0, atol=1e-6)
    else:
        assert (lora - base).abs().max() > 0


def test_retrieval_spatial_expert_is_the_product_of_gaussians(tiny, data):
    """Memory fully trusted (mse -> 0): x0 lands on the observation that really followed the
    same action on the same cell; never trusted (mse inf, before fit_spatial): eps^c = eps^u."""
    spec, train, _ = data
    model = with_memory(tiny, WorldModelMemoryConfig(lora_steps=1).only("short", "spatial"))
    obs, act = encoded(spec, train[3])
    model.remember("r", obs[:61], act[:60], finetune=False)
    b, n, d = 1, 2, 96
    # a current step j whose (cell, action) pair for agent 0 occurred in a transition that
    # ended before the short context (i + 1 <= j - 4); memory answers with the latest such
    # transition of either agent (one memory for both)
    pos = model.situations(obs)  # cell + adjacent agents: the transition key

    def matches(j):
        return [
            (i, k) for i in range(j - 4) for k in range(n)
            if (pos[i, k] == pos[j, 0]).all() and (act[i, k] == act[j, 0]).all()
        ]  # fmt: skip

    j = next(j for j in range(40, 61) if matches(j))
    i, k = max(matches(j))
    cond = torch.randn(b, 128)
    fz = model.fusion_inputs(["r"], obs[None, j], torch.tensor([j]), act[None, j], cond)
    x_t, t = torch.randn(b, n * d), torch.tensor([750.0])
    with torch.no_grad():
        pred = model.denoiser(x_t, t, cond)
    assert torch.equal(model.fused_prediction(x_t, t, pred, fz), pred)  # mse inf: abstains
    model.spatial_fusion.mse.fill_(1e-12)
    fused = model.fused_prediction(x_t, t, pred, fz)
    x0 = model._x0_from_prediction(fused, x_t, t).view(b, n, d)
    next_obs = obs[j] + (x0 * fz.r_std.view(b, n, d) + fz.mean.view(b, n, d)) * model.delta_std
    next_obs = next_obs + model.delta_mean  # [1, N, D]
    torch.testing.assert_close(next_obs[0, 0], obs[i + 1, k], rtol=0, atol=1e-3)
    # converting the x0 estimate back gives the objective's prediction at the same (x_t, t)
    torch.testing.assert_close(model._x0_from_prediction(pred, x_t, t), x_t - 0.75 * pred)


def test_revisits_and_position_keys(tiny):
    pos = np.array([[[1, 1], [2, 1]], [[1, 2], [2, 1]], [[3, 1], [1, 1]], [[1, 1], [3, 1]]])
    mask = revisits(pos, prefix=1, horizon=2, context=1)  # steps 2 and 3
    # step 2: agent 1 back on (1, 1) (seen at step 0); step 3: agent 0 on (1, 1), but it
    # was occupied during the last context step, so the short context holds it
    assert mask.tolist() == [[False, True], [False, False]]
    obs = torch.zeros(2, 96)
    obs[:, -2:] = torch.tensor([[1.2, 1.9], [3.0, 0.6]])
    assert tiny.__class__ is WorldModel
    model = with_memory(tiny)
    assert model.positions(obs).tolist() == [[1.0, 2.0], [3.0, 1.0]]
    with pytest.raises(ConfigError, match="position_offset"):
        model.set_memory_config(WorldModelMemoryConfig(position_offset="x"))


# ----- long Overcooked rollouts -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(data):
    """The benchmark's recipe, shorter: 300 steps on 20 episodes, spatial expert fitted on
    the same (training) episodes."""
    spec, train, _ = data
    torch.manual_seed(0)
    model = MemoryWorldModel(small_config(), spec, WorldModelMemoryConfig())
    cfg = TrainConfig(steps=300, batch_size=32, window=CONTEXT, lr=2e-3, warmup=20,
                      eval_every=10**6, log_every=10**6, checkpoint_every=10**6,
                      precision="fp32")  # fmt: skip
    fit(model, training_windows(train, spec, CONTEXT), cfg, progress=False)
    info = model.fit_spatial([(e.obs, e.action) for e in train])
    assert info["hits"] > 100 and torch.isfinite(model.spatial_fusion.mse[:, -2:]).all()
    return model


def test_all_experts_beat_the_short_term_expert_on_long_overcooked_rollouts(trained, data):
    _, _, held_out = data
    model = trained
    results = {}
    for name, cfg in (("short", model.memory_cfg.only("short")), ("all", WorldModelMemoryConfig())):
        model.set_memory_config(cfg)
        results[name] = evaluate_rollouts(
            model, held_out, prefix=PREFIX, horizon=HORIZON, samples=2, seed=0
        )
    short, every = results["short"], results["all"]
    assert short.n_recall == every.n_recall > 15  # the same revisited (step, agent) pairs
    assert every.long_horizon_mse < short.long_horizon_mse, (every.horizon_mse, short.horizon_mse)
    assert every.recall_mse < short.recall_mse, (every.recall_mse, short.recall_mse)
