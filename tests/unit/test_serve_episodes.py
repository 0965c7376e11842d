"""Episode memories of the served model without Ray: request parsing (bad input names the field),
the bounded LRU cache (eviction counted, 404 text), and imagination with memory matching the
in-process memory-composed model while requests without an episode id stay the plain model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from moedream.envs.spec import EnvSpec
from moedream.platform.serve.episodes import EpisodeCache, EpisodeError
from moedream.platform.serve.runner import LoadedModel, run_imagine, start_state
from moedream.platform.serve.schemas import (
    RequestError,
    ServeConfig,
    parse_episode,
    parse_imagine,
)
from moedream.world_model.memory import MemoryConfig, MemoryExperts
from moedream.world_model.model import WorldModel
from tests.world_models import tiny_config

SPEC = EnvSpec("toy_continuous", ("a0", "a1"), (3, 3), "continuous", (2, 2))
MEMORY = MemoryConfig(max_adapters=2, lora_steps=3, lora_validation=0.0, key_dim=1)


def _episode(seed: int, steps: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(steps + 1, 2, 3)).astype(np.float32)
    action = rng.uniform(-1, 1, size=(steps, 2, 2)).astype(np.float32)
    return obs, action


@pytest.fixture(scope="module")
def model() -> WorldModel:
    torch.manual_seed(0)
    return WorldModel(tiny_config(), SPEC).eval()


@pytest.fixture
def cache(model) -> EpisodeCache:
    return EpisodeCache(model, MEMORY, "test")


# ------------------------------------------------------------------ request parsing


def test_episode_request_parses_into_arrays():
    obs, action = _episode(0)
    job = parse_episode(
        {"episode_id": "ep-1", "obs": obs.tolist(), "actions": action.tolist(), "seed": 3}, SPEC
    )
    assert (job.episode_id, job.seed) == ("ep-1", 3)
    np.testing.assert_allclose(job.obs, obs)
    np.testing.assert_allclose(job.action, action)


@pytest.mark.parametrize(
    ("change", "field", "text"),
    [
        ({"episode_id": ""}, "episode_id", "at least 1 character"),
        ({"episode_id": "a b/c"}, "episode_id", "should match pattern"),
        ({"obs": [[[0.0] * 3] * 2]}, "obs", "send L+1 >= 2"),
        ({"obs": [[[0.0] * 4] * 2] * 3}, "obs", "has shape [3, 2, 4]"),
        ({"actions": [[[0.0] * 2] * 2] * 5}, "actions", "has shape [5, 2, 2]"),
        ({"actions": None}, "actions", "is required"),
        ({"history": []}, "history", "Extra inputs are not permitted"),
    ],
)
def test_bad_episode_requests_name_the_field(change, field, text):
    obs, action = _episode(0)
    body = {"episode_id": "ep", "obs": obs.tolist(), "actions": action.tolist(), **change}
    with pytest.raises(RequestError) as err:
        parse_episode(body, SPEC)
    assert err.value.field == field and text in str(err.value), str(err.value)
    assert str(err.value).startswith(f"{field}: ")


def test_imagine_request_carries_an_optional_episode_id():
    body = {"start_obs": np.zeros((1, 2, 3)).tolist(), "policy": "random", "horizon": 2}
    config = tiny_config()
    assert parse_imagine(body, SPEC, config, ServeConfig()).episode_id is None
    job = parse_imagine({**body, "episode_id": "ep-1"}, SPEC, config, ServeConfig())
    assert job.episode_id == "ep-1"
    with pytest.raises(RequestError, match="episode_id: .*string"):
        parse_imagine({**body, "episode_id": 7}, SPEC, config, ServeConfig())


def test_serve_config_memory_fields_are_checked():
    config = ServeConfig.from_dict({"memory": {"max_adapters": 5}})
    assert config.memory.max_adapters == 5
    with pytest.raises(ValueError, match="memory.max_adapters"):
        ServeConfig.from_dict({"memory": {"max_adapters": 0}})


# ------------------------------------------------------------------ the cache


def test_cache_evicts_the_least_recently_used_and_counts_it(cache):
    for name in ("a", "b"):
        assert cache.remember(name, *_episode(1), seed=0)["created"]
    cache.check("a")  # a is now more recent than b
    out = cache.remember("c", *_episode(2), seed=0)
    assert out["evicted"] == ["b"] and out["steps"] == 6
    summary = cache.summary()
    assert summary["evictions"] == 1 and summary["cached"] == 2
    assert list(summary["episodes"]) == ["a", "c"]  # least recently used first
    assert "b" not in cache.memory.spatial_stores and "b" not in cache.memory.store


def test_unknown_and_evicted_episodes_get_a_404_naming_the_fix(cache):
    for name in ("a", "b", "c"):
        cache.remember(name, *_episode(3), seed=0)
    with pytest.raises(EpisodeError) as evicted:
        cache.check("a")
    assert evicted.value.status == 404 and evicted.value.field == "episode_id"
    assert "was evicted" in str(evicted.value) and "POST its real history" in str(evicted.value)
    with pytest.raises(EpisodeError, match="holds no memory of episode 'zz'"):
        cache.check("zz")
    assert cache.summary()["misses"] == 2


def test_a_posted_episode_continues_where_it_stopped(cache):
    obs, action = _episode(4, steps=8)
    cache.remember("a", obs[:5], action[:4], seed=0)
    assert cache.remember("a", obs[4:], action[4:], seed=0)["steps"] == 8
    assert not cache.summary()["evictions"] and cache.summary()["posts"] == 2
    with pytest.raises(RequestError, match=r"obs\[0\]: differs from the latest observation"):
        cache.remember("a", obs[2:], action[2:], seed=0)


# ------------------------------------------------------------------ imagination with memory


def _loaded(model: WorldModel) -> LoadedModel:
    return LoadedModel(model, "in-memory", "test", 0.0, "now")


def _imagine_job(episode_id: str | None, model: WorldModel):
    obs, _ = _episode(5)
    body = {"start_obs": obs[-1:].tolist(), "policy": "random", "horizon": 4, "num_samples": 2,
            "seed": 9, "episode_id": episode_id}  # fmt: skip
    return parse_imagine(body, SPEC, model.config, ServeConfig())


def test_imagine_with_an_episode_is_the_memory_composed_model(model, cache):
    obs, action = _episode(5)
    cache.remember("ep", obs, action, seed=1)
    cache.check("ep")  # the deployment's early check before queueing: not a second hit
    served = run_imagine(_loaded(model), _imagine_job("ep", model), cache)
    assert cache.summary()["hits"] == 1
    # the same memory built in-process, imagined from the episode's step 6
    memory = MemoryExperts(model, MEMORY)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # a new adapter's LoRA init draws from the global RNG
        memory.remember("ep", obs, action, generator=torch.Generator().manual_seed(1))
    job = _imagine_job("ep", model)
    direct = model.imagine(
        start_state(model, job.start, None, 6), job.plan, 4,
        generator=torch.Generator().manual_seed(9), memory=memory.recall(["ep", "ep"]),
    )  # fmt: skip
    np.testing.assert_allclose(served["obs"], direct.obs, rtol=1e-5, atol=1e-6)
    plain = run_imagine(_loaded(model), _imagine_job(None, model), cache)
    assert not np.allclose(served["obs"][:, 1:], plain["obs"][:, 1:])  # the memory acts


def test_imagine_without_an_episode_is_the_plain_model_exactly(model, cache):
    cache.remember("ep", *_episode(5), seed=1)
    job = _imagine_job(None, model)
    served = run_imagine(_loaded(model), job, cache)
    direct = model.imagine(job.start, job.plan, 4, generator=torch.Generator().manual_seed(9))
    for key, value in dataclasses.asdict(direct).items():
        np.testing.assert_array_equal(served[key], value, err_msg=key)


def test_imagine_refuses_an_episode_of_another_checkpoint(model, cache):
    cache.remember("ep", *_episode(5), seed=1)
    torch.manual_seed(1)
    other = WorldModel(tiny_config(), SPEC).eval()
    with pytest.raises(EpisodeError, match="another checkpoint"):
        run_imagine(_loaded(other), _imagine_job("ep", other), cache)
    with pytest.raises(EpisodeError, match="no memory of episode 'nope'"):
        run_imagine(_loaded(model), _imagine_job("nope", model), cache)


def test_a_context_is_the_steps_imagined_after_the_posted_step(model):
    """Step-by-step imagination (MBMAPPO) sends the steps imagined so far as context: the
    current observation is then T steps past the episode's latest posted one."""
    obs, action = _episode(6)
    start = obs[-1:]
    assert start_state(model, start, None, 6).step.tolist() == [6]
    context = {"obs": obs[None, :3], "action": action[None, :3]}  # T = 3
    assert start_state(model, start, context, 6).step.tolist() == [9]


# ------------------------------------------------------------ the served memory, fitted

OVERCOOKED = {"layout": "cramped_room", "horizon": 60, "moves": "per_episode"}


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory):
    """Random-policy per-episode-moves cramped_room episodes in a shard, and a tiny model."""
    from benchmarks._memory_eval import random_episodes
    from moedream.data.episodes import write_shard

    spec, episodes = random_episodes("overcooked", OVERCOOKED, range(4))
    shard = write_shard(tmp_path_factory.mktemp("kitchen") / "shard.parquet", episodes[:3], spec)
    torch.manual_seed(0)
    return WorldModel(tiny_config(), spec).eval(), episodes, shard


SPATIAL_ONLY = MemoryConfig(long_term=False)  # the LoRA expert out: spatial alone can act


def _kitchen_rollout(kitchen, cache: EpisodeCache):
    model, episodes, _ = kitchen
    obs, action = episodes[3].obs, episodes[3].action
    cache.remember("ep", obs[:41], action[:40], seed=0)
    body = {"start_obs": obs[40:41].tolist(), "actions": action[None, 40:52].tolist(),
            "horizon": 12, "seed": 4, "episode_id": "ep"}  # fmt: skip
    job = parse_imagine(body, model.spec, model.config, ServeConfig())
    return run_imagine(_loaded(model), job, cache)["obs"]


def test_a_fitted_served_memory_acts_where_an_unfitted_one_abstains(kitchen, tmp_path):
    from moedream.platform.serve.episodes import fit_served_memory

    model, episodes, shard = kitchen
    saved = tmp_path / "model.safetensors"
    model.save(saved)
    fitted = fit_served_memory(
        str(saved), str(shard), SPATIAL_ONLY, tmp_path / "memory.safetensors"
    )
    direct = MemoryExperts(model, SPATIAL_ONLY)
    direct.fit_spatial([(e.obs, e.action) for e in episodes[:3]])
    cache = EpisodeCache(model, SPATIAL_ONLY, "t", str(fitted))
    torch.testing.assert_close(cache.memory.spatial_fusion.mse, direct.spatial_fusion.mse)
    assert torch.isfinite(cache.memory.spatial_fusion.mse).any()
    assert not cache.memory.spatial_stores  # the fitting episodes are not served
    unfitted = EpisodeCache(model, SPATIAL_ONLY, "t")
    assert torch.isinf(unfitted.memory.spatial_fusion.mse).all()
    plain = _kitchen_rollout(kitchen, unfitted)
    plain_job = parse_imagine(
        {"start_obs": episodes[3].obs[40:41].tolist(), "horizon": 12, "seed": 4,
         "actions": episodes[3].action[None, 40:52].tolist()},
        model.spec, model.config, ServeConfig(),
    )  # fmt: skip
    np.testing.assert_allclose(plain, run_imagine(_loaded(model), plain_job)["obs"], atol=1e-6)
    assert np.abs(_kitchen_rollout(kitchen, cache) - plain).max() > 1e-3  # memory answered


def test_a_served_memory_fitted_with_another_key_is_refused(kitchen, tmp_path):
    from moedream.config import ConfigError
    from moedream.platform.serve.episodes import served_memory
    from moedream.world_model.memory import save_memory

    model, _, _ = kitchen
    other = MemoryExperts(model, MemoryConfig(transition_key="cell_and_neighbours"))
    path = save_memory(other, tmp_path / "memory.safetensors")
    with pytest.raises(ConfigError, match="memory.transition_key"):
        served_memory(model, MemoryConfig(), str(path))
    with pytest.raises(ValueError, match="memory_checkpoint"):
        ServeConfig.from_dict({"memory_checkpoint": 3})
