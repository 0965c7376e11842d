"""World-model retraining without Ray: real episodes -> Episode -> windows, the FIFO store,
its Parquet shards, the fine-tune, versioned checkpoints and the provider factory's checks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moedream.config import ConfigError
from moedream.data import episode_windows, read_episodes
from moedream.envs.spec import EnvSpec
from moedream.platform.model_based import ServedWorldModelImaginerFactory
from moedream.platform.retrain import (
    RealEpisodeStore,
    episode_from_agent_arrays,
    fine_tune,
    write_versioned_checkpoint,
)
from moedream.world_model.model import WorldModel
from moedream.world_model.train_local import TrainConfig
from tests.world_models import tiny_config

DISCRETE = EnvSpec("toy_discrete", ("a0", "a1"), (3, 3), "discrete", (4, 4))
NORM_BUFFERS = ("_mean", "_std", "obs_low", "obs_high")
CONTINUOUS = EnvSpec("toy_continuous", ("a0", "a1"), (3, 2), "continuous", (2, 1))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def agent_arrays(spec: EnvSpec, length: int, seed: int = 0, terminated: bool = False) -> dict:
    """What an RLlib SingleAgentEpisode per agent holds for ``length`` steps."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, agent in enumerate(spec.agent_ids):
        if spec.action_kind == "discrete":
            action = rng.integers(0, spec.action_dims[i], size=length)
        else:
            action = rng.uniform(-2, 2, size=(length, spec.action_dims[i])).astype(np.float32)
        out[agent] = {
            "obs": rng.normal(size=(length + 1, spec.obs_dims[i])).astype(np.float32),
            "action": action,
            "reward": rng.normal(size=length).astype(np.float32),
            "terminated": terminated,
        }
    return out


def make_episode(spec: EnvSpec, length: int, seed: int = 0, **kwargs):
    return episode_from_agent_arrays(f"ep{seed}", spec, agent_arrays(spec, length, seed, **kwargs))


# ------------------------------------------------------------------ real episodes -> Episode


def test_discrete_agent_arrays_become_a_stacked_episode():
    arrays = agent_arrays(DISCRETE, 5, seed=1, terminated=True)
    ep = episode_from_agent_arrays("x", DISCRETE, arrays)
    assert ep.obs.shape == (6, 2, 3) and ep.action.shape == (5, 2) and ep.reward.shape == (5, 2)
    assert ep.action.dtype == np.int64
    for i, agent in enumerate(DISCRETE.agent_ids):
        np.testing.assert_array_equal(ep.obs[:, i], arrays[agent]["obs"])
        np.testing.assert_array_equal(ep.action[:, i], arrays[agent]["action"])
        np.testing.assert_array_equal(ep.reward[:, i], arrays[agent]["reward"])
    # termination only at the last step, never truncation
    assert ep.terminated[-1].all() and not ep.terminated[:-1].any() and not ep.truncated.any()
    w = episode_windows(ep, DISCRETE, window=2, stride=1)
    assert w["obs"].shape == (4, 3, 2, 3) and w["action"].shape == (4, 2, 2, 4)
    np.testing.assert_array_equal(w["action"].sum(-1), 1.0)  # one-hot
    assert w["terminated"][-1, -1].tolist() == [1.0, 1.0] and w["terminated"][:-1].sum() == 0


def test_continuous_episode_pads_observations_and_clips_actions():
    arrays = agent_arrays(CONTINUOUS, 4, seed=2)
    ep = episode_from_agent_arrays("y", CONTINUOUS, arrays)
    assert ep.obs.shape == (5, 2, 3) and ep.action.shape == (4, 2, 2)
    np.testing.assert_array_equal(ep.obs[:, 1, :2], arrays["a1"]["obs"])
    np.testing.assert_array_equal(ep.obs[:, 1, 2], 0.0)  # padding of the smaller agent
    np.testing.assert_array_equal(ep.action[:, 0], np.clip(arrays["a0"]["action"], -1, 1))
    np.testing.assert_array_equal(ep.action[:, 1, 1], 0.0)
    assert np.abs(ep.action).max() <= 1.0


def test_agents_that_did_not_all_act_are_refused_with_the_reason():
    arrays = agent_arrays(DISCRETE, 4)
    arrays["a1"] = {k: v[:-1] if k != "terminated" else v for k, v in arrays["a1"].items()}
    with pytest.raises(ValueError, match="different numbers of times"):
        episode_from_agent_arrays("z", DISCRETE, arrays)
    with pytest.raises(ValueError, match=r"no steps of agents \['a1'\]"):
        episode_from_agent_arrays("z", DISCRETE, {"a0": agent_arrays(DISCRETE, 3)["a0"]})


# ------------------------------------------------------------------------------------ store


def test_store_drops_the_oldest_episodes_beyond_its_step_budget():
    store = RealEpisodeStore(DISCRETE, max_steps=12)
    eps = [make_episode(DISCRETE, 5, seed=s) for s in range(3)]
    assert store.add(eps[:2]) == 10 and store.steps == 10 and len(store) == 2
    store.add(eps[2:] + [make_episode(DISCRETE, 0, seed=9)])  # empty episodes are ignored
    assert [e.episode_id for e in store.episodes] == ["ep1", "ep2"]
    assert store.steps == 10 and store.dropped_steps == 5 and store.added_steps == 15
    # one episode longer than the budget keeps its newest steps only
    long = make_episode(DISCRETE, 20, seed=4)
    store.add([long])
    assert store.steps == 12 and [e.episode_id for e in store.episodes] == ["ep4"]
    np.testing.assert_array_equal(store.episodes[0].obs, long.obs[8:])
    np.testing.assert_array_equal(store.episodes[0].action, long.action[8:])


def test_store_windows_match_episode_windows_and_skip_short_episodes():
    store = RealEpisodeStore(DISCRETE, max_steps=100)
    eps = [make_episode(DISCRETE, n, seed=n) for n in (7, 2, 9)]
    store.add(eps)
    w = store.windows(3)
    expected = [episode_windows(e, DISCRETE, 3) for e in eps if e.length >= 3]
    assert w["obs"].shape == (2 + 3, 4, 2, 3)
    np.testing.assert_array_equal(w["obs"], np.concatenate([x["obs"] for x in expected]))
    assert store.windows(3, stride=1)["obs"].shape[0] == 5 + 7
    assert store.windows(10) == {}
    with pytest.raises(ValueError, match="max_steps"):
        RealEpisodeStore(DISCRETE, max_steps=0)


def test_every_kth_episode_goes_to_a_rolling_hold_out_that_training_never_sees():
    store = RealEpisodeStore(DISCRETE, max_steps=100, holdout_every=3, holdout_max_steps=12)
    eps = [make_episode(DISCRETE, 5, seed=s) for s in range(7)]
    store.add(eps[:4])
    store.add([make_episode(DISCRETE, 0, seed=99)])  # empty: neither kind, not counted
    store.add(eps[4:])
    # the 3rd and 6th episodes ever added are held out; the rest are training episodes
    assert [e.episode_id for e in store.held_out] == ["ep2", "ep5"]
    assert [e.episode_id for e in store.episodes] == ["ep0", "ep1", "ep3", "ep4", "ep6"]
    assert store.steps == 25 and store.held_out_steps == 10 and store.added_episodes == 7
    train_obs = store.windows(2, stride=1)["obs"]
    held = store.held_out_windows(2, max_windows=100)
    assert not any((held["obs"][:, None] == train_obs[None]).all((2, 3, 4)).any(1))  # disjoint
    # non-overlapping windows, the newest held-out episode's first, capped at max_windows
    assert held["obs"].shape == (4, 3, 2, 3)
    np.testing.assert_array_equal(held["obs"][0], eps[5].obs[:3])
    assert store.held_out_windows(2, max_windows=3)["obs"].shape[0] == 3
    assert store.held_out_windows(6, max_windows=100) == {}
    # rolling: past holdout_max_steps the oldest held-out episode is dropped
    store.add([make_episode(DISCRETE, 5, seed=s) for s in (7, 8, 9)])  # the 9th added: ep8
    assert [e.episode_id for e in store.held_out] == ["ep5", "ep8"] and store.held_out_steps == 10
    # a resumed run holds the same two sets (a state from before the hold-out has none)
    again = RealEpisodeStore(DISCRETE, max_steps=100, holdout_every=3, holdout_max_steps=12)
    again.set_state(store.get_state())
    assert [e.episode_id for e in again.held_out] == ["ep5", "ep8"]
    assert again.added_episodes == 10 and again.steps == store.steps
    old = {k: v for k, v in store.get_state().items() if k not in ("held_out", "held_out_steps")}
    again.set_state(old)
    assert again.held_out == [] and again.held_out_steps == 0
    with pytest.raises(ValueError, match="holdout_every"):
        RealEpisodeStore(DISCRETE, max_steps=10, holdout_every=-1)
    with pytest.raises(ValueError, match="holdout_max_steps"):
        RealEpisodeStore(DISCRETE, max_steps=10, holdout_every=2, holdout_max_steps=0)


def test_store_writes_readable_parquet_shards(tmp_path):
    store = RealEpisodeStore(CONTINUOUS, max_steps=100, shard_dir=tmp_path / "episodes")
    first = [make_episode(CONTINUOUS, 4, seed=1), make_episode(CONTINUOUS, 6, seed=2)]
    store.add(first)
    store.add([make_episode(CONTINUOUS, 3, seed=3)])
    store.add([])  # nothing to write
    files = sorted((tmp_path / "episodes").iterdir())
    assert len(files) == 2 and all(f.suffix == ".parquet" for f in files)
    spec, episodes = read_episodes(tmp_path / "episodes")
    assert spec == CONTINUOUS
    by_id = {e.episode_id: e for e in episodes}
    assert sorted(by_id) == ["ep1", "ep2", "ep3"]
    for ep in first:
        np.testing.assert_allclose(by_id[ep.episode_id].obs, ep.obs)
        np.testing.assert_allclose(by_id[ep.episode_id].action, ep.action)
        np.testing.assert_array_equal(by_id[ep.episode_id].terminated, ep.terminated)


# ---------------------------------------------------------------------- fine-tune, checkpoint


def tiny_model(spec: EnvSpec) -> WorldModel:
    torch.manual_seed(0)
    config = tiny_config()
    return WorldModel(config, spec)


def linear_episode(spec: EnvSpec, length: int, seed: int):
    """Learnable dynamics: o_{t+1} = 0.8 o_t + 0.5 a_t (padded), reward = first feature."""
    rng = np.random.default_rng(seed)
    arrays = {}
    obs = rng.normal(size=(spec.n_agents, spec.obs_dim)).astype(np.float32)
    actions = rng.uniform(-1, 1, size=(length, spec.n_agents, spec.action_dim)).astype(np.float32)
    trace = [obs]
    for t in range(length):
        nxt = 0.8 * trace[-1]
        nxt[:, : spec.action_dim] += 0.5 * actions[t]
        trace.append(nxt.astype(np.float32))
    trace = np.stack(trace)  # [L + 1, N, D]
    for i, agent in enumerate(spec.agent_ids):
        arrays[agent] = {
            "obs": trace[:, i, : spec.obs_dims[i]],
            "action": actions[:, i, : spec.action_dims[i]],
            "reward": trace[1:, i, 0],
            "terminated": False,
        }
    return episode_from_agent_arrays(f"lin{seed}", spec, arrays)


def test_fine_tune_lowers_the_loss_keeps_the_input_statistics_and_widens_the_support():
    spec = CONTINUOUS
    base = RealEpisodeStore(spec, 1000)
    base.add([linear_episode(spec, 30, seed=s) for s in range(4)])
    new = RealEpisodeStore(spec, 1000)
    new.add([linear_episode(spec, 30, seed=10 + s) for s in range(2)])
    model = tiny_model(spec)
    base_w, new_w = base.windows(4, stride=1), new.windows(4, stride=1)
    model.fit_normalization(base_w)
    norm_before = {k: v.clone() for k, v in model.named_buffers() if k.endswith(NORM_BUFFERS)}
    assert len(norm_before) == 8
    probe = {k: v[:16] for k, v in new_w.items()}

    def probe_loss() -> float:
        with torch.no_grad():
            return float(model.loss(probe, generator=torch.Generator().manual_seed(0))[0])

    before = probe_loss()
    cfg = TrainConfig(steps=30, batch_size=16, window=4, lr=3e-3, warmup=0,
                      lr_schedule="constant", holdout=0.0)  # fmt: skip
    result = fine_tune(model, new_w, cfg, base_windows=base_w, new_fraction=0.5)
    after = probe_loss()
    assert result["steps"] == 30 and np.isfinite(result["loss"]) and result["seconds"] > 0
    assert after < 0.5 * before, (before, after)
    assert not model.training
    state = model.state_dict()
    for key, value in norm_before.items():  # what the network was trained with stays
        if key.startswith(("obs_mean", "obs_std", "delta_")):
            torch.testing.assert_close(state[key], value, msg=key)
    both = np.concatenate([new_w["reward"], base_w["reward"]]).reshape(-1, spec.n_agents)
    np.testing.assert_allclose(state["reward_mean"].numpy(), both.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state["reward_std"].numpy(), both.std(0), rtol=1e-4)
    new_obs = new_w["obs"].reshape(-1, spec.n_agents, spec.obs_dim)
    assert torch.all(state["obs_low"] <= torch.as_tensor(new_obs.min(0)) + 1e-6)
    assert torch.all(state["obs_high"] >= torch.as_tensor(new_obs.max(0)) - 1e-6)
    assert torch.all(state["obs_low"] <= norm_before["obs_low"])
    with pytest.raises(ValueError, match="no new windows"):
        fine_tune(model, {}, cfg)


def test_versioned_checkpoints_are_written_whole_and_never_overwritten(tmp_path):
    model = tiny_model(DISCRETE)
    first = write_versioned_checkpoint(model, tmp_path, 3, {"loss": 1.5})
    second = write_versioned_checkpoint(model, tmp_path, 3, {"loss": 1.0})
    assert first == tmp_path / "retrain_3" / "world_model.safetensors"
    assert second == tmp_path / "retrain_3_2" / "world_model.safetensors"
    assert json.loads((first.parent / "retrain.json").read_text())["loss"] == 1.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retrain_3", "retrain_3_2"]  # no tmp
    loaded = WorldModel.load(second)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)


# ---------------------------------------------------------------------------- factory checks


def test_factory_errors_name_the_field_and_the_fix(tmp_path):
    Factory = ServedWorldModelImaginerFactory
    cases = [
        ({"retrain_steps": 0}, "retrain_steps"),
        ({"retrain_batch_size": 2.5}, "retrain_batch_size"),
        ({"retrain_lr": -1.0}, "retrain_lr"),
        ({"store_max_steps": 0}, "store_max_steps"),
        ({"retrain_new_fraction": 0.0}, "retrain_new_fraction"),
        ({"retrain_window": -1}, "retrain_window"),
        ({"holdout_every": 0}, "holdout_every"),
        ({"gate_calibration_windows": 0}, "gate_calibration_windows"),
        ({"gate_recalibrate": "yes"}, "gate_recalibrate"),
        ({"base_data_path": str(tmp_path / "nope")}, "base_data_path.*does not exist"),
    ]
    for changes, match in cases:
        with pytest.raises(ConfigError, match=f"ServedWorldModelImaginerFactory.{match}"):
            Factory("overcooked", **changes)
    with pytest.raises(ConfigError, match="env_name"):
        Factory("")
    factory = Factory("overcooked")
    factory.check_retrain(0)  # no retraining: no checkpoint folder needed
    with pytest.raises(ConfigError, match="checkpoint_dir.*world_model_retrain_every = 2"):
        factory.check_retrain(2)
    Factory("overcooked", checkpoint_dir=str(tmp_path)).check_retrain(2)
    with pytest.raises(ConfigError, match="imagine_in_process"):
        Factory("overcooked", imagine_in_process="yes")
    memory = SimpleNamespace(imagination=SimpleNamespace(world_model_retrain_every=0, memory=True))
    with pytest.raises(ConfigError, match="imagine_in_process.*episode memory.*memory: false"):
        Factory("overcooked", imagine_in_process=True)(memory)
    # YAML-style construction goes through the same checks
    assert Factory.from_dict({"env_name": "overcooked", "retrain_steps": 5}).retrain_steps == 5
