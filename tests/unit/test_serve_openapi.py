"""The served OpenAPI schema agrees with the server's own parsers (no Ray): its examples parse,
and requests that break a declared bound fail both the schema and the parser, on the field."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
from jsonschema import Draft202012Validator
from pydantic.json_schema import models_json_schema

from moedream.envs.spec import EnvSpec
from moedream.platform.serve.openapi import served_openapi
from moedream.platform.serve.schemas import (
    EpisodeRequest,
    ImagineRequest,
    RequestError,
    ServeConfig,
    StepRequest,
    parse_episode,
    parse_imagine,
    parse_step,
)
from moedream.world_model.model import WorldModelConfig

THREE_DISCRETE = EnvSpec("toy_three", ("a", "b", "c"), (4, 2, 3), "discrete", (5, 3, 2))
TWO_CONTINUOUS = EnvSpec("toy_arm", ("left", "right"), (3, 5), "continuous", (2, 1))
LIMITS = ServeConfig(max_horizon=5, max_batch=6, max_num_samples=3, max_sampler_steps=10)
MODEL = WorldModelConfig()
PARSERS: dict[str, Callable] = {
    "ImagineRequest": lambda body, spec: parse_imagine(body, spec, MODEL, LIMITS),
    "StepRequest": lambda body, spec: parse_step(body, spec, MODEL, LIMITS),
    "EpisodeRequest": lambda body, spec: parse_episode(body, spec),
}


def served_schema(spec: EnvSpec) -> dict:
    """What a replica serving ``spec`` under LIMITS puts at /openapi.json (components only;
    FastAPI builds them from the same pydantic models and reference template)."""
    models = [(m, "validation") for m in (ImagineRequest, StepRequest, EpisodeRequest)]
    _, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    return served_openapi({"components": {"schemas": top["$defs"]}}, spec, LIMITS)


def validator(doc: dict, name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", **doc})


@pytest.mark.parametrize("spec", [THREE_DISCRETE, TWO_CONTINUOUS], ids=lambda s: s.env_name)
def test_every_example_is_valid_and_the_server_parses_it(spec):
    doc = served_schema(spec)
    for name, parse in PARSERS.items():
        examples = doc["components"]["schemas"][name]["examples"]
        assert examples, name
        for example in examples:
            validator(doc, name).validate(example)
            parse(copy.deepcopy(example), spec)


def test_bounds_are_the_models_and_the_deployments():
    doc = served_schema(THREE_DISCRETE)
    schemas = doc["components"]["schemas"]
    imagine = schemas["ImagineRequest"]
    assert imagine["required"] == ["start_obs", "horizon"]
    horizon = imagine["properties"]["horizon"]
    assert (horizon["type"], horizon["minimum"], horizon["maximum"]) == ("integer", 1, 5)
    assert imagine["properties"]["num_samples"]["maximum"] == 3
    joint_obs, by_agent = imagine["properties"]["start_obs"]["anyOf"]
    assert (joint_obs["minItems"], joint_obs["maxItems"]) == (1, 6)  # rows <= max_batch
    assert joint_obs["items"]["minItems"] == joint_obs["items"]["maxItems"] == 3  # N
    assert joint_obs["items"]["items"]["maxItems"] == 4  # D, padded
    assert by_agent["required"] == ["a", "b", "c"] and not by_agent["additionalProperties"]
    indices = imagine["properties"]["actions"]["anyOf"][1]["items"]["items"]  # [B, H, N]
    assert [i["maximum"] for i in indices["prefixItems"]] == [4, 2, 1]  # action_dims - 1
    assert imagine["properties"]["actions"]["anyOf"][-1] == {"type": "null"}
    assert schemas["StepRequest"]["required"] == ["obs", "action"]
    assert schemas["EpisodeRequest"]["properties"]["obs"]["anyOf"][0]["minItems"] == 2
    assert "N = 3 agents ['a', 'b', 'c']" in imagine["description"]


def _set(path: tuple, value) -> Callable[[dict], None]:
    def change(body: dict) -> None:
        *parents, last = path
        for key in parents:
            body = body[key]
        body[last] = value

    return change


def _drop(key: str) -> Callable[[dict], None]:
    return lambda body: body.pop(key)


ROW = [[0.0] * 4] * 3  # one [N, D] row of THREE_DISCRETE
BROKEN = [  # (body, change, field the server names)
    ("ImagineRequest", _set(("horizon",), 6), "horizon"),
    ("ImagineRequest", _set(("horizon",), 0), "horizon"),
    ("ImagineRequest", _set(("num_samples",), 4), "num_samples"),
    ("ImagineRequest", _set(("seed",), -1), "seed"),
    ("ImagineRequest", _set(("actions", 0, 1, 2), 2), "actions"),  # agent c has 2 actions
    ("ImagineRequest", _set(("actions", 0, 0, 0), -1), "actions"),
    ("ImagineRequest", _drop("actions"), "actions"),
    ("ImagineRequest", _set(("policy",), "random"), "actions"),  # random with a plan
    ("ImagineRequest", _set(("start_obs", 0, 1), [0.0] * 5), "start_obs"),  # D + 1
    ("ImagineRequest", _set(("start_obs", 0), ROW + [[0.0] * 4]), "start_obs"),  # N + 1
    ("ImagineRequest", _set(("start_obs",), [ROW] * 7), "start_obs"),  # rows > max_batch
    ("ImagineRequest", _set(("sampler",), {"num_steps": 11}), "sampler.num_steps"),
    (
        "ImagineRequest",
        _set(("context",), {"obs": [[ROW] * 6], "actions": [[[0] * 3] * 6]}),
        "context.obs",
    ),  # fmt: skip
    ("ImagineRequest", _set(("unknown",), 1), "unknown"),
    ("StepRequest", _set(("obs",), {"a": [[0.0] * 4], "b": [[0.0] * 2]}), "obs"),  # lacks c
    ("StepRequest", _set(("action", 0), [0, 0]), "action"),
    ("StepRequest", _set(("action", 0, 0), 5), "action"),
    ("EpisodeRequest", _set(("obs",), [ROW]), "obs"),  # one observation: no transition
    ("EpisodeRequest", _set(("episode_id",), "a b"), "episode_id"),
]


@pytest.mark.parametrize(
    ("name", "change", "field"), BROKEN, ids=lambda x: getattr(x, "__name__", x)
)
def test_a_request_breaking_a_declared_bound_fails_the_schema_and_the_server(name, change, field):
    doc = served_schema(THREE_DISCRETE)
    body = copy.deepcopy(doc["components"]["schemas"][name]["examples"][0])
    change(body)
    assert not validator(doc, name).is_valid(body), body
    with pytest.raises(RequestError) as err:
        PARSERS[name](body, THREE_DISCRETE)
    assert err.value.field.startswith(field) or field in str(err.value), str(err.value)


def test_continuous_actions_have_each_agents_width():
    doc = served_schema(TWO_CONTINUOUS)
    body = copy.deepcopy(doc["components"]["schemas"]["StepRequest"]["examples"][0])
    body["action"] = {"left": [[0.0, 0.0]], "right": [[0.0, 0.0]]}  # right has 1 action
    assert not validator(doc, "StepRequest").is_valid(body)
    with pytest.raises(RequestError, match=r"action\.right"):
        PARSERS["StepRequest"](body, TWO_CONTINUOUS)
    body["action"]["right"] = [[0.5]]
    validator(doc, "StepRequest").validate(body)
    PARSERS["StepRequest"](body, TWO_CONTINUOUS)
