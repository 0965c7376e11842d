"""The served model's OpenAPI schema: the request bodies with this model's shapes, action ranges,
the deployment's limits and ready-to-send examples filled in.

The pydantic models in :mod:`.schemas` can only say "nested lists of numbers": the number of
agents N, the padded observation size D, the action size A and each agent's action range belong
to the loaded checkpoint, and the limits (``max_horizon``, ``max_batch``, ...) to the
deployment's user_config. Each replica rebuilds its ``/openapi.json`` from the generic schema
with :func:`served_openapi` whenever it loads a model or a new user_config, so a client generated
from it sends requests this server accepts. What JSON Schema cannot say (the plan holds at least
``horizon`` steps; batch x num_samples rows <= max_batch; every agent of a mapping has the same
batch size) stays in the descriptions and is enforced by the parsers in :mod:`.schemas`.
Nothing here imports ray.
"""

from __future__ import annotations

import copy
from typing import Any

from moedream.envs.spec import EnvSpec
from moedream.platform.serve.schemas import MAX_SEED, ServeConfig

NUMBER = {"type": "number"}
EXAMPLE_HORIZON = 2
EXAMPLE_EPISODE_STEPS = 4
EXAMPLE_EPISODE_ID = "example-episode"

Axes = list[tuple[int, int | None]]
"""Leading array axes as (minItems, maxItems or None for no bound), outermost first."""


# ---------------------------------------------------------------------------------------------
# JSON Schema builders
# ---------------------------------------------------------------------------------------------


def _array(items: Any, min_items: int, max_items: int | None = None) -> dict[str, Any]:
    schema = {"type": "array", "items": items, "minItems": min_items}
    if max_items is not None:
        schema["maxItems"] = max_items
    return schema


def _under(item: dict[str, Any], axes: Axes) -> dict[str, Any]:
    """``item`` nested in arrays along ``axes`` (outermost first)."""
    for low, high in reversed(axes):
        item = _array(item, low, high)
    return item


def _index(size: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": 0, "maximum": size - 1}


def _agent_row(spec: EnvSpec) -> dict[str, Any]:
    """[N] discrete action indices, agent i's in [0, action_dims[i])."""
    n = spec.n_agents
    return {"type": "array", "prefixItems": [_index(k) for k in spec.action_dims],
            "items": False, "minItems": n, "maxItems": n}  # fmt: skip


def _by_agent(per_agent: list[dict[str, Any]], spec: EnvSpec) -> dict[str, Any]:
    """{agent_id: per-agent array}, every agent of the model, no other key."""
    return {
        "type": "object",
        "properties": dict(zip(spec.agent_ids, per_agent, strict=True)),
        "required": list(spec.agent_ids),
        "additionalProperties": False,
    }


def observations(spec: EnvSpec, axes: Axes) -> list[dict[str, Any]]:
    """[*axes, N, D] (padded) or {agent_id: [*axes, D_i]}."""
    joint = _under(_array(_array(NUMBER, spec.obs_dim, spec.obs_dim), spec.n_agents,
                          spec.n_agents), axes)  # fmt: skip
    per_agent = [_under(_array(NUMBER, d, d), axes) for d in spec.obs_dims]
    return [joint, _by_agent(per_agent, spec)]


def actions(spec: EnvSpec, axes: Axes) -> list[dict[str, Any]]:
    """[*axes, N, A] encoded, [*axes, N] indices (discrete), or {agent_id: [*axes] indices
    (discrete) | [*axes, A_i] (continuous)}."""
    n, a = spec.n_agents, spec.action_dim
    encoded = _under(_array(_array(NUMBER, a, a), n, n), axes)
    if spec.action_kind == "discrete":
        per_agent = [_under(_index(k), axes) for k in spec.action_dims]
        return [encoded, _under(_agent_row(spec), axes), _by_agent(per_agent, spec)]
    per_agent = [_under(_array(NUMBER, k, k), axes) for k in spec.action_dims]
    return [encoded, _by_agent(per_agent, spec)]


# ---------------------------------------------------------------------------------------------
# The served schema
# ---------------------------------------------------------------------------------------------


def served_openapi(generic: dict[str, Any], spec: EnvSpec, config: ServeConfig) -> dict[str, Any]:
    """A copy of the app's generic OpenAPI document for this model and these limits."""
    doc = copy.deepcopy(generic)
    schemas = doc["components"]["schemas"]
    rows = (1, config.max_batch)
    steps = (1, config.max_horizon)
    _set_arrays(schemas["ImagineRequest"], "start_obs", observations(spec, [rows]))
    _set_arrays(schemas["ImagineRequest"], "actions", actions(spec, [rows, (1, None)]))
    _set_arrays(schemas["Context"], "obs", observations(spec, [rows, steps])[:1])
    _set_arrays(schemas["Context"], "actions", actions(spec, [rows, steps]))
    _set_arrays(schemas["StepRequest"], "obs", observations(spec, [rows]))
    _set_arrays(schemas["StepRequest"], "action", actions(spec, [rows]))
    _set_arrays(schemas["EpisodeRequest"], "obs", observations(spec, [(2, None)]))
    _set_arrays(schemas["EpisodeRequest"], "actions", actions(spec, [(1, None)]))
    _set_maximum(schemas["ImagineRequest"], "horizon", config.max_horizon)
    _set_maximum(schemas["ImagineRequest"], "num_samples", config.max_num_samples)
    _set_maximum(schemas["SamplerOptions"], "num_steps", config.max_sampler_steps)
    for name in ("ImagineRequest", "StepRequest", "EpisodeRequest"):
        _set_maximum(schemas[name], "seed", MAX_SEED)  # exact: a float maximum rounds up
        schemas[name]["description"] += "\n\n" + model_summary(spec, config)
    for name, examples in request_examples(spec, config).items():
        schemas[name]["examples"] = examples
    return doc


def model_summary(spec: EnvSpec, config: ServeConfig) -> str:
    """The served model's shapes and limits in words (also in GET /v1/info)."""
    if spec.action_kind == "discrete":
        ranges = ", ".join(f"{a} in [0, {k})" for a, k in zip(spec.agent_ids, spec.action_dims))
        action = f"discrete action indices ({ranges}) or one-hot rows of A = {spec.action_dim}"
    else:
        action = f"continuous actions of A = {spec.action_dim} (agent sizes {spec.action_dims})"
    return (
        f"This server: N = {spec.n_agents} agents {list(spec.agent_ids)} (in this order), "
        f"observations padded to D = {spec.obs_dim} (agent sizes {list(spec.obs_dims)}), "
        f"{action}. Limits: horizon <= {config.max_horizon}, num_samples <= "
        f"{config.max_num_samples}, batch x num_samples <= {config.max_batch} rows, "
        f"sampler.num_steps <= {config.max_sampler_steps}, body <= {config.max_body_bytes} bytes."
    )


def _set_arrays(model: dict[str, Any], field: str, forms: list[dict[str, Any]]) -> None:
    """Replace an array field's generic schema with ``forms`` (anyOf), keeping its description
    and whether it may be null."""
    old = model["properties"][field]
    options = old.get("anyOf", [])
    nullable = {"type": "null"} in options
    description = old.get("description") or next(
        (o["description"] for o in options if "description" in o), ""
    )
    new = {"anyOf": forms + ([{"type": "null"}] if nullable else []), "description": description}
    new.update({k: old[k] for k in ("title", "default") if k in old})
    model["properties"][field] = new


def _set_maximum(model: dict[str, Any], field: str, maximum: int) -> None:
    prop = model["properties"][field]
    target = next((o for o in prop.get("anyOf", []) if o.get("type") == "integer"), prop)
    target["maximum"] = maximum


# ---------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------


def request_examples(spec: EnvSpec, config: ServeConfig) -> dict[str, list[dict[str, Any]]]:
    """One request per body this server accepts as is (zero observations, action 0)."""
    horizon = min(EXAMPLE_HORIZON, config.max_horizon)
    return {
        "ImagineRequest": [
            {
                "start_obs": _zero_obs(spec, 1),
                "actions": [_zero_actions(spec, horizon)],
                "horizon": horizon,
                "seed": 0,
            },  # fmt: skip
            {
                "start_obs": _zero_obs(spec, 1),
                "policy": "random",
                "horizon": horizon,
                "num_samples": min(2, config.max_num_samples),
                "seed": 1,
            },  # fmt: skip
        ],
        "StepRequest": [{"obs": _zero_obs(spec, 1), "action": _zero_actions(spec, 1), "seed": 0}],
        "EpisodeRequest": [
            {
                "episode_id": EXAMPLE_EPISODE_ID,
                "obs": _zero_obs(spec, EXAMPLE_EPISODE_STEPS + 1),
                "actions": _zero_actions(spec, EXAMPLE_EPISODE_STEPS),
                "seed": 0,
            },  # fmt: skip
        ],
    }


def _zero_obs(spec: EnvSpec, rows: int) -> list:
    """[rows, N, D] zeros."""
    return [[[0.0] * spec.obs_dim for _ in range(spec.n_agents)] for _ in range(rows)]


def _zero_actions(spec: EnvSpec, rows: int) -> list:
    """[rows, N] index 0 (discrete) or [rows, N, A] zeros (continuous)."""
    if spec.action_kind == "discrete":
        return [[0] * spec.n_agents for _ in range(rows)]
    return [[[0.0] * spec.action_dim for _ in range(spec.n_agents)] for _ in range(rows)]
