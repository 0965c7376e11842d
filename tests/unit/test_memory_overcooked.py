"""Memory experts on the real WorldModel (``memory=`` of imagine), and long Overcooked rollouts.

- Wiring (tiny untrained model): with only the short-term expert, or with memories that add
  nothing yet (fresh LoRA adapter, zero-initialised spatial adapter), imagination is exactly
  the plain WorldModel's; with every expert acting it reproduces golden rollouts; the
  composition equals the PoCE formula on the experts' outputs; test-time LoRA lowers the
  denoiser's loss on its episode and leaves the base unchanged; a saved and reloaded memory
  imagines exactly as before.
- Long rollouts beyond the short context: a small world model trained on random-policy
  cramped_room episodes imagines 40 steps past a 48-step real prefix of held-out episodes
  with their real actions; with all experts the long-horizon error and the recall error on
  revisited cells must be lower than with the short-term expert alone, measured in the same
  test with the same sampling noise. Full ablation: benchmarks/memory_overcooked.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks._memory_eval import (
    evaluate_rollouts,
    random_episodes,
    revisits,
    small_world_model,
    training_windows,
)
from moedream.config import ConfigError
from moedream.world_model.memory import MemoryConfig, MemoryExperts, load_memory, save_memory
from moedream.world_model.model import CheckpointError, WorldModel
from moedream.world_model.safetensors_file import read_checkpoint, write_checkpoint
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


@pytest.fixture(scope="module")
def data():
    spec, episodes = random_episodes("overcooked", ENV, range(20 + N_HELD_OUT))
    return spec, episodes[:20], episodes[20:]


def encoded(spec, episode):
    return torch.as_tensor(episode.obs), torch.as_tensor(spec.encode_actions(episode.action))


# ----- wiring ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(data):
    """An untrained model (shared read-only: memories copy what they change)."""
    spec, train, _ = data
    torch.manual_seed(0)
    base = WorldModel(small_world_model(CONTEXT, diffusion_hidden=32), spec)
    base.fit_normalization(training_windows(train[:3], spec, CONTEXT))
    return base


def imagine(model, episode, spec, memory=None, *, observed=40, steps=10):
    """``steps`` imagined after ``observed`` real steps of ``episode``, fixed seeds."""
    obs, act = encoded(spec, episode)
    torch.manual_seed(5)  # observe samples the RSSM's z from the global generator
    state = model.observe(obs[None, : observed + 1], act[None, :observed])
    plan = act[None, observed : observed + steps]
    gen = torch.Generator().manual_seed(1)
    return model.imagine(state, plan, steps, generator=gen, memory=memory)


def test_short_term_alone_and_empty_memories_reproduce_the_world_model(tiny, data):
    spec, train, _ = data
    cfg = MemoryConfig(lora_steps=2)
    short = MemoryExperts(tiny, cfg.only("short"))
    obs, act = encoded(spec, train[0])
    short.remember("a", obs[:21], act[:20])
    want = imagine(tiny, train[0], spec, observed=20)
    got = imagine(tiny, train[0], spec, short.recall(["a"]), observed=20)
    assert got.obs.shape == (1, 11, 2, 96)
    np.testing.assert_allclose(got.obs, want.obs, rtol=0, atol=1e-6)
    # every expert on, memories stored but adding nothing yet (no LoRA finetuning: base
    # weights; spatial adapter zero-initialised): both contrasts vanish
    for mode in ("retrieval", "adapter"):
        every = MemoryExperts(tiny, cfg.replace(spatial_mode=mode))
        every.remember("a", obs[:21], act[:20], finetune=False)
        assert len(every.spatial_stores["a"]) == 21 * 2
        got = imagine(tiny, train[0], spec, every.recall(["a"]), observed=20)
        np.testing.assert_allclose(got.obs, want.obs, rtol=0, atol=1e-5)
    # rows without an episode sample from the plain denoiser
    got = imagine(tiny, train[0], spec, every.recall([None]), observed=20)
    np.testing.assert_array_equal(got.obs, want.obs)


# Rollouts computed before memory became an argument of imagine (the memory world model
# subclass), with the transition key of that time (cell and neighbours): the x, y cells of
# both agents over the first 6 imagined steps, and sum |obs|.
GOLDEN = {
    "retrieval": (
        [1.9622126, 2.0, 2.1037903, 1.9646297, 1.4093041, 1.6574354,
         1.5166807, 1.7901952, 1.0, 1.0205344, 2.000174, 1.9636042],
        797.73328,
    ),
    "adapter": (
        [1.0, 1.5805817, 2.6181295, 2.0, 1.0, 1.1675978,
         1.7619928, 1.7036289, 1.0, 1.1439852, 1.4152986, 1.2309535],
        852.04968,
    ),
}  # fmt: skip


def remembered(model, data, cfg: MemoryConfig) -> MemoryExperts:
    """Every expert acting: spatial fitted on 3 episodes, LoRA kept, a non-zero adapter."""
    spec, train, _ = data
    memory = MemoryExperts(model, cfg)
    if cfg.spatial_mode == "retrieval":
        memory.fit_spatial([(e.obs, e.action) for e in train[:3]])
    else:  # random adapter weights stand in for a trained adapter
        torch.manual_seed(11)
        for p in memory.spatial_adapter.parameters():
            torch.nn.init.normal_(p, std=0.1)
    obs, act = encoded(spec, train[3])
    torch.manual_seed(3)  # the LoRA adapter's initialisation draws from the global generator
    memory.remember("a", obs[:41], act[:40], generator=torch.Generator().manual_seed(0))
    return memory


@pytest.mark.parametrize("mode", ["retrieval", "adapter"])
def test_memory_argument_reproduces_the_golden_rollouts(tiny, data, mode):
    spec, train, _ = data
    memory = remembered(
        tiny,
        data,
        MemoryConfig(lora_steps=5, lora_validation=0.0, spatial_mode=mode,
                     transition_key="cell_and_neighbours"),
    )  # fmt: skip
    got = imagine(tiny, train[3], spec, memory.recall(["a"])).obs[0, 1:]  # [H, N, D]
    cells, abs_sum = GOLDEN[mode]
    np.testing.assert_allclose(got[:, :, -2:].reshape(-1)[:12], cells, rtol=0, atol=1e-3)
    assert float(np.abs(got).sum()) == pytest.approx(abs_sum, rel=1e-4)
    plain = imagine(tiny, train[3], spec).obs[0, 1:]
    assert np.abs(got - plain).max() > 0.1  # the memories act


def test_saved_memory_imagines_exactly_as_before(tiny, data, tmp_path):
    spec, train, _ = data
    cfg = MemoryConfig(lora_steps=5, spatial_mode="adapter", max_adapters=3)
    memory = remembered(tiny, data, cfg)
    for i, episode in enumerate(train[4:6]):
        obs, act = encoded(spec, episode)
        memory.remember(f"e{i}", obs[:31], act[:30], generator=torch.Generator().manual_seed(i))
    memory.forget("e0")
    memory.store.get("a")  # LRU order: e1, a
    before = imagine(tiny, train[3], spec, memory.recall(["a"]))
    save_memory(memory, tmp_path)
    model = WorldModel.load(tiny.save(tmp_path))
    loaded = load_memory(tmp_path, model)
    after = imagine(model, train[3], spec, loaded.recall(["a"]))
    np.testing.assert_array_equal(after.obs, before.obs)
    assert loaded.store.episode_ids == ["e1", "a"] and list(loaded.spatial_stores) == ["a", "e1"]
    assert loaded.cfg == cfg and loaded.store.last_kept == memory.store.last_kept
    torch.testing.assert_close(loaded.spatial_fusion.mse, memory.spatial_fusion.mse)
    for key, table in memory.spatial_stores["e1"].tables().items():
        torch.testing.assert_close(loaded.spatial_stores["e1"].tables()[key], table)
    # a memory only loads on the world model it was built on
    other = WorldModel(small_world_model(CONTEXT, diffusion_hidden=16), spec)
    with pytest.raises(CheckpointError, match="another world model config"):
        load_memory(tmp_path, other)
    with pytest.raises(CheckpointError, match="not a moedream memory checkpoint"):
        load_memory(tmp_path / "world_model.safetensors", model)
    with pytest.raises(ValueError, match="belongs to another world model"):
        imagine(tiny, train[3], spec, loaded.recall(["a"]))
    # a memory saved before the config had transition_key used cell-and-neighbour keys
    metadata, tensors = read_checkpoint(tmp_path / "memory.safetensors", kind="memory",
                                        fmt="moedream.world_model.memory")  # fmt: skip
    stored = json.loads(metadata["memory_config"])
    del stored["transition_key"]
    write_checkpoint(tmp_path / "old.safetensors", tensors,
                     {**metadata, "memory_config": json.dumps(stored)})  # fmt: skip
    assert load_memory(tmp_path / "old.safetensors", model).cfg.transition_key == (
        "cell_and_neighbours"
    )


def test_composition_is_the_poce_formula_on_the_experts(tiny, data):
    spec, train, _ = data
    cfg = MemoryConfig(
        lora_steps=5, lora_validation=0.0, alpha_long=0.5, alpha_spatial=1.5, spatial_mode="adapter"
    )
    memory = MemoryExperts(tiny, cfg)
    torch.nn.init.normal_(memory.spatial_adapter.out.weight, std=0.1)  # a non-zero offset
    obs, act = encoded(spec, train[1])
    memory.remember("e", obs[:30], act[:29], generator=torch.Generator().manual_seed(0))
    entries = memory.retrievals(obs[None, 29], ["e"], torch.tensor([29]))  # [1, N, k, S]
    assert entries[..., -1].sum() > 0  # cells of the prefix were retrieved
    x_t, t, cond = torch.randn(1, tiny.denoiser.x_dim), torch.tensor([500.0]), torch.randn(1, 128)
    with torch.no_grad():
        offset = memory.spatial_adapter(entries, cond)
        experts = memory.expert_predictions(x_t, t, cond, ["e"], offset)
        composed = memory.compose(experts)
        f = tiny.denoiser(x_t, t, cond)
        lora = memory.store.predict(x_t, t, cond, ["e"])
        spatial = tiny.denoiser(x_t, t, cond + offset)
    assert list(experts) == ["short", "long", "spatial"]
    assert offset.abs().sum() > 0 and (lora - f).abs().max() > 0  # both memories act
    torch.testing.assert_close(composed, f + 0.5 * (lora - f) + 1.5 * (spatial - f))
    # alpha_short != 1 needs a denoiser trained with null conditions
    with pytest.raises(ConfigError, match="memory.alpha_short"):
        memory.set_config(cfg.replace(alpha_short=2.0))
    with pytest.raises(ValueError, match="2 episode ids for a batch of 1"):
        imagine(tiny, train[1], spec, memory.recall(["e", "e"]))


def test_test_time_lora_fits_its_episode_and_keeps_the_base(tiny, data):
    spec, train, _ = data
    memory = MemoryExperts(tiny, MemoryConfig(lora_steps=60, lora_lr=5e-3, lora_validation=0))
    base_before = {k: v.clone() for k, v in tiny.denoiser.state_dict().items()}
    obs, act = encoded(spec, train[2])
    cond, x0 = memory.denoiser_pairs(obs[:41], act[:40])
    assert cond.shape == (40, 128) and x0.shape == (40, tiny.denoiser.x_dim)

    def episode_loss(adapter: str | None) -> float:
        g = torch.Generator().manual_seed(3)
        losses = []
        for _ in range(20):
            x_t, t, target = tiny.denoiser.noisy_input(x0, g)
            with torch.no_grad():
                pred = memory.memory_store().predict(x_t, t, cond, [adapter] * len(x0))
            losses.append(float((pred - target).pow(2).mean()))
        return float(np.mean(losses))

    logs = memory.remember("ep", obs[:41], act[:40], generator=torch.Generator().manual_seed(0))
    assert logs["lora/loss_last"] < logs["lora/loss_first"]
    assert episode_loss("ep") < 0.9 * episode_loss(None)
    for key, value in tiny.denoiser.state_dict().items():
        torch.testing.assert_close(value, base_before[key], rtol=0, atol=0)
    memory.forget("ep")
    assert "ep" not in memory.memory_store() and "ep" not in memory.spatial_stores


def test_lora_validation_keeps_an_adapter_only_if_it_beats_the_base(tiny, data):
    spec, train, _ = data
    memory = MemoryExperts(tiny, MemoryConfig(lora_steps=60, lora_lr=5e-3))
    obs, act = encoded(spec, train[2])
    logs = memory.remember("ep", obs[:41], act[:40], generator=torch.Generator().manual_seed(0))
    kept = logs["lora/val_loss"] < logs["lora/val_loss_base"]  # on the latest 10 transitions
    assert logs["lora/kept"] == float(kept) and memory.memory_store().last_kept["ep"] == kept
    x_t, t, cond = (
        torch.randn(4, tiny.denoiser.x_dim),
        torch.full((4,), 700.0),
        torch.randn(4, 128),
    )
    with torch.no_grad():
        lora = memory.memory_store().predict(x_t, t, cond, ["ep"] * 4)
        base = tiny.denoiser(x_t, t, cond)
    if not kept:  # the expert abstains exactly
        torch.testing.assert_close(lora, base, rtol=0, atol=1e-6)
    else:
        assert (lora - base).abs().max() > 0
    # paired_loss is the validation's measure: the same figures on the same held-out pairs
    cond, x0 = memory.denoiser_pairs(obs[:41], act[:40])
    adapted, base_loss = memory.memory_store().paired_loss("ep", x0[30:], cond[30:])
    assert base_loss == pytest.approx(logs["lora/val_loss_base"], rel=1e-5)
    assert adapted == pytest.approx(logs["lora/val_loss"] if kept else base_loss, rel=1e-5)


def test_retrieval_spatial_expert_is_the_product_of_gaussians(tiny, data):
    """Memory fully trusted (mse -> 0): x0 lands on the observation that really followed the
    same action on the same cell; never trusted (mse inf, before fit_spatial): eps^c = eps^u."""
    spec, train, _ = data
    memory = MemoryExperts(tiny, MemoryConfig(lora_steps=1).only("short", "spatial"))
    obs, act = encoded(spec, train[3])
    memory.remember("r", obs[:61], act[:60], finetune=False)
    b, n, d = 1, 2, 96
    # a current step j whose (cell, action) pair for agent 0 occurred in a transition that
    # ended before the short context (i + 1 <= j - 4); memory answers with the latest such
    # transition of either agent (one memory for both)
    pos = memory.situations(obs)  # cell + adjacent agents: the transition key

    def matches(j):
        return [
            (i, k) for i in range(j - 4) for k in range(n)
            if (pos[i, k] == pos[j, 0]).all() and (act[i, k] == act[j, 0]).all()
        ]  # fmt: skip

    j = next(j for j in range(40, 61) if matches(j))
    i, k = max(matches(j))
    cond = torch.randn(b, 128)
    fz = memory.fusion_inputs(["r"], obs[None, j], torch.tensor([j]), act[None, j], cond)
    x_t, t = torch.randn(b, n * d), torch.tensor([750.0])
    with torch.no_grad():
        pred = tiny.denoiser(x_t, t, cond)
    assert torch.equal(memory.fused_prediction(x_t, t, pred, fz), pred)  # mse inf: abstains
    memory.spatial_fusion.mse.fill_(1e-12)
    fused = memory.fused_prediction(x_t, t, pred, fz)
    x0 = tiny.denoiser.x0_from_prediction(fused, x_t, t).view(b, n, d)
    next_obs = obs[j] + (x0 * fz.r_std.view(b, n, d) + fz.mean.view(b, n, d)) * tiny.delta_std
    next_obs = next_obs + tiny.delta_mean  # [1, N, D]
    torch.testing.assert_close(next_obs[0, 0], obs[i + 1, k], rtol=0, atol=1e-3)
    # the flow objective's x0 estimate at sigma = 0.75
    torch.testing.assert_close(tiny.denoiser.x0_from_prediction(pred, x_t, t), x_t - 0.75 * pred)


def test_revisits_and_position_keys(tiny):
    pos = np.array([[[1, 1], [2, 1]], [[1, 2], [2, 1]], [[3, 1], [1, 1]], [[1, 1], [3, 1]]])
    mask = revisits(pos, prefix=1, horizon=2, context=1)  # steps 2 and 3
    # step 2: agent 1 back on (1, 1) (seen at step 0); step 3: agent 0 on (1, 1), but it
    # was occupied during the last context step, so the short context holds it
    assert mask.tolist() == [[False, True], [False, False]]
    obs = torch.zeros(2, 96)
    obs[:, -2:] = torch.tensor([[1.2, 1.9], [3.0, 0.6]])
    memory = MemoryExperts(tiny)
    assert memory.positions(obs).tolist() == [[1.0, 2.0], [3.0, 1.0]]
    # transition keys: the cell alone (default), or with the other agent's offset when it is
    # adjacent (here it is not: the far sentinel)
    assert memory.situations(obs).tolist() == [[1.0, 2.0], [3.0, 1.0]]
    near = MemoryExperts(tiny, MemoryConfig(transition_key="cell_and_neighbours"))
    assert near.situations(obs).tolist() == [[1.0, 2.0, 99.0, 99.0], [3.0, 1.0, 99.0, 99.0]]
    obs[1, -2:] = torch.tensor([2.0, 2.0])
    assert near.situations(obs).tolist() == [[1.0, 2.0, 1.0, 0.0], [2.0, 2.0, -1.0, 0.0]]
    with pytest.raises(ConfigError, match="transition_key.*build a new MemoryExperts"):
        memory.set_config(MemoryConfig(transition_key="cell_and_neighbours"))
    with pytest.raises(ConfigError, match="transition_key"):
        MemoryConfig(transition_key="row").validate()
    with pytest.raises(ConfigError, match="position_offset"):
        memory.set_config(MemoryConfig(position_offset="x"))
    with pytest.raises(ConfigError, match="position_offset"):
        MemoryExperts(tiny, MemoryConfig(position_offset=95)).positions(obs)


# ----- long Overcooked rollouts -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(data):
    """The benchmark's recipe, shorter: 300 steps on 20 episodes, spatial expert fitted on
    the same (training) episodes."""
    spec, train, _ = data
    torch.manual_seed(0)
    model = WorldModel(small_world_model(CONTEXT), spec)
    memory = MemoryExperts(model, MemoryConfig())  # before training: the seed's stream order
    cfg = TrainConfig(steps=300, batch_size=32, window=CONTEXT, lr=2e-3, warmup=20,
                      eval_every=10**6, log_every=10**6, checkpoint_every=10**6,
                      precision="fp32")  # fmt: skip
    fit(model, training_windows(train, spec, CONTEXT), cfg, progress=False)
    info = memory.fit_spatial([(e.obs, e.action) for e in train])
    assert info["hits"] > 100 and torch.isfinite(memory.spatial_fusion.mse[:, -2:]).all()
    return memory


def test_all_experts_beat_the_short_term_expert_on_long_overcooked_rollouts(trained, data):
    _, _, held_out = data
    memory = trained
    results = {}
    for name, cfg in (("short", memory.cfg.only("short")), ("all", MemoryConfig())):
        memory.set_config(cfg)
        results[name] = evaluate_rollouts(
            memory, held_out, prefix=PREFIX, horizon=HORIZON, samples=2, seed=0
        )
    short, every = results["short"], results["all"]
    assert short.n_recall == every.n_recall > 15  # the same revisited (step, agent) pairs
    assert every.long_horizon_mse < short.long_horizon_mse, (every.horizon_mse, short.horizon_mse)
    assert every.recall_mse < short.recall_mse, (every.recall_mse, short.recall_mse)
