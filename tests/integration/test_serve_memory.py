"""The memory world model on Ray Serve: per-episode memory (history, spatial memory, LoRA
adapter) multiplexed by episode id, bounded by LRU eviction, equal to the in-process API."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
import torch

from moedream.envs.memory_task import MemoryTaskConfig, random_episodes
from moedream.platform.serve.schemas import RequestError
from moedream.world_model.diffusion import DiffusionConfig, SamplerConfig
from moedream.world_model.memory import MemoryConfig, MemoryStore
from moedream.world_model.memory.checkpoint import load_memory_checkpoint, save_memory_checkpoint
from moedream.world_model.memory.predictor import ComposedPredictor
from moedream.world_model.memory.rollout import EpisodeMemory, imagine
from moedream.world_model.memory.task_eval import episode_history, train_on_task

pytestmark = pytest.mark.integration

TASK = MemoryTaskConfig(cue_delay=12)  # 13 steps per episode
MEMORY = MemoryConfig(
    embed_dim=16, lora_rank=4, lora_steps=40, lora_lr=5e-3,
    alpha_short=1.0, alpha_long=1.0, alpha_spatial=1.0,
)  # fmt: skip
MAX_EPISODES = 3
FINETUNE_EVERY = 10
SEED = 11
LORA_STEPS = 100  # test-time finetune steps (the checkpoint's config says 40)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny memory network trained for a few hundred steps (~10 s), saved with its configs."""
    result = train_on_task(
        TASK,
        MEMORY,
        DiffusionConfig(objective="v", hidden=32, layers=1, time_embed_dim=16),
        SamplerConfig(scheduler="ddim", num_steps=3, clip=1.0),
        episodes=40,
        steps=300,
        batch_size=128,
        lr=3e-3,
    )
    path = save_memory_checkpoint(
        tmp_path_factory.mktemp("memory_ckpt"), result.net, result.sampler.cfg
    )
    return {"path": str(path), "result": result}


@pytest.fixture(scope="module")
def served(ray_cluster, trained):
    from ray import serve
    from ray.serve.context import _get_global_client

    from moedream.platform.serve.memory_app import MEMORY_DEPLOYMENT_NAME, build_memory_app

    name = f"memory_{uuid.uuid4().hex[:8]}"
    app = build_memory_app(
        {
            "checkpoint": trained["path"],
            "max_episodes": MAX_EPISODES,
            "finetune_every": FINETUNE_EVERY,
            "finetune_seed": SEED,
            "lora_steps": LORA_STEPS,
            "num_threads": 1,
        }
    )
    start = time.perf_counter()
    serve.run(app, name=name, route_prefix=f"/{name}")
    handle = serve.get_deployment_handle(MEMORY_DEPLOYMENT_NAME, app_name=name)
    print(f"deployed in {time.perf_counter() - start:.1f}s")
    port = _get_global_client().http_config.port  # wherever this session's Serve proxy listens
    handle.url = f"http://127.0.0.1:{port}/{name}"
    yield handle
    serve.delete(name)


def episodes(n: int, seed: int):
    return random_episodes(TASK, n, seed=seed)


def on(handle, episode_id: str):
    return handle.options(multiplexed_model_id=episode_id)


def observe_request(ep, lo: int, hi: int) -> dict:
    """Steps lo..hi-1 of ``ep``; from lo = 0 the request starts with o_0."""
    first = lo if lo == 0 else lo + 1
    return {
        "obs": ep["obs"][first : hi + 1],
        "actions": ep["actions"][lo:hi],
        "positions": ep["positions"][first : hi + 1],
    }


def imagine_request(ep, lo: int, horizon: int, seed: int, experts=None, start=None) -> dict:
    req = {
        "actions": ep["actions"][lo : lo + horizon],
        "positions": ep["positions"][lo + 1 : lo + 1 + horizon],
        "horizon": horizon,
        "seed": seed,
    }
    if experts is not None:
        req["experts"] = experts
    if start is not None:
        req["start"] = start
    return req


def in_process(trained, ep, steps: int, request: dict, experts) -> np.ndarray:
    """What the deployment should answer to ``request`` after observing ``steps`` steps of
    ``ep``, computed with the in-process API (same seeds)."""
    net = load_memory_checkpoint(trained["path"]).net
    sampler = trained["result"].sampler
    store = MemoryStore(net, net.cfg.replace(lora_steps=LORA_STEPS))
    hist = episode_history(ep, TASK)
    with torch.random.fork_rng(devices=[]):  # the deployment's finetune seeding (k = 0)
        torch.manual_seed(SEED)
        store.finetune("x", hist.prefix(steps), generator=torch.Generator().manual_seed(SEED))
    memory = EpisodeMemory(net.cfg, n_agents=2, obs_dim=TASK.obs_dim, action_dim=net.action_dim,
                           episode_id="x")  # fmt: skip
    memory.reset(hist.obs[0], hist.positions[0])
    for t in range(steps):
        memory.observe(hist.actions[t], hist.obs[t + 1], hist.positions[t + 1])
    predictor = ComposedPredictor(net, net.cfg.only(*experts), store)
    actions = torch.eye(net.action_dim)[torch.as_tensor(request["actions"])]  # [H, N, A]
    positions = torch.as_tensor(request["positions"], dtype=torch.float32)  # [H, N, P]
    gen = torch.Generator().manual_seed(request["seed"])
    out = imagine(predictor, sampler, [memory], actions[None], positions[None], generator=gen)
    return out.numpy()  # [1, H, N, D]


def test_episodes_keep_separate_adapters_equal_to_in_process(served, trained):
    ep_a, ep_b = episodes(2, seed=500)
    experts = ["short", "long", "spatial"]
    out = on(served, "ep-a").observe.remote(observe_request(ep_a, 0, FINETUNE_EVERY)).result()
    assert out["fresh"] and out["finetuned"] and out["adapter"]
    assert out["memory_steps"] == FINETUNE_EVERY
    req = imagine_request(ep_a, FINETUNE_EVERY, 3, seed=5, experts=experts)
    a_before = on(served, "ep-a").imagine.remote(req).result()
    out_b = on(served, "ep-b").observe.remote(observe_request(ep_b, 0, FINETUNE_EVERY)).result()
    assert out_b["finetuned"] and out_b["fresh"]
    a_after = on(served, "ep-a").imagine.remote(req).result()
    np.testing.assert_array_equal(a_before["obs"], a_after["obs"])  # b's finetune left a alone
    assert a_after["obs"].shape == (1, 3, 2, TASK.obs_dim) and a_after["adapter"]
    # same request on b's memory: a different answer
    b = on(served, "ep-b").imagine.remote(req).result()
    assert np.abs(b["obs"] - a_after["obs"]).max() > 1e-3
    # both equal the in-process MemoryStore / ComposedPredictor / imagine with the same seeds
    for ep, got in ((ep_a, a_after), (ep_b, b)):
        want = in_process(trained, ep, FINETUNE_EVERY, req, experts)
        np.testing.assert_allclose(got["obs"], want, rtol=1e-4, atol=1e-5)


def test_memory_follows_the_episode_across_requests(served):
    """Imagining the episode's own steps from o_0 with the long-term expert alone: before
    observe (no adapter) vs after observe (the adapter finetuned on those steps)."""
    (ep,) = episodes(1, seed=900)
    h = FINETUNE_EVERY
    start = {"obs": ep["obs"][0], "positions": ep["positions"][0]}
    req = imagine_request(ep, 0, h, seed=3, experts=["long"], start=start)
    truth = ep["obs"][1 : h + 1]

    def error(out):
        return float(((out["obs"] - truth) ** 2).mean())

    before = on(served, "ep-probe").imagine.remote(req).result()
    assert before["fresh"] and not before["adapter"] and before["memory_steps"] == 0
    obs = on(served, "ep-probe").observe.remote(observe_request(ep, 0, h)).result()
    assert obs["finetuned"] and obs["lora/loss_last"] < obs["lora/loss_first"]
    after = on(served, "ep-probe").imagine.remote(req).result()
    assert after["adapter"] and after["memory_steps"] == h
    print(f"long-only rollout MSE before {error(before):.4f} after {error(after):.4f}")
    assert error(after) < 0.8 * error(before), (error(before), error(after))
    # fewer new steps than finetune_every: appended, no finetune yet
    more = on(served, "ep-probe").observe.remote(observe_request(ep, h, h + 2)).result()
    assert more["memory_steps"] == h + 2 and not more["finetuned"] and not more["fresh"]


def test_eviction_forgets_the_least_recently_used_episode(served):
    (ep,) = episodes(1, seed=1200)
    # touch ep-b and ep-probe so that ep-a is the least recently used of the three held
    for eid in ("ep-b", "ep-probe"):
        on(served, eid).imagine.remote(imagine_request(ep, 0, 1, seed=0)).result()
    stats = served.stats.remote().result()
    assert stats["episodes_held"] == MAX_EPISODES and stats["episodes"][0] == "ep-a", stats
    evictions = stats["evictions"]
    out = on(served, "ep-c").observe.remote(observe_request(ep, 0, FINETUNE_EVERY)).result()
    assert out["fresh"] and out["adapter"]
    stats = served.stats.remote().result()
    assert stats["evictions"] == evictions + 1, stats
    assert "ep-a" not in stats["episodes"] and "ep-a" not in stats["adapters"], stats
    assert stats["episodes_held"] == MAX_EPISODES and len(stats["adapters"]) <= MAX_EPISODES
    # ep-a comes back fresh: no history, no adapter
    with pytest.raises(Exception, match="has no memory"):
        on(served, "ep-a").imagine.remote(imagine_request(ep, 0, 2, seed=0)).result()
    start = {"obs": ep["obs"][0], "positions": ep["positions"][0]}
    back = on(served, "ep-a").imagine.remote(imagine_request(ep, 0, 2, 0, start=start)).result()
    assert back["memory_steps"] == 0 and back["fresh"] and not back["adapter"]
    # forget drops an episode's memory on request
    gone = on(served, "ep-c").forget.remote().result()
    assert gone["forgot_steps"] == FINETUNE_EVERY
    assert "ep-c" not in served.stats.remote().result()["adapters"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"experts": ["short", "telepathy"]}, r"experts\[1\].*'telepathy' is not an expert"),
        ({"positions": np.zeros((2, 2, 3))}, r"positions: has shape \[2, 2, 3\], expected"),
        ({"actions": np.full((2, 2), 99)}, r"actions: action indices must be in \[0, 7\]"),
        ({"horizon": 0}, r"horizon: is 0: must be an integer in \[1, 64\]"),
        ({"colour": 1}, r"colour: is not a imagine field"),
    ],
)
def test_bad_requests_get_clear_errors_and_serving_continues(served, change, match):
    (ep,) = episodes(1, seed=1500)
    start = {"obs": ep["obs"][0], "positions": ep["positions"][0]}
    req = {**imagine_request(ep, 0, 2, seed=0, start=start), **change}
    with pytest.raises(RequestError, match=match):  # the replica's error type reaches the caller
        on(served, "ep-bad").imagine.remote(req).result()
    with pytest.raises(Exception, match=r"obs: has shape"):
        on(served, "ep-bad").observe.remote(
            {**observe_request(ep, 0, 2), "obs": ep["obs"][:3, :1]}
        ).result()
    with pytest.raises(Exception, match="episode_id: is missing"):
        served.imagine.remote(req).result()
    ok = on(served, "ep-bad").imagine.remote(imagine_request(ep, 0, 2, 0, start=start)).result()
    assert ok["obs"].shape == (1, 2, 2, TASK.obs_dim) and np.isfinite(ok["obs"]).all()


def test_http_routes_carry_the_episode_in_the_header(served):
    import requests

    (ep,) = episodes(1, seed=1800)
    headers = {"serve_multiplexed_model_id": "ep-http"}
    body = {k: v.tolist() for k, v in observe_request(ep, 0, 4).items()}
    out = requests.post(f"{served.url}/v1/observe", json=body, headers=headers, timeout=60)
    assert out.status_code == 200, out.text
    assert out.json()["memory_steps"] == 4 and out.json()["fresh"]
    req = {k: v.tolist() if isinstance(v, np.ndarray) else v
           for k, v in imagine_request(ep, 4, 2, seed=1).items()}  # fmt: skip
    got = requests.post(f"{served.url}/v1/imagine", json=req, headers=headers, timeout=60)
    assert got.status_code == 200, got.text
    assert np.asarray(got.json()["obs"]).shape == (1, 2, 2, TASK.obs_dim)
    handle_answer = on(served, "ep-http").imagine.remote(imagine_request(ep, 4, 2, seed=1))
    np.testing.assert_allclose(got.json()["obs"], handle_answer.result()["obs"], rtol=1e-6)
    bad = requests.post(f"{served.url}/v1/imagine", json={**req, "experts": ["x"]},
                        headers=headers, timeout=60)  # fmt: skip
    assert bad.status_code == 422 and bad.json()["field"] == "experts[0]", bad.text
    missing = requests.post(f"{served.url}/v1/imagine", json=req, timeout=60)
    assert missing.status_code == 422 and missing.json()["field"] == "episode_id", missing.text
