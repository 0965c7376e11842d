"""Episode memory over HTTP on 127.0.0.1 (real Ray Serve, tiny model): a posted episode's
memory is composed into /v1/imagine exactly as in-process, requests without an episode id stay
the plain model, and evicted or unknown episodes get a 404 naming the fix."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import requests
import torch

import moedream.envs._compat  # noqa: F401  (numpy aliases before overcooked_ai_py)
from moedream.envs import env_spec
from moedream.platform.serve.client import ServeRequestError, WorldModelClient
from moedream.platform.serve.episodes import remember_seeded
from moedream.platform.serve.runner import start_state
from moedream.world_model.memory import MemoryConfig, MemoryExperts
from moedream.world_model.model import WorldModel
from tests.world_models import served_config

# slow: the module deploys its own app (~25 s of replica start on a shared 2-core machine)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

APP = "world_model_memory"
MEMORY = {"max_adapters": 2, "lora_steps": 3, "lora_validation": 0.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _episode(spec, seed: int, steps: int = 6):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(steps + 1, spec.n_agents, spec.obs_dim)).astype(np.float32)
    action = rng.integers(0, 6, size=(steps, spec.n_agents))
    return obs, action


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    model = WorldModel(served_config(), env_spec("overcooked"))
    return str(model.save(tmp_path_factory.mktemp("serve_memory") / "wm.safetensors"))


@pytest.fixture(scope="module")
def served(ray_cluster, model_path):
    from ray import serve

    from moedream.platform.serve import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        {"checkpoint": model_path, "memory": MEMORY, "num_threads": torch.get_num_threads()}
    )
    handle = serve.run(app, name=APP, route_prefix="/memory")
    yield {"client": WorldModelClient(f"http://127.0.0.1:{port}/memory"), "handle": handle}
    serve.delete(APP)


def test_episode_memory_over_http(served, model_path):
    client, model = served["client"], WorldModel.load(model_path).eval()
    obs, action = _episode(model.spec, 0)
    posted = client.post_episode("ep-0", obs, action, seed=1)
    assert (posted["steps"], posted["created"], posted["evicted"]) == (6, True, [])
    plan = np.random.default_rng(1).integers(0, 6, size=(1, 4, model.spec.n_agents))
    start = obs[-1:]
    with_memory = client.imagine(start, plan, horizon=4, seed=3, episode_id="ep-0")
    plain = client.imagine(start, plan, horizon=4, seed=3)

    # in-process: the same memory, imagined from the episode's step 6
    memory = MemoryExperts(model, MemoryConfig.from_dict(MEMORY))
    remember_seeded(memory, "ep-0", obs, action, 0, seed=1)
    expected = model.imagine(
        start_state(model, start, None, 6), plan, 4,
        generator=torch.Generator().manual_seed(3), memory=memory.recall(["ep-0"]),
    )  # fmt: skip
    np.testing.assert_allclose(with_memory.obs, expected.obs, rtol=1e-4, atol=1e-5)
    direct_plain = model.imagine(start, plan, 4, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(plain.obs, direct_plain.obs)  # no episode id: as before
    assert not np.allclose(with_memory.obs[:, 1:], plain.obs[:, 1:])

    # two more episodes in a cache of two: ep-0 (least recently used) is evicted
    for i in (1, 2):
        client.post_episode(f"ep-{i}", *_episode(model.spec, i), seed=i)
    with pytest.raises(ServeRequestError) as evicted:
        client.imagine(start, plan, horizon=4, episode_id="ep-0")
    assert evicted.value.status == 404 and evicted.value.field == "episode_id"
    assert "was evicted" in evicted.value.message and "/v1/episodes" in evicted.value.message
    with pytest.raises(ServeRequestError, match="HTTP 404: episode_id: .*no memory of episode"):
        client.imagine(start, plan, horizon=4, episode_id="never-posted")
    summary = client.episodes()
    assert (summary["evictions"], summary["cached"], list(summary["episodes"])) == (
        1, 2, ["ep-1", "ep-2"],
    )  # fmt: skip
    assert served["handle"].stats.remote().result()["episodes"]["evictions"] == 1

    bad = requests.post(client.base_url + "/v1/episodes", timeout=30,
                        json={"episode_id": "x", "obs": obs[:1].tolist(), "actions": []})  # fmt: skip
    assert bad.status_code == 422 and bad.json()["field"] == "obs", bad.text


class _SeededTeam:
    """Random joint actions from a seeded stream (two teams with one seed act alike)."""

    def __init__(self, spec, seed: int) -> None:
        self.spec, self.rng = spec, np.random.default_rng(seed)

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.integers(0, 6, size=(len(obs), self.spec.n_agents))


def test_imagination_branches_long_rollouts_from_real_prefixes_with_their_memory(served):
    """imagination.memory: the provider posts real prefixes to the replica's episode memory
    and imagines 20 steps with their episode ids: rows start at their branch's real state and
    the rollouts differ from the plain model's from the same starts and seeds."""
    from moedream.data import rollout_episode
    from moedream.envs import make_env
    from moedream.platform.model_based import (
        ServedWorldModelImaginer,
        ServedWorldModelImaginerFactory,
    )

    client, spec = served["client"], env_spec("overcooked")
    real = [rollout_episode(make_env("overcooked", horizon=30), spec, s, f"real-{s}")
            for s in (0, 1)]  # fmt: skip
    factory = ServedWorldModelImaginerFactory("overcooked", app_name=APP, gate_refit=False)

    def imaginer(branches: int) -> ServedWorldModelImaginer:
        return ServedWorldModelImaginer(
            spec=spec, horizon=20, seed=0, factory=factory, memory_branches=branches
        )

    with_memory, before = imaginer(2), client.episodes()
    with_memory.set_branch_sources(real)
    trajs = with_memory.imagine(np.zeros((4, spec.n_agents, spec.obs_dim)), _SeededTeam(spec, 0))
    after = client.episodes()
    assert trajs.obs.shape == (4, 21, spec.n_agents, spec.obs_dim)
    assert after["posts"] - before["posts"] == 2
    assert set(after["episodes"]) == {"branch-0-1-0", "branch-0-1-1"}  # unique ids per call
    assert after["hits"] - before["hits"] >= 2 * 20  # every step of every branch read memory
    real_states = np.concatenate([e.obs for e in real]).reshape(-1, spec.n_agents * spec.obs_dim)
    for rows in ([0, 1], [2, 3]):  # each branch's rows start at one real state of an episode
        start = trajs.obs[rows, 0].reshape(2, -1)
        np.testing.assert_array_equal(start[0], start[1])
        assert (real_states == start[0]).all(-1).any()
    assert with_memory.metrics()["memory_branches"] == 2.0

    plain = imaginer(0).imagine(trajs.obs[:, 0], _SeededTeam(spec, 0))
    np.testing.assert_array_equal(plain.obs[:, 0], trajs.obs[:, 0])
    assert not np.allclose(plain.obs[:, 1:], trajs.obs[:, 1:])  # the memory experts acted
