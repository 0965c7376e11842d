"""The world model on real Ray Serve (local cluster, HTTP on 127.0.0.1): same answers as the
in-process model, batching, strict validation, hot swap and replica recovery."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from jsonschema import Draft202012Validator

import moedream.envs._compat  # noqa: F401  (numpy aliases before overcooked_ai_py; see report)
from moedream.envs import env_spec
from moedream.platform.serve.client import ServeRequestError, WorldModelClient
from moedream.platform.serve.schemas import random_plan
from moedream.world_model.model import WorldModel
from moedream.world_model.trajectory import Trajectories
from tests.world_models import served_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

ROOT = Path(__file__).resolve().parents[2]
USER_CONFIG = {
    "max_batch_size": 8,
    "batch_wait_timeout_s": 0.05,
    "max_horizon": 8,
    "max_batch": 16,
    "max_num_samples": 4,
    "max_body_bytes": 50_000,
    # Bit-identical answers need the same torch thread count in the replica as in this
    # process (intra-op splits change float32 rounding in the last bit).
    "num_threads": torch.get_num_threads(),
}


# Serve notices a dead replica at its next health check (default every 10 s): checking
# every second lets the killed-replica test see the recovery without waiting that out.
HEALTH_CHECK_PERIOD_S = 1.0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    spec = env_spec("overcooked")
    root = tmp_path_factory.mktemp("serve_ckpt")
    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        paths[name] = str(WorldModel(served_config(), spec).save(root / name / "x.safetensors"))
    return paths


@pytest.fixture(scope="module")
def direct(checkpoints):
    return {name: WorldModel.load(path).eval() for name, path in checkpoints.items()}


def deploy_config(checkpoint: str, port: int, args_checkpoint: str | None = None) -> None:
    """`serve deploy cluster/serve/world_model_local.yaml` with this test's checkpoint and
    limits (what the CLI sends over REST, sent to the controller directly: no dashboard here).
    Deploying again with only user_config changed reconfigures the live replica in place."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "cluster" / "serve" / "world_model_local.yaml").read_text())
    config["http_options"]["port"] = port
    (app,) = config["applications"]
    app["args"]["checkpoint"] = args_checkpoint or checkpoint  # args changes rebuild the app
    (deployment,) = app["deployments"]
    deployment["health_check_period_s"] = HEALTH_CHECK_PERIOD_S
    deployment["user_config"] = {
        **deployment["user_config"],
        **USER_CONFIG,
        "checkpoint": checkpoint,
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)


def wait_running(serve, app_name: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while serve.status().applications.get(app_name) is None or (
        serve.status().applications[app_name].status != "RUNNING"
    ):
        assert time.time() < deadline, serve.status()
        time.sleep(0.5)


@pytest.fixture(scope="module")
def served(serve_on_loopback, checkpoints):
    from ray import serve

    from moedream.platform.serve import APP_NAME, DEPLOYMENT_NAME

    port = serve_on_loopback
    deploy_config(checkpoints["a"], port)
    wait_running(serve, APP_NAME)
    url = f"http://127.0.0.1:{port}"
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
    yield {
        "handle": handle,
        "url": url,
        "client": WorldModelClient(url),
        "serve": serve,
        "port": port,
    }
    serve.delete(APP_NAME)


def request(spec, batch=2, horizon=3, seed=7, **extra):
    rng = np.random.default_rng(seed)
    return {
        "start_obs": rng.normal(size=(batch, spec.n_agents, spec.obs_dim)).astype(np.float32),
        "actions": rng.integers(0, 6, size=(batch, horizon, spec.n_agents)),
        "horizon": horizon,
        "seed": seed,
        **extra,
    }


def imagine_direct(model, req, *, num_samples=1, plan=None):
    start = np.repeat(req["start_obs"], num_samples, 0)
    plan = np.repeat(req["actions"], num_samples, 0) if plan is None else plan
    return model.imagine(
        start, plan, req["horizon"], generator=torch.Generator().manual_seed(req["seed"])
    )


def assert_same(result, traj: Trajectories):
    for field in ("obs", "action", "reward", "terminated", "uncertainty", "obs_std"):
        np.testing.assert_array_equal(
            np.asarray(result[field], dtype=np.float32), getattr(traj, field), err_msg=field
        )


def test_routes_info_health_and_openapi(served, direct):
    client = served["client"]
    assert client.health()["status"] == "ok"
    info = client.info()
    spec = direct["a"].spec
    assert info["env"]["agent_ids"] == list(spec.agent_ids)
    assert info["env"]["obs_shape"] == [spec.n_agents, spec.obs_dim]
    assert info["model_config"]["d_model"] == 32
    assert info["limits"]["max_horizon"] == USER_CONFIG["max_horizon"]
    assert len(info["checkpoint"]["id"]) == 16
    paths = requests.get(served["url"] + "/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/imagine", "/v1/step", "/v1/info", "/healthz"} <= set(paths)
    schema = paths["/v1/imagine"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("ImagineRequest")


def test_openapi_is_the_served_models_and_its_examples_are_accepted(served, direct):
    url = served["url"]
    doc = requests.get(url + "/openapi.json", timeout=30).json()
    schemas = doc["components"]["schemas"]
    for path, name in (("/v1/imagine", "ImagineRequest"), ("/v1/step", "StepRequest"),
                       ("/v1/episodes", "EpisodeRequest")):  # fmt: skip
        operation = doc["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
        assert {"200", "400", "413", "422"} <= set(operation["responses"]), path
        schema = Draft202012Validator({**doc, "$ref": body["$ref"]})
        for example in schemas[name]["examples"]:
            schema.validate(example)
            response = requests.post(url + path, json=example, timeout=120)
            assert response.status_code == 200, (path, response.text[:300])
    imagine = schemas["ImagineRequest"]
    assert imagine["properties"]["horizon"]["maximum"] == USER_CONFIG["max_horizon"]
    assert f"D = {direct['a'].spec.obs_dim}" in imagine["description"]
    over = {**imagine["examples"][0], "horizon": USER_CONFIG["max_horizon"] + 1}
    assert not Draft202012Validator({**doc, "$ref": "#/components/schemas/ImagineRequest"}
                                    ).is_valid(over)  # fmt: skip
    response = requests.post(url + "/v1/imagine", json=over, timeout=30)
    assert response.status_code == 422 and response.json()["field"] == "horizon", response.text
    summary = doc["paths"]["/v1/episodes"]["get"]["responses"]["200"]["content"]
    summary_ref = summary["application/json"]["schema"]["$ref"]
    cache = requests.get(url + "/v1/episodes", timeout=30).json()
    Draft202012Validator({**doc, "$ref": summary_ref}).validate(cache)
    assert "example-episode" in cache["episodes"]


def test_handle_and_http_match_direct_imagine(served, direct):
    model = direct["a"]
    req = request(model.spec)
    expected = imagine_direct(model, req)
    by_handle = served["handle"].imagine.remote(req).result()
    assert_same(by_handle, expected)
    by_http = served["client"].imagine(req["start_obs"], req["actions"], horizon=3, seed=7)
    assert_same(dataclass_dict(by_http), expected)
    assert by_handle["agent_ids"] == list(model.spec.agent_ids)
    # a different seed gives a different rollout
    other = served["handle"].imagine.remote({**req, "seed": 8}).result()
    assert not np.array_equal(other["obs"], by_handle["obs"])
    # num_samples repeats the rows; per-agent mapping input is the same request
    per_agent = {a: req["start_obs"][:, i].tolist() for i, a in enumerate(model.spec.agent_ids)}
    sampled = (
        served["handle"].imagine.remote({**req, "start_obs": per_agent, "num_samples": 2}).result()
    )
    assert_same(sampled, imagine_direct(model, req, num_samples=2))
    # policy "random" is the seeded plan of random_plan
    rnd = served["client"].imagine_json({"start_obs": req["start_obs"].tolist(), "policy": "random",
                                         "horizon": 3, "seed": 3})  # fmt: skip
    plan = random_plan(model.spec, 2, 3, 3)
    assert_same(rnd, imagine_direct(model, {**req, "seed": 3}, plan=plan))


def dataclass_dict(traj: Trajectories) -> dict:
    return {
        k: getattr(traj, k)
        for k in ("obs", "action", "reward", "terminated", "uncertainty", "obs_std")
    }


def test_step_matches_direct(served, direct):
    model = direct["a"]
    req = request(model.spec, batch=3, horizon=1)
    action = req["actions"][:, 0]
    expected = model.step(req["start_obs"], action, generator=torch.Generator().manual_seed(7))
    got = served["client"].step(req["start_obs"], action, seed=7)
    by_handle = (
        served["handle"]
        .step.remote({"obs": req["start_obs"], "action": action, "seed": 7})
        .result()
    )
    for key in ("next_obs", "reward", "terminated", "uncertainty"):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
        np.testing.assert_array_equal(by_handle[key], expected[key], err_msg=key)


def test_concurrent_requests_are_batched_without_changing_results(served, direct):
    model, handle = direct["a"], served["handle"]
    before = handle.stats.remote().result()["batch_size_histogram"]
    reqs = [request(model.spec, batch=1, horizon=1, seed=s) for s in range(16)]
    responses = [handle.imagine.remote(r) for r in reqs]  # all in flight at once
    results = [r.result() for r in responses]
    stats = handle.stats.remote().result()
    new = {int(k): v - before.get(k, 0) for k, v in stats["batch_size_histogram"].items()}
    assert max(k for k, v in new.items() if v > 0) > 1, stats
    for i in (0, 7, 15):  # batching never changes an answer
        assert_same(results[i], imagine_direct(model, reqs[i]))
    # concurrent HTTP requests batch too
    client_reqs = [request(model.spec, batch=1, horizon=1, seed=s) for s in range(8)]

    def call(r):
        return WorldModelClient(served["url"]).imagine_json(
            {
                "start_obs": r["start_obs"].tolist(),
                "actions": r["actions"].tolist(),
                "horizon": 1,
                "seed": r["seed"],
            }
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        http_results = list(pool.map(call, client_reqs))
    assert_same(http_results[3], imagine_direct(model, client_reqs[3]))
    assert handle.stats.remote().result()["failed_requests"] == 0


def bad_requests(spec):
    n, d = spec.n_agents, spec.obs_dim
    obs = np.zeros((1, n, d)).tolist()
    good = {"start_obs": obs, "actions": [[[0] * n]], "horizon": 1}
    nan_obs = json.loads(json.dumps(obs))
    nan_obs[0][1][3] = float("nan")
    inf_obs = json.loads(json.dumps(obs))
    inf_obs[0][0][0] = float("inf")
    str_obs = json.loads(json.dumps(obs))
    str_obs[0][1][2] = "1.5"
    bool_obs = json.loads(json.dumps(obs))
    bool_obs[0][0][5] = True
    ragged = json.loads(json.dumps(obs))
    ragged[0][1] = ragged[0][1][:-1]
    per_agent = {a: np.zeros((1, d)).tolist() for a in spec.agent_ids}
    return [
        # (name, body (dict or raw bytes), expected status, text the message must contain)
        (
            "wrong agent count",
            {**good, "start_obs": np.zeros((1, n + 1, d)).tolist()},
            422,
            "start_obs",
        ),
        (
            "wrong obs size",
            {**good, "start_obs": np.zeros((1, n, d - 1)).tolist()},
            422,
            "start_obs",
        ),
        ("flat obs", {**good, "start_obs": [1.0, 2.0]}, 422, "start_obs"),
        ("NaN", {**good, "start_obs": nan_obs}, 422, "start_obs[0][1][3]"),
        ("Infinity", {**good, "start_obs": inf_obs}, 422, "start_obs[0][0][0]"),
        ("string number", {**good, "start_obs": str_obs}, 422, "start_obs[0][1][2]"),
        ("boolean", {**good, "start_obs": bool_obs}, 422, "start_obs[0][0][5]"),
        ("ragged", {**good, "start_obs": ragged}, 422, "start_obs"),
        (
            "unknown agent",
            {**good, "start_obs": {**per_agent, "chef_9": per_agent["agent_0"]}},
            422,
            "chef_9",
        ),
        ("missing agent", {**good, "start_obs": {"agent_0": per_agent["agent_0"]}}, 422, "agent_1"),
        (
            "horizon too long",
            {**good, "horizon": 99, "policy": "random", "actions": None},
            422,
            "horizon",
        ),
        ("horizon zero", {**good, "horizon": 0}, 422, "horizon"),
        ("horizon string", {**good, "horizon": "3"}, 422, "horizon"),
        ("plan too short", {**good, "horizon": 2}, 422, "actions"),
        ("action out of range", {**good, "actions": [[[0, 6]]]}, 422, "actions"),
        ("no plan", {"start_obs": obs, "horizon": 1}, 422, "actions"),
        ("batch too large", {**good, "start_obs": np.zeros((17, n, d)).tolist()}, 422, "start_obs"),
        ("too many samples", {**good, "num_samples": 5}, 422, "num_samples"),
        ("negative seed", {**good, "seed": -1}, 422, "seed"),
        ("NaN noise", {**good, "noise_scale": float("nan")}, 422, "noise_scale"),
        ("bad scheduler", {**good, "sampler": {"scheduler": "euler"}}, 422, "sampler.scheduler"),
        ("incompatible scheduler", {**good, "sampler": {"scheduler": "ddim"}}, 422, "sampler"),
        ("unknown field", {**good, "horizn": 3}, 422, "horizn"),
        (
            "body too large",
            {**good, "start_obs": np.random.default_rng(0).normal(size=(16, n, d)).tolist()},
            413,
            "max_body_bytes",
        ),
        ("not json", b"{start_obs: [", 400, "body"),
        ("json list", b"[1, 2]", 422, "body"),
    ]


def test_bad_requests_get_4xx_naming_the_field_and_serving_continues(served, direct):
    spec = direct["a"].spec
    url = served["url"] + "/v1/imagine"
    for name, body, status, needle in bad_requests(spec):
        if isinstance(body, bytes):
            response = requests.post(
                url, data=body, headers={"content-type": "application/json"}, timeout=30
            )
        else:
            body = {k: v for k, v in body.items() if v is not None}
            response = requests.post(url, data=json.dumps(body), headers={"content-type": "application/json"},
                                     timeout=30)  # fmt: skip
        assert response.status_code == status, (name, response.status_code, response.text[:300])
        assert needle in response.json()["error"], (name, response.json())
    # a chunked body (no Content-Length) is counted as it arrives
    chunks = iter([b"[" + b"0," * 15_000] * 4)
    response = requests.post(
        url, data=chunks, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 413 and "at least" in response.json()["error"], response.text
    # step validates as well; the client raises with the server's message
    with pytest.raises(ServeRequestError, match=r"action.*shape") as err:
        served["client"].step(np.zeros((1, spec.n_agents, spec.obs_dim)), np.zeros((1, 3)))
    assert err.value.status == 422
    # the handle path raises the same errors
    with pytest.raises(Exception, match=r"start_obs\[0\]\[1\]\[3\]"):
        served["handle"].imagine.remote(
            {**request(spec), "start_obs": bad_requests(spec)[3][1]["start_obs"]}
        ).result()
    # and a good request still succeeds
    req = request(spec, batch=1, horizon=2)
    assert_same(served["handle"].imagine.remote(req).result(), imagine_direct(direct["a"], req))
    assert served["client"].health()["status"] == "ok"


class Traffic:
    """Keeps requests flowing through the handle in a thread; records every outcome."""

    def __init__(self, handle, req):
        self.handle, self.req = handle, req
        self.ok: list[tuple[float, str]] = []
        self.errors: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                result = self.handle.imagine.remote(self.req).result(timeout_s=60)
                self.ok.append((time.time(), result["checkpoint_id"]))
            except Exception as err:  # noqa: BLE001 - recorded and asserted on
                self.errors.append((time.time(), repr(err)[:300]))
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=90)


def test_hot_swap_through_reconfigure_drops_no_request(served, checkpoints, direct):
    handle = served["handle"]
    spec = direct["a"].spec
    req = request(spec, batch=1, horizon=2)
    old_id = handle.info.remote().result()["checkpoint"]["id"]
    old_replica = handle.stats.remote().result()["replica_id"]
    with Traffic(handle, req) as traffic:
        time.sleep(1.0)
        deploy_config(checkpoints["b"], served["port"], args_checkpoint=checkpoints["a"])
        deadline = time.time() + 90
        while handle.info.remote().result()["checkpoint"]["id"] == old_id:
            assert time.time() < deadline, "the new checkpoint never came in"
            time.sleep(0.5)
        time.sleep(1.0)
    assert not traffic.errors, traffic.errors[:3]
    ids = [cid for _, cid in traffic.ok]
    assert ids[0] == old_id and ids[-1] != old_id, ids
    result = handle.imagine.remote(req).result()
    assert_same(result, imagine_direct(direct["b"], req))
    assert not np.array_equal(result["obs"], imagine_direct(direct["a"], req).obs)
    # swapped in place by reconfigure: the same replica, no restart
    assert handle.stats.remote().result()["replica_id"] == old_replica


@pytest.mark.slow
def test_killed_replica_recovers(served, direct):
    import ray

    handle = served["handle"]
    spec = direct["a"].spec
    req = request(spec, batch=1, horizon=1)
    before = handle.stats.remote().result()  # the replica's own actor name and id
    with Traffic(handle, req) as traffic:
        time.sleep(1.0)
        ray.kill(ray.get_actor(before["actor_name"], namespace="serve"), no_restart=True)
        killed_at = time.time()
        deadline = killed_at + 120
        while not [t for t, _ in traffic.ok if t > killed_at + 1.0]:
            assert time.time() < deadline, (
                f"no success after the kill; errors: {traffic.errors[-3:]}"
            )
            time.sleep(0.5)
        time.sleep(1.0)
    after = [t for t, _ in traffic.ok if t > killed_at]
    assert len(after) >= 2
    late_errors = [e for t, e in traffic.errors if t > after[0]]
    assert not late_errors, late_errors[:3]
    results = [handle.imagine.remote(req) for _ in range(4)]
    for r in results:
        assert r.result()["checkpoint_id"]
    after_stats = handle.stats.remote().result()
    assert after_stats["actor_id"] != before["actor_id"]
    assert after_stats["checkpoint_id"] == before["checkpoint_id"]  # reloaded the same model


def test_serve_config_files_pass_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    for name in ("world_model.yaml", "world_model_local.yaml"):
        config = yaml.safe_load((ROOT / "cluster" / "serve" / name).read_text())
        schema = ServeDeploySchema.model_validate(config)
        (app,) = schema.applications
        assert app.import_path == "moedream.platform.serve:build_app"
        (deployment,) = app.deployments
        assert deployment.name == "WorldModelDeployment"
        assert deployment.max_ongoing_requests >= deployment.user_config.get("max_batch_size", 8)
    local = yaml.safe_load((ROOT / "cluster" / "serve" / "world_model_local.yaml").read_text())
    assert local["http_options"]["host"] == "127.0.0.1"
    assert "resources" not in local["applications"][0]["deployments"][0]["ray_actor_options"]
