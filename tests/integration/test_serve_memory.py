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
