"""Memory experts' parts on their own: PoCE arithmetic, the config, the spatial memory of an
episode and the test-time LoRA store (on a small denoiser; the experts wired into the world
model are tested in test_memory_overcooked.py)."""

from __future__ import annotations

import pytest
import torch

from moedream.config import ConfigError
from moedream.world_model.diffusion import Denoiser, DiffusionConfig
from moedream.world_model.memory import (
    EpisodeSpatialStore,
    MemoryConfig,
    MemoryStore,
    compose_predictions,
    retrieve_nearest,
)

X_DIM, COND_DIM = 6, 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one thread avoids OpenMP spin-waits on a busy shared machine; restored
    after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----- PoCE arithmetic -------------------------------------------------------------------
def test_compose_matches_both_formulas():
    g = torch.Generator().manual_seed(0)
    c = [torch.randn(3, 5, generator=g) for _ in range(3)]
    u = [torch.randn(3, 5, generator=g) for _ in range(3)]
    prior = torch.randn(3, 5, generator=g)
    a = [2.0, 0.5, 1.5]
    total = sum(ai * (ci - ui) for ai, ci, ui in zip(a, c, u))
    torch.testing.assert_close(compose_predictions(c, u, a, "sum"), u[0] + u[1] + u[2] + total)
    torch.testing.assert_close(
        compose_predictions(c, u, a, "shared_prior", prior=prior), prior + total
    )
    torch.testing.assert_close(compose_predictions(c, u, a, "shared_prior"), u[0] + total)
    # golden value: one element by hand
    one = compose_predictions([torch.tensor([[3.0]])], [torch.tensor([[1.0]])], [2.0], "sum")
    assert one.item() == pytest.approx(1.0 + 2.0 * (3.0 - 1.0))


def test_one_expert_alpha_one_is_that_expert_and_sum_overcounts_prior():
    c, u = torch.randn(4, 6), torch.randn(4, 6)
    for form in ("sum", "shared_prior"):
        torch.testing.assert_close(compose_predictions([c], [u], [1.0], form), c)
    # two experts with the same prior and no contrast: "sum" doubles the prior, shared keeps it
    assert torch.allclose(compose_predictions([u, u], [u, u], [2.0, 2.0], "sum"), 2 * u)
    assert torch.allclose(compose_predictions([u, u], [u, u], [2.0, 2.0], "shared_prior"), u)


def test_compose_rejects_bad_input():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="one alpha per expert"):
        compose_predictions([x, x], [x, x], [1.0])
    with pytest.raises(ValueError, match="form"):
        compose_predictions([x], [x], [1.0], "mean")


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="short_term"):
        MemoryConfig(short_term=False, long_term=False, spatial=False).validate()
    with pytest.raises(ConfigError, match="form"):
        MemoryConfig.from_dict({"form": "product"})
    with pytest.raises(ConfigError, match="alpha_long"):
        MemoryConfig.from_dict({"alpha_long": -1.0})
    with pytest.raises(ConfigError, match="lora_validation"):
        MemoryConfig.from_dict({"lora_validation": 1.0})
    with pytest.raises(ConfigError, match="recent_gap"):
        MemoryConfig.from_dict({"recent_gap": -1})
    with pytest.raises(ConfigError, match="spatial_mode"):
        MemoryConfig.from_dict({"spatial_mode": "attention"})
    with pytest.raises(ConfigError, match="context_len"):  # the removed standalone network's
        MemoryConfig.from_dict({"context_len": 4})
    assert MemoryConfig().only("short", "spatial").enabled_experts == ("short", "spatial")
    assert MemoryConfig.from_dict(MemoryConfig(alpha_long=2.0).to_dict()).alpha("long") == 2.0


# ----- spatial memory ----------------------------------------------------------------------
def test_retrieve_nearest_ranks_by_distance_then_recency():
    keys = torch.tensor([[0.0, 0.0], [3.0, 3.0], [1.0, 0.0], [0.0, 0.0]])
    values = torch.arange(4.0)[:, None]  # [4, 1]
    out = retrieve_nearest(keys, values, torch.arange(4), torch.tensor([[0.0, 0.0]]), k=3)
    assert out.shape == (1, 3, 1 + 2 + 1)
    assert out[0, :, 0].tolist() == [3.0, 0.0, 2.0]  # newest (0,0), older (0,0), then (1,0)
    assert out[0, 2, 1:3].tolist() == [1.0, 0.0] and out[0, :, -1].tolist() == [1.0] * 3
    empty = retrieve_nearest(keys[:0], values[:0], torch.arange(0), torch.zeros(2, 2), k=2)
    assert empty.abs().sum() == 0


def test_episode_spatial_store_bounds_hides_recent_steps_and_round_trips():
    store = EpisodeSpatialStore(obs_dim=3, key_dim=2, capacity=7, device="cpu")
    positions = torch.tensor([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]],
                              [[0.0, 0.0], [2.0, 0.0]], [[1.0, 1.0], [2.0, 0.0]]])  # fmt: skip
    obs = torch.arange(24.0).reshape(4, 2, 3)  # [L, N, D]
    store.add(positions, obs, torch.arange(4))
    assert len(store) == 7  # 8 entries, the oldest dropped
    query = torch.tensor([[0.0, 0.0]])
    # as of step 1 only steps 0-1 are usable; the first (0, 0) entry was dropped
    torch.testing.assert_close(
        store.retrieve(query, 2, before_step=1),
        retrieve_nearest(store.keys[:3], store.values[:3], store.steps[:3], query, 2),
    )
    assert store.retrieve(query, 1, before_step=3)[0, 0, :3].tolist() == obs[2, 0].tolist()
    # transitions: the latest o_{t+1} after that action in that situation, before a step
    actions = torch.eye(2)[[0, 1, 0]][:, None].expand(3, 2, 2)  # [L, N, A]
    store.add_transitions(positions[:-1], actions, obs[1:], torch.arange(1, 4))
    value, hit = store.lookup_transition(positions[0], actions[0], before_step=3)
    assert hit.tolist() == [True, True]
    assert value[0].tolist() == obs[3, 0].tolist()  # (0, 0) + action 0 again at step 2 -> 3
    assert value[1].tolist() == obs[1, 1].tolist()  # (1, 0) + action 0: only at step 0 -> 1
    value, hit = store.lookup_transition(positions[0], actions[0], before_step=2)
    assert value[0].tolist() == obs[1, 0].tolist()  # the step-3 transition is not yet usable
    never = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # cells that never saw action 1
    miss, hit = store.lookup_transition(never, actions[1], before_step=3)
    assert hit.tolist() == [False, False] and miss.abs().sum() == 0
    copy = EpisodeSpatialStore.from_tables(store.tables(), capacity=7)
    for name, table in store.tables().items():
        assert torch.equal(getattr(copy, name), table), name
    with pytest.raises(ValueError, match="positions"):
        store.add(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1))


# ----- long-term expert: test-time LoRA ----------------------------------------------------
def small_denoiser() -> Denoiser:
    torch.manual_seed(0)
    cfg = DiffusionConfig(objective="v", hidden=32, layers=1, time_embed_dim=16)
    return Denoiser(cfg, x_dim=X_DIM, cond_dim=COND_DIM).eval()


def episode_pairs(seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """An episode's (x0 [n, X], cond [n, C]): x0 a fixed linear map of cond, its own per seed."""
    g = torch.Generator().manual_seed(seed)
    weight = 2 * torch.randn(COND_DIM, X_DIM, generator=g)
    cond = torch.randn(n, COND_DIM, generator=g)
    return cond @ weight, cond


def store_for(denoiser: Denoiser, **changes) -> MemoryStore:
    return MemoryStore(denoiser, MemoryConfig(lora_rank=4, lora_steps=80, lora_lr=5e-3, **changes))


def fixed_noise_loss(store: MemoryStore, pairs, episode: str | None) -> float:
    """Denoising error on ``pairs`` with fixed noise draws (the same at every call)."""
    x0, cond = pairs
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for _ in range(8):
            x_t, t, target = store.model.get_base_model().denoiser.noisy_input(x0, g)
            pred = store.predict(x_t, t, cond, [episode] * len(x0))
            total += (pred - target).pow(2).mean().item()
    return total / 8


def test_lora_finetune_lowers_error_keeps_base_and_separates_episodes():
    denoiser = small_denoiser()
    base_before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    data_a, data_b = episode_pairs(7), episode_pairs(8)
    store = store_for(denoiser)
    before = fixed_noise_loss(store, data_a, None)
    logs = store.finetune_pairs("a", *data_a, generator=torch.Generator().manual_seed(0))
    after = fixed_noise_loss(store, data_a, "a")
    assert after < 0.7 * before, (before, after, logs)
    # base weights untouched: the caller's denoiser and the store's frozen copy
    for k, v in denoiser.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    copy_base = store.base_state_dict()
    assert all(torch.equal(copy_base[k], v) for k, v in base_before.items())
    assert fixed_noise_loss(store, data_a, None) == pytest.approx(before)
    # a second episode gets its own adapter; the first one's weights do not move
    a_weights = store.export("a")
    store.finetune_pairs("b", *data_b, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a_weights[k], v) for k, v in store.export("a").items())
    assert fixed_noise_loss(store, data_a, "a") < fixed_noise_loss(store, data_a, "b")
    assert fixed_noise_loss(store, data_b, "b") < fixed_noise_loss(store, data_b, "a")
    # a mixed batch (rows of both episodes) equals each episode's own prediction
    x_t, t, cond = torch.randn(4, X_DIM), torch.full((4,), 300.0), data_a[1][:4]
    with torch.no_grad():
        mixed = store.predict(x_t, t, cond, ["a", "b", None, "a"])
        torch.testing.assert_close(
            mixed[[0, 3]], store.predict(x_t[[0, 3]], t[[0, 3]], cond[[0, 3]], ["a", "a"])
        )
        torch.testing.assert_close(mixed[1:2], store.predict(x_t[1:2], t[1:2], cond[1:2], ["b"]))
        torch.testing.assert_close(mixed[2:3], denoiser(x_t[2:3], t[2:3], cond[2:3]))
    # export / import moves an episode's memory to another store
    other = store_for(denoiser)
    other.import_adapter("a", store.export("a"))
    assert fixed_noise_loss(other, data_a, "a") == pytest.approx(
        fixed_noise_loss(store, data_a, "a")
    )
    assert list(store.adapters()) == store.episode_ids == ["b", "a"]  # "a" used last
    # after the denoiser trains further, sync_base refreshes the frozen copy (adapters kept)
    with torch.no_grad():
        denoiser.out_proj.bias.add_(1.0)
    store.sync_base(denoiser)
    torch.testing.assert_close(store.base_state_dict()["out_proj.bias"], denoiser.out_proj.bias)
    assert all(torch.equal(a_weights[k], v) for k, v in store.export("a").items())


@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_adapter_eviction(policy):
    store = store_for(small_denoiser(), max_adapters=2, eviction=policy)
    pairs = episode_pairs(1)
    store.finetune_pairs("a", *pairs, steps=1)
    store.finetune_pairs("b", *pairs, steps=1)
    assert store.get("a") is not None  # LRU: "a" is now the most recently used
    store.finetune_pairs("c", *pairs, steps=1)
    assert len(store) == 2
    expected = {"lru": ["a", "c"], "fifo": ["b", "c"]}[policy]  # LRU evicted b, FIFO evicted a
    assert sorted(store.episode_ids) == expected
    lora_names = {
        n.split("lora_A.")[1].split(".")[0]
        for n, _ in store.model.named_parameters()
        if "lora_A." in n
    }
    assert len(lora_names) == 3  # two episodes + the anchor: evicted adapters are deleted
    assert store.evict("c") == "c" and "c" not in store
    with pytest.raises(KeyError, match="no adapter"):
        store.evict("zzz")
    with pytest.raises(ValueError, match="as many targets as conds"):
        store.finetune_pairs("d", pairs[0][:3], pairs[1][:2])
