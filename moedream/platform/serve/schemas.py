"""What the world-model endpoint accepts and returns, and how a request becomes a model call.

Two layers, both used by HTTP and by DeploymentHandle callers:
1. pydantic models (``ImagineRequest``, ``StepRequest``): field names, scalar types and ranges,
   unknown fields refused. Array fields stay raw there (nested lists, numpy arrays or per-agent
   mappings); their shapes depend on the served model, so each replica's OpenAPI schema gets
   them from :mod:`.openapi`.
2. ``parse_imagine`` / ``parse_step``: the model-dependent checks (agent ids, shapes, action
   ranges, NaN/inf, strings or booleans among numbers, the limits of :class:`ServeConfig`),
   turning a request into an ``ImagineJob`` / ``StepJob`` of float32 arrays.

Every problem raises :class:`RequestError` whose message starts with the field
(``start_obs[0][1][3]: ...``); HTTP turns it into a 422 response. Nothing here imports ray.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from moedream.config import ConfigBase, ConfigError, check, check_positive
from moedream.envs.spec import EnvSpec
from moedream.world_model.diffusion import SamplerConfig, check_compatible
from moedream.world_model.memory.config import MemoryConfig
from moedream.world_model.model import Prediction, WorldModelConfig

MAX_SEED = 2**63 - 1


# ---------------------------------------------------------------------------------------------
# Deployment settings (the Serve user_config)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ServeConfig(ConfigBase):
    """The deployment's user_config: which checkpoint, how to batch, what a request may ask."""

    checkpoint: str = ""
    """World-model checkpoint: a .safetensors file or a folder holding world_model.safetensors."""
    max_batch_size: int = 8
    """Requests fused into one @serve.batch call; keep max_ongoing_requests >= this."""
    batch_wait_timeout_s: float = 0.005
    """How long a batch waits for more requests before it runs."""
    max_batch: int = 256
    """Rows one request may ask for (batch x num_samples)."""
    max_horizon: int = 64
    """Longest imagined rollout (and longest context) one request may ask for."""
    max_num_samples: int = 16
    max_sampler_steps: int = 64
    max_body_bytes: int = 8 * 2**20
    """Largest HTTP request body; larger ones get 413."""
    num_threads: int | None = None
    """torch intra-op threads in the replica (None: leave Ray's default, OMP_NUM_THREADS)."""
    device: str | None = None
    """Where the model runs (None: cuda if the replica has a GPU, else cpu)."""
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
    """Memory experts of episodes posted to /v1/episodes; ``memory.max_adapters`` is how many
    episodes one replica holds (the least recently used is evicted beyond it)."""
    memory_checkpoint: str = ""
    """A fitted memory (moedream.world_model.memory.save_memory file; the pipeline's serve
    stage writes one when imagination.memory is on): the spatial expert's measured error and
    adapter weights every episode memory of the replica starts from. Empty: unfitted, and the
    retrieval spatial expert abstains (only the LoRA expert can change a rollout)."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        for name in ("max_batch_size", "max_batch", "max_horizon", "max_num_samples",
                     "max_sampler_steps", "max_body_bytes"):  # fmt: skip
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            check(ok, f"{prefix}{name}", value, "must be an integer >= 1")
        check_positive(f"{prefix}batch_wait_timeout_s", self.batch_wait_timeout_s, allow_zero=True)
        for name in ("checkpoint", "memory_checkpoint"):
            check(isinstance(getattr(self, name), str), f"{prefix}{name}", getattr(self, name),
                  "must be a path (a string; empty for none)")  # fmt: skip
        if self.num_threads is not None:
            check(
                isinstance(self.num_threads, int) and self.num_threads >= 1,
                f"{prefix}num_threads", self.num_threads, "must be an integer >= 1 or null",
            )  # fmt: skip

    def limits(self) -> dict[str, int]:
        return {
            "max_batch": self.max_batch,
            "max_horizon": self.max_horizon,
            "max_num_samples": self.max_num_samples,
            "max_sampler_steps": self.max_sampler_steps,
            "max_body_bytes": self.max_body_bytes,
        }


class RequestError(ValueError):
    """A request is invalid. ``field`` is the dotted/indexed path of the offending value."""

    def __init__(self, field: str, message: str, *, text: str | None = None) -> None:
        super().__init__(text or f"{field}: {message}")
        self.field = field

    def __reduce__(self):
        # Ray pickles exceptions raised in replicas: rebuild from the final text, so a handle
        # caller gets this RequestError (the keyword-only ``text`` would otherwise be lost).
        return (_rebuild_request_error, (type(self), self.field, str(self)))


def _rebuild_request_error(cls: type, field: str, text: str) -> RequestError:
    return cls(field, "", text=text)


def validation_error_message(err: ValidationError, root: str = "") -> tuple[str, str]:
    """A pydantic error -> (first field path, one-line message naming every bad field)."""
    parts, first = [], None
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if p != "body"]
        field = _join_path(root, loc) or "body"
        first = first or field
        parts.append(f"{field}: {e['msg']}")
    return first or "body", "; ".join(parts)


def _join_path(root: str, loc: list[str]) -> str:
    path = root
    for part in loc:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    return path


# ---------------------------------------------------------------------------------------------
# Request and response models
# ---------------------------------------------------------------------------------------------


def _nested(depth: int) -> dict:
    schema: dict = {"type": "number"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def _array_field(description: str, depth: int, agent_depth: int | None) -> Any:
    """A raw array field (validated by parse_*) with a hand-written JSON schema."""
    options = [_nested(depth)]
    if agent_depth is not None:
        options.append({"type": "object", "additionalProperties": _nested(agent_depth)})
    schema = {"anyOf": options, "description": description}
    return Annotated[Any, WithJsonSchema(schema)]


Observations = _array_field(
    "Observations [B, N, D] (N agents in info.agent_ids order, D = padded obs size) or a "
    "mapping {agent_id: [B, D_i]}.",
    3,
    2,
)
ActionPlan = _array_field(
    "Joint action plan [B, H, N, A] (encoded: one-hot for discrete actions) or [B, H, N] action "
    "indices (discrete), or a mapping {agent_id: [B, H] indices | [B, H, A_i]}.",
    4,
    3,
)
StepActions = _array_field(
    "Joint actions [B, N, A] (encoded) or [B, N] indices (discrete), or a mapping "
    "{agent_id: [B] indices | [B, A_i]}.",
    3,
    2,
)
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True)


class SamplerOptions(_Strict):
    """Overrides of the model's own sampler config (diffusers scheduler loop)."""

    scheduler: Literal["ddpm", "ddim", "flow_euler"] | None = None
    num_steps: int | None = Field(None, ge=1)
    eta: FiniteFloat | None = Field(None, ge=0.0, le=1.0)
    clip: FiniteFloat | None = Field(None, gt=0.0)


class Context(_Strict):
    """Real steps before the start observation: obs [B, T, N, D], actions [B, T, N, A] or
    [B, T, N] indices (the action after each of those observations)."""

    obs: _array_field("Context observations [B, T, N, D].", 4, None)
    actions: _array_field("Context actions [B, T, N, A] or indices [B, T, N].", 4, None)


EpisodeId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]


class EpisodeRequest(_Strict):
    """An episode's real steps: builds (or continues) its memory in the replica."""

    episode_id: EpisodeId
    obs: _array_field(
        "Real observations [L+1, N, D] (or {agent_id: [L+1, D_i]}); a known episode continues: "
        "obs[0] must be its latest posted observation.",
        3,
        2,
    )
    actions: _array_field(
        "The L actions between them: [L, N, A] encoded, [L, N] indices (discrete) or "
        "{agent_id: [L] | [L, A_i]}.",
        3,
        2,
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the LoRA finetuning.")


class EpisodeResponse(BaseModel):
    episode_id: str
    steps: int = Field(description="Real transitions posted for this episode so far")
    created: bool = Field(description="False when the post continued a known episode")
    evicted: list[str] = Field(description="Episodes evicted to make room (least recently used)")
    lora: dict = Field(description="LoRA finetuning logs (loss, kept, seconds)")


# Exactly one source of actions: a plan (policy absent or "plan") or policy "random" with no plan.
ACTIONS_OR_RANDOM = {
    "anyOf": [
        {"required": ["actions"],
         "properties": {"actions": {"not": {"type": "null"}}, "policy": {"enum": ["plan", None]}}},
        {"required": ["policy"],
         "properties": {"policy": {"const": "random"}, "actions": {"type": "null"}}},
    ]
}  # fmt: skip

PREDICTION_HELP = (
    "'sample' (default): next observations drawn by the diffusion head; 'mean': the "
    "regressed mean alone (the diffusion ablation; not with episode_id)."
)


class ImagineRequest(_Strict):
    """Imagine ``horizon`` steps from ``start_obs`` under an action plan or a policy spec:
    send ``actions`` (the plan) or ``policy: "random"``, not both."""

    model_config = ConfigDict(json_schema_extra=ACTIONS_OR_RANDOM)

    start_obs: Observations
    actions: ActionPlan | None = None
    policy: Literal["plan", "random"] | None = Field(
        None,
        description="'plan' (default when actions are given) or 'random': uniform random "
        "actions drawn from the seed (see random_plan).",
    )
    horizon: int = Field(ge=1)
    num_samples: int = Field(1, ge=1, description="Rollouts per start state (rows repeat).")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    noise_scale: FiniteFloat | None = Field(None, ge=0.0)
    sampler: SamplerOptions | None = None
    prediction: Prediction = Field("sample", description=PREDICTION_HELP)
    context: Context | None = None
    episode_id: EpisodeId | None = Field(
        None,
        description="Compose the memory experts of this episode (posted to /v1/episodes) into "
        "every step; start_obs is taken as the episode's latest posted observation, or, with "
        "a context, the context as the steps imagined since it (start_obs T steps later). "
        "Unknown or evicted: 404. Absent: the plain model.",
    )


class StepRequest(_Strict):
    """One joint transition from ``obs`` under ``action``."""

    obs: Observations
    action: StepActions
    seed: int = Field(0, ge=0, le=MAX_SEED)
    noise_scale: FiniteFloat | None = Field(None, ge=0.0)
    sampler: SamplerOptions | None = None
    prediction: Prediction = Field("sample", description=PREDICTION_HELP)


class ImagineResponse(BaseModel):
    """Trajectories (moedream.world_model.trajectory) as nested lists; non-finite model
    outputs are sent as null."""

    obs: list = Field(description="[B*S, H+1, N, D]")
    action: list = Field(description="[B*S, H, N, A] encoded actions taken")
    reward: list = Field(description="[B*S, H, N]")
    terminated: list = Field(description="[B*S, H, N] termination probabilities")
    uncertainty: list = Field(description="[B*S, H] ensemble spread per step")
    obs_std: list | None = Field(None, description="[B*S, H, N, D]")
    expert_load: list | None = Field(None, description="[L, E]")
    ensemble_obs: list | None = Field(None, description="[B*S, H, N, D] ensemble mean next obs")
    ensemble_reward: list | None = Field(None, description="[B*S, H, N] ensemble mean reward")
    reward_spread: list | None = Field(None, description="[B*S, H, N] reward std across members")
    length: list | None = Field(None, description="[B*S] valid steps (null: all H)")
    agent_ids: list[str]
    checkpoint_id: str
    seed: int


class StepResponse(BaseModel):
    next_obs: list = Field(description="[B, N, D]")
    reward: list = Field(description="[B, N]")
    terminated: list = Field(description="[B, N]")
    uncertainty: list = Field(description="[B]")
    obs_std: list | None = None
    expert_load: list | None = None
    ensemble_obs: list | None = Field(None, description="[B, N, D] ensemble mean next obs")
    ensemble_reward: list | None = Field(None, description="[B, N] ensemble mean reward")
    reward_spread: list | None = Field(None, description="[B, N] reward std across members")
    agent_ids: list[str]
    checkpoint_id: str
    seed: int


class EpisodeCacheSummary(BaseModel):
    """GET /v1/episodes: the episode memories of the replica that answered."""

    capacity: int = Field(description="Episodes one replica holds (memory.max_adapters)")
    cached: int = Field(description="Episodes held now")
    checkpoint_id: str = Field(description="The checkpoint these memories belong to")
    posts: int
    evictions: int
    hits: int = Field(description="Imagine requests that found their episode")
    misses: int = Field(description="Imagine requests whose episode was unknown or evicted (404)")
    episodes: dict[str, int] = Field(description="episode_id -> steps, least recently used first")


class ErrorResponse(BaseModel):
    error: str = Field(description="'<field>: <what is wrong and how to fix it>'")
    field: str


# ---------------------------------------------------------------------------------------------
# Jobs: validated requests as arrays
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImagineJob:
    """Equivalent direct call (what the deployment runs)::

    model.imagine(start, plan, horizon, context=context, sampler=sampler,
                  noise_scale=noise_scale, generator=torch.Generator().manual_seed(seed))
    """

    start: np.ndarray  # [B*S, N, D] float32 (rows repeated num_samples times)
    plan: np.ndarray  # [B*S, H, N, A] float32 or [B*S, H, N] int64
    horizon: int
    seed: int
    noise_scale: float | None = None
    sampler: SamplerConfig | None = None
    context: dict[str, np.ndarray] | None = None
    episode_id: str | None = None
    """Rows compose this episode's memory (``memory=`` MemoryExperts.recall) when set."""
    prediction: str = "sample"
    """"sample" (diffusion) or "mean" (the regressed mean): WorldModel.transition."""

    @property
    def rows(self) -> int:
        return int(self.start.shape[0])


@dataclasses.dataclass
class EpisodeJob:
    episode_id: str
    obs: np.ndarray  # [L+1, N, D] float32
    action: np.ndarray  # [L, N, A] float32 or [L, N] int64
    seed: int


@dataclasses.dataclass
class StepJob:
    obs: np.ndarray  # [B, N, D] float32
    action: np.ndarray  # [B, N, A] float32 or [B, N] int64
    seed: int
    noise_scale: float | None = None
    sampler: SamplerConfig | None = None
    prediction: str = "sample"

    @property
    def rows(self) -> int:
        return int(self.obs.shape[0])


def parse_imagine(
    request: ImagineRequest | dict, spec: EnvSpec, model: WorldModelConfig, config: ServeConfig
) -> ImagineJob:
    req = _model(ImagineRequest, request)
    if req.prediction == "mean" and req.episode_id is not None:
        raise RequestError(
            "prediction",
            "'mean' cannot compose an episode's memory experts (they change the diffusion "
            "head only); send prediction 'sample' with episode_id, or leave episode_id out",
        )
    check_limit("horizon", req.horizon, config.max_horizon, "max_horizon")
    check_limit("num_samples", req.num_samples, config.max_num_samples, "max_num_samples")
    start = parse_obs(req.start_obs, spec, "start_obs")  # [B, N, D]
    batch = start.shape[0]
    check_limit("start_obs", batch * req.num_samples, config.max_batch, "max_batch",
                what="rows (batch x num_samples)")  # fmt: skip
    policy = req.policy or ("plan" if req.actions is not None else None)
    if policy is None:
        raise RequestError("actions", "required: send an action plan, or set policy to 'random'")
    if policy == "random":
        if req.actions is not None:
            raise RequestError("actions", "must be absent when policy is 'random'")
        plan = random_plan(spec, batch * req.num_samples, req.horizon, req.seed)
    else:
        plan = parse_actions(req.actions, spec, "actions", lead=(batch,), time_axis=req.horizon)
        plan = np.repeat(plan, req.num_samples, axis=0)
    context = parse_context(req.context, spec, batch, config) if req.context is not None else None
    if context is not None:
        context = {k: np.repeat(v, req.num_samples, axis=0) for k, v in context.items()}
    return ImagineJob(
        start=np.repeat(start, req.num_samples, axis=0),
        plan=plan,
        horizon=req.horizon,
        seed=req.seed,
        noise_scale=req.noise_scale,
        sampler=parse_sampler(req.sampler, model, config),
        context=context,
        episode_id=req.episode_id,
        prediction=req.prediction,
    )


def parse_episode(request: EpisodeRequest | dict, spec: EnvSpec) -> EpisodeJob:
    """An episode's real history -> arrays; at least one transition."""
    req = _model(EpisodeRequest, request)
    obs = parse_obs(req.obs, spec, "obs")  # [L+1, N, D]
    if obs.shape[0] < 2:
        raise RequestError("obs", f"has {obs.shape[0]} observation; send L+1 >= 2 (L >= 1 steps)")
    steps = obs.shape[0] - 1
    action = parse_actions(req.actions, spec, "actions", lead=(steps,), time_axis=None)
    return EpisodeJob(episode_id=req.episode_id, obs=obs, action=action, seed=req.seed)


def parse_step(
    request: StepRequest | dict, spec: EnvSpec, model: WorldModelConfig, config: ServeConfig
) -> StepJob:
    req = _model(StepRequest, request)
    obs = parse_obs(req.obs, spec, "obs")
    check_limit("obs", obs.shape[0], config.max_batch, "max_batch", what="rows")
    action = parse_actions(req.action, spec, "action", lead=(obs.shape[0],), time_axis=None)
    return StepJob(
        obs=obs,
        action=action,
        seed=req.seed,
        noise_scale=req.noise_scale,
        sampler=parse_sampler(req.sampler, model, config),
        prediction=req.prediction,
    )


def _model(cls: type[BaseModel], request: BaseModel | dict) -> Any:
    if isinstance(request, cls):
        return request
    if not isinstance(request, dict):
        raise RequestError("body", f"must be a JSON object / dict of {cls.__name__} fields")
    try:
        return cls.model_validate(request)
    except ValidationError as err:
        field, text = validation_error_message(err)
        raise RequestError(field, text, text=text) from None


def check_limit(field: str, value: int, limit: int, setting: str, what: str = "") -> None:
    if value > limit:
        raise RequestError(
            field,
            f"{value} {what + ' ' if what else ''}exceeds the configured limit {limit} "
            f"(user_config.{setting}); split the request",
        )


def parse_sampler(
    options: SamplerOptions | None, model: WorldModelConfig, config: ServeConfig
) -> SamplerConfig | None:
    """None (the model's own sampler) or the model's sampler with the given overrides."""
    if options is None:
        return None
    overrides = options.model_dump(exclude_none=True)
    if not overrides:
        return None
    if overrides.get("num_steps", 0) > config.max_sampler_steps:
        check_limit("sampler.num_steps", overrides["num_steps"], config.max_sampler_steps,
                    "max_sampler_steps")  # fmt: skip
    try:
        sampler = SamplerConfig.from_dict(
            {**model.sampler.to_dict(), **overrides}, prefix="sampler."
        )
        sampler.validate("sampler.")
        check_compatible(model.diffusion, sampler, diffusion_prefix="model.diffusion.")
    except ConfigError as err:
        raise RequestError("sampler", str(err)) from None
    return sampler


# ---------------------------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------------------------


def as_number_array(value: Any, field: str) -> np.ndarray:
    """Nested lists / numpy arrays / tensors of numbers -> a float64 or int64 numpy array.

    Refuses strings, booleans, null, ragged rows and NaN/inf, naming the exact element."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor from a handle caller
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        arr = value
        if arr.dtype.kind not in "iuf":
            raise RequestError(field, f"must hold numbers, got an array of dtype {arr.dtype}")
    else:
        if not isinstance(value, list):
            raise RequestError(
                field, f"must be a (nested) list of numbers, got {_type_name(value)}"
            )
        _check_leaves(value, field)
        try:
            arr = np.asarray(value)
        except ValueError:
            raise RequestError(field, "is ragged: every row must have the same length") from None
        if arr.dtype == object or arr.dtype.kind not in "iuf":
            raise RequestError(field, "is ragged: every row must have the same length")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            index = "".join(f"[{i}]" for i in np.argwhere(bad)[0])
            raise RequestError(
                f"{field}{index}", f"is {arr[tuple(np.argwhere(bad)[0])]}: send finite numbers"
            )
    return arr


def _check_leaves(value: list, field: str) -> None:
    """Walk nested lists: every leaf must be an int or a float (bool and str are refused)."""
    stack = [(value, field)]
    while stack:
        items, path = stack.pop()
        if items and isinstance(items[0], list):
            for i, item in enumerate(items):
                if not isinstance(item, list):
                    raise RequestError(f"{path}[{i}]", f"expected a list, got {_type_name(item)}")
                stack.append((item, f"{path}[{i}]"))
            continue
        if all(type(x) is float or type(x) is int for x in items):
            continue
        for i, x in enumerate(items):
            if type(x) is not float and type(x) is not int:
                raise RequestError(f"{path}[{i}]", f"expected a number, got {_type_name(x)}")


def _type_name(x: Any) -> str:
    if x is None:
        return "null"
    return {bool: "a boolean", str: "a string", dict: "an object", list: "a list"}.get(
        type(x), type(x).__name__
    ) + (f" {x!r}" if isinstance(x, (bool, str)) and len(str(x)) < 40 else "")


def _check_shape(arr: np.ndarray, expected: tuple, field: str, layout: str) -> None:
    """``expected`` may hold None for free axes."""
    ok = arr.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, arr.shape))
    if not ok:
        want = [("any" if e is None else e) for e in expected]
        raise RequestError(field, f"has shape {list(arr.shape)}, expected {layout} = {want}")


def parse_obs(value: Any, spec: EnvSpec, field: str) -> np.ndarray:
    """[B, N, D] (padded) or {agent_id: [B, D_i]} -> float32 [B, N, D]."""
    n, d = spec.n_agents, spec.obs_dim
    if isinstance(value, dict):
        per_agent = _agent_arrays(value, spec, field)
        batch = None
        out = None
        for i, (agent, arr) in enumerate(per_agent.items()):
            _check_shape(arr, (batch, spec.obs_dims[i]), f"{field}.{agent}", f"[B, D_{agent}]")
            batch = arr.shape[0]
            out = np.zeros((batch, n, d), np.float32) if out is None else out
            out[:, i, : spec.obs_dims[i]] = arr
        return _finite32(out, field)
    arr = as_number_array(value, field)
    _check_shape(arr, (None, n, d), field, "[B, N agents, D obs]")
    if arr.shape[0] < 1:
        raise RequestError(field, "is empty: send at least one row")
    return _finite32(arr, field)


def parse_actions(
    value: Any, spec: EnvSpec, field: str, *, lead: tuple[int], time_axis: int | None
) -> np.ndarray:
    """Encoded [*lead, (H,) N, A] float32 or discrete indices [*lead, (H,) N] int64.

    ``time_axis`` is the horizon (the plan needs at least that many steps) or None (one step)."""
    if value is None:
        raise RequestError(field, "is required")
    n, a = spec.n_agents, spec.action_dim
    steps = () if time_axis is None else (None,)
    if isinstance(value, dict):
        per_agent = _agent_arrays(value, spec, field)
        arrays = []
        for i, (agent, arr) in enumerate(per_agent.items()):
            agent_field = f"{field}.{agent}"
            if spec.action_kind == "discrete":
                _check_shape(
                    arr, (*lead, *steps), agent_field, "[B, H] indices" if steps else "[B] indices"
                )
                arrays.append(_indices(arr, spec.action_dims[i], agent_field))
            else:
                _check_shape(arr, (*lead, *steps, spec.action_dims[i]), agent_field,
                             f"{'[B, H' if steps else '[B'}, A_{agent}]")  # fmt: skip
                padded = np.zeros((*arr.shape[:-1], a), np.float32)
                padded[..., : spec.action_dims[i]] = arr
                arrays.append(padded)
        out = np.stack(arrays, axis=len(lead) + len(steps))
        _check_steps(out, field, time_axis)
        return out if out.dtype == np.int64 else _finite32(out, field)
    arr = as_number_array(value, field)
    if spec.action_kind == "discrete" and arr.ndim == len(lead) + len(steps) + 1:
        _check_shape(
            arr, (*lead, *steps, n), field, f"{'[B, H, N]' if steps else '[B, N]'} action indices"
        )
        _check_steps(arr, field, time_axis)
        for i in range(n):
            _indices(arr[..., i], spec.action_dims[i], f"{field}[..., {i}]")
        return arr.astype(np.int64)
    layout = "[B, H, N, A]" if steps else "[B, N, A]"
    if spec.action_kind == "discrete":
        layout += f" one-hot (or {'[B, H, N]' if steps else '[B, N]'} indices)"
    _check_shape(arr, (*lead, *steps, n, a), field, layout)
    _check_steps(arr, field, time_axis)
    return _finite32(arr, field)


def _check_steps(arr: np.ndarray, field: str, horizon: int | None) -> None:
    if horizon is not None and arr.shape[1] < horizon:
        raise RequestError(field, f"has {arr.shape[1]} steps, fewer than horizon = {horizon}")


def _indices(arr: np.ndarray, size: int, field: str) -> np.ndarray:
    if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
        raise RequestError(field, "discrete actions must be integer indices")
    bad = (arr < 0) | (arr >= size)
    if bad.any():
        index = "".join(f"[{i}]" for i in np.argwhere(bad)[0])
        raise RequestError(
            f"{field}{index}", f"action index {arr[tuple(np.argwhere(bad)[0])]} outside [0, {size})"
        )
    return arr.astype(np.int64)


def _agent_arrays(value: dict, spec: EnvSpec, field: str) -> dict[str, np.ndarray]:
    unknown = [k for k in value if k not in spec.agent_ids]
    if unknown:
        raise RequestError(
            f"{field}.{unknown[0]}",
            f"unknown agent id; this model's agents are {list(spec.agent_ids)}",
        )
    missing = [a for a in spec.agent_ids if a not in value]
    if missing:
        raise RequestError(
            field, f"lacks agent(s) {missing}; send every agent of {list(spec.agent_ids)}"
        )
    return {a: as_number_array(value[a], f"{field}.{a}") for a in spec.agent_ids}


def _finite32(arr: np.ndarray, field: str) -> np.ndarray:
    out = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        index = "".join(f"[{i}]" for i in np.argwhere(~np.isfinite(out))[0])
        raise RequestError(f"{field}{index}", "is beyond the float32 range; send finite numbers")
    return out


def parse_context(
    ctx: Context, spec: EnvSpec, batch: int, config: ServeConfig
) -> dict[str, np.ndarray]:
    obs = as_number_array(ctx.obs, "context.obs")
    _check_shape(obs, (batch, None, spec.n_agents, spec.obs_dim), "context.obs", "[B, T, N, D]")
    check_limit("context.obs", obs.shape[1], config.max_horizon, "max_horizon", what="steps")
    steps = obs.shape[1]
    action = parse_actions(ctx.actions, spec, "context.actions", lead=(batch,), time_axis=steps)
    if action.shape[1] != steps:
        raise RequestError(
            "context.actions", f"has {action.shape[1]} steps; context.obs has {steps}"
        )
    if action.dtype == np.int64:
        action = spec.encode_actions(action)
    return {"obs": _finite32(obs, "context.obs"), "action": action}


def random_plan(spec: EnvSpec, batch: int, horizon: int, seed: int) -> np.ndarray:
    """The plan behind policy "random": uniform over each agent's own actions, from ``seed``.

    Discrete: indices [B, H, N] with agent i's in [0, action_dims[i]); continuous: encoded
    [B, H, N, A] uniform in [-1, 1] on agent i's first action_dims[i] entries, 0 on padding."""
    rng = np.random.default_rng(seed)
    if spec.action_kind == "discrete":
        high = np.asarray(spec.action_dims)  # [N]
        return rng.integers(0, high, size=(batch, horizon, spec.n_agents), dtype=np.int64)
    plan = rng.uniform(-1.0, 1.0, size=(batch, horizon, spec.n_agents, spec.action_dim))
    mask = np.arange(spec.action_dim)[None, :] < np.asarray(spec.action_dims)[:, None]  # [N, A]
    return (plan * mask).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def json_ready(result: dict[str, Any]) -> dict[str, Any]:
    """numpy arrays -> nested lists; NaN/inf -> null (JSON has no such numbers)."""
    out = {}
    for key, value in result.items():
        if isinstance(value, np.ndarray):
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                value = np.where(np.isfinite(value), value, None).astype(object)
            out[key] = value.tolist()
        else:
            out[key] = value
    return out


def spec_info(spec: EnvSpec) -> dict[str, Any]:
    return {
        "env_name": spec.env_name,
        "env_config": spec.env_config,
        "agent_ids": list(spec.agent_ids),
        "obs_dims": list(spec.obs_dims),
        "obs_shape": [spec.n_agents, spec.obs_dim],
        "action_kind": spec.action_kind,
        "action_dims": list(spec.action_dims),
        "action_shape": [spec.n_agents, spec.action_dim],
    }
