"""The one imagine-request builder round-trips through the server's own parser (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moedream.envs.spec import EnvSpec
from moedream.platform.serve.request import imagine_request
from moedream.platform.serve.schemas import RequestError, ServeConfig, parse_imagine
from moedream.world_model.model import WorldModelConfig

CONTINUOUS = EnvSpec("toy_continuous", ("a0", "a1"), (3, 2), "continuous", (2, 1))
DISCRETE = EnvSpec("toy_discrete", ("a0", "a1"), (4, 4), "discrete", (5, 3))
MODEL = WorldModelConfig()
LIMITS = ServeConfig()


def _parse(request: dict, spec: EnvSpec):
    return parse_imagine(request, spec, MODEL, LIMITS)


def test_one_step_with_context_as_the_imaginer_sends_it():
    rng = np.random.default_rng(0)
    b, t = 5, 3
    start = rng.normal(size=(b, 2, 3)).astype(np.float32)
    action = rng.uniform(-1, 1, size=(b, 1, 2, 2)).astype(np.float32)
    context_obs = rng.normal(size=(b, t, 2, 3)).astype(np.float32)
    context_actions = rng.uniform(-1, 1, size=(b, t, 2, 2)).astype(np.float32)
    request = imagine_request(start, action, horizon=1, seed=11, context_obs=context_obs,
                              context_actions=context_actions)  # fmt: skip
    assert set(request) == {"start_obs", "actions", "horizon", "seed", "context"}
    assert request["start_obs"] is start  # handle callers send numpy as it is
    job = _parse(request, CONTINUOUS)
    np.testing.assert_array_equal(job.start, start)
    np.testing.assert_array_equal(job.plan, action)
    np.testing.assert_array_equal(job.context["obs"], context_obs)
    np.testing.assert_array_equal(job.context["action"], context_actions)
    assert (job.horizon, job.seed, job.noise_scale, job.sampler) == (1, 11, None, None)


def test_open_loop_replay_as_the_gate_sends_it():
    rng = np.random.default_rng(1)
    start = rng.normal(size=(4, 2, 3)).astype(np.float32)
    plan = rng.uniform(-1, 1, size=(4, 6, 2, 2)).astype(np.float32)
    request = imagine_request(start, plan, horizon=6, seed=8, noise_scale=0.75, as_lists=True)
    assert set(request) == {"start_obs", "actions", "horizon", "noise_scale", "seed"}
    assert isinstance(request["start_obs"], list) and isinstance(request["actions"], list)
    job = _parse(json.loads(json.dumps(request)), CONTINUOUS)  # JSON-ready as it is
    np.testing.assert_array_equal(job.start, start)
    np.testing.assert_array_equal(job.plan, plan)
    assert (job.horizon, job.seed, job.noise_scale, job.context) == (6, 8, 0.75, None)


def test_index_plans_samples_and_sampler_as_the_http_client_sends_them():
    rng = np.random.default_rng(2)
    start = rng.normal(size=(3, 2, 4))
    plan = np.stack([rng.integers(0, 5, (3, 2)), rng.integers(0, 3, (3, 2))], axis=-1)
    request = imagine_request(start, plan, horizon=2, seed=3, num_samples=2, policy="plan",
                              sampler={"num_steps": 2}, as_lists=True)  # fmt: skip
    job = _parse(json.loads(json.dumps(request)), DISCRETE)
    assert job.start.shape == (6, 2, 4) and job.plan.shape == (6, 2, 2)  # rows x num_samples
    np.testing.assert_array_equal(job.plan[::2], plan)
    assert job.sampler.num_steps == 2


def test_random_policy_needs_no_actions_and_a_half_context_is_the_servers_to_refuse():
    start = np.zeros((2, 2, 4), np.float32)
    job = _parse(imagine_request(start, horizon=4, seed=5, policy="random"), DISCRETE)
    assert job.plan.shape == (2, 4, 2)
    half = imagine_request(start, np.zeros((2, 1, 2), np.int64), horizon=1,
                           context_obs=np.zeros((2, 1, 2, 4), np.float32))  # fmt: skip
    with pytest.raises(RequestError, match="context.actions"):
        _parse(half, DISCRETE)


def test_mean_prediction_reaches_the_job_and_is_refused_with_memory_or_a_typo():
    start = np.zeros((2, 2, 3), np.float32)
    plan = np.zeros((2, 1, 2, 2), np.float32)
    job = _parse(imagine_request(start, plan, horizon=1, prediction="mean"), CONTINUOUS)
    assert job.prediction == "mean"
    assert _parse(imagine_request(start, plan, horizon=1), CONTINUOUS).prediction == "sample"
    with pytest.raises(RequestError, match="prediction"):
        _parse(imagine_request(start, plan, horizon=1, prediction="median"), CONTINUOUS)
    with_memory = imagine_request(start, plan, horizon=1, prediction="mean", episode_id="ep")
    with pytest.raises(RequestError, match="'mean' cannot compose an episode's memory"):
        _parse(with_memory, CONTINUOUS)
