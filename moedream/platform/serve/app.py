"""The Ray Serve application of the world model: one deployment that is also the HTTP ingress.

HTTP routes and DeploymentHandle methods share one ``@serve.batch`` queue in the same replica
(no second hop), so requests from RLlib (handle) and from outside (HTTP) batch together:

    POST /v1/imagine   ImagineRequest -> ImagineResponse     handle: .imagine.remote(dict)
    POST /v1/step      StepRequest    -> StepResponse        handle: .step.remote(dict)
    POST /v1/episodes  EpisodeRequest -> EpisodeResponse     handle: .remember_episode.remote(dict)
    GET  /v1/episodes  this replica's episode memories: capacity, counts, evictions
    GET  /v1/info      env spaces, agent ids, model config, checkpoint, limits
    GET  /healthz      200 when the model is loaded
    GET  /openapi.json the schema of all of the above, with the served model's shapes, the
                       limits and request examples filled in (see :mod:`.openapi`)

Bad input gets 422 (413 for a body over ``max_body_bytes``, 400 for a body that is not JSON)
with ``{"error": "<field>: <problem and fix>", "field": ...}``; the replica keeps serving. An
``episode_id`` this replica holds no memory for (never posted, evicted) gets 404 (see
:mod:`.episodes`).
JSON only: nothing is ever unpickled from a request.
"""

import asyncio
import json
import logging
import time
from typing import Any

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moedream.platform.serve.episodes import EpisodeCache
from moedream.platform.serve.names import DEPLOYMENT_NAME
from moedream.platform.serve.openapi import served_openapi
from moedream.platform.serve.runner import (
    BatchStats,
    Failure,
    LoadedModel,
    checkpoint_fingerprint,
    execute_batch,
    load_checkpoint,
    smoke_test,
)
from moedream.platform.serve.schemas import (
    EpisodeCacheSummary,
    EpisodeRequest,
    EpisodeResponse,
    ErrorResponse,
    ImagineRequest,
    ImagineResponse,
    RequestError,
    ServeConfig,
    StepRequest,
    StepResponse,
    json_ready,
    parse_episode,
    parse_imagine,
    parse_step,
    spec_info,
)

logger = logging.getLogger(__name__)
DEFAULT_MAX_ONGOING_REQUESTS = 32  # >= max_batch_size, else batches cap at that number
ERROR_TEXTS = {
    400: "The body is not valid JSON, or Content-Length is not a byte count",
    404: "Unknown or evicted episode_id: POST the episode to /v1/episodes again",
    413: "Body over user_config.max_body_bytes: send fewer rows per request",
    422: "A field is invalid: `field` names it, `error` says what is wrong and the fix",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error responses of a route for its OpenAPI schema (all have the same body)."""
    return {s: {"model": ErrorResponse, "description": ERROR_TEXTS[s]} for s in statuses}


# ---------------------------------------------------------------------------------------------
# HTTP plumbing: body size limit and error format
# ---------------------------------------------------------------------------------------------


class BodySizeLimit:
    """ASGI middleware: 413 when Content-Length or the bytes actually received exceed the
    limit in ``app.state.max_body_bytes`` (set by the deployment from its user_config)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = getattr(scope["app"].state, "max_body_bytes", ServeConfig.max_body_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_error(
                    send, 400, "content-length", f"header {declared!r} is not a byte count"
                )
                return
            if int(declared) > limit:
                await _send_error(send, 413, "body", _too_large(int(declared), limit))
                return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                await _send_error(send, 413, "body", _too_large(size, limit, "at least "))
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _too_large(size: int, limit: int, prefix: str = "") -> str:
    return (
        f"{prefix}{size} bytes exceeds the limit of {limit} bytes (user_config.max_body_bytes); "
        "send fewer rows per request"
    )


async def _send_error(send: Send, status: int, field: str, message: str) -> None:
    body = json.dumps({"error": f"{field}: {message}", "field": field}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_response(status: int, field: str, text: str) -> JSONResponse:
    return JSONResponse({"error": text, "field": field}, status_code=status)


async def on_validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        return error_response(400, "body", f"body: is not valid JSON ({detail.get('msg')})")
    parts, first = [], None
    for e in errors:
        loc = [str(p) for p in e["loc"] if p != "body"]
        field = loc[0] if loc else "body"
        for p in loc[1:]:
            field += f"[{p}]" if p.isdigit() else f".{p}"
        first = first or field
        parts.append(f"{field}: {e['msg']}")
    return error_response(422, first or "body", "; ".join(parts))


async def on_request_error(_: Request, err: RequestError) -> JSONResponse:
    return error_response(getattr(err, "status", 422), err.field, str(err))


app = FastAPI(
    title="moedream world model",
    description="Imagined multi-agent rollouts from a MoE-diffusion world model (JSON only).",
    version="1",
)
app.add_middleware(BodySizeLimit)
app.add_exception_handler(RequestValidationError, on_validation_error)
app.add_exception_handler(RequestError, on_request_error)


# ---------------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------------


@serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=DEFAULT_MAX_ONGOING_REQUESTS,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10.0,
    health_check_timeout_s=60.0,
)
@serve.ingress(app)
class WorldModelDeployment:
    """Serves one world-model checkpoint; ``reconfigure`` hot-swaps it."""

    def __init__(self, checkpoint: str | None = None) -> None:
        self._config = ServeConfig.from_dict({"checkpoint": checkpoint or ""})
        self._loaded: LoadedModel | None = None
        self._episodes: EpisodeCache | None = None
        self._stats = BatchStats()
        self._swap_lock = asyncio.Lock()
        if checkpoint:
            self._loaded = load_checkpoint(checkpoint, self._config.device)
            self._reset_episodes()
        self._apply_settings()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new user_config. A new checkpoint (path or content) is loaded off the event
        loop while the old model keeps answering, then swapped in with one assignment."""
        base = {"checkpoint": self._config.checkpoint}
        config = ServeConfig.from_dict({**base, **(user_config or {})})
        async with self._swap_lock:
            swapped = bool(config.checkpoint) and self._needs_load(config)
            if swapped:
                loaded = await asyncio.to_thread(load_checkpoint, config.checkpoint, config.device)
                self._loaded = loaded  # atomic: in-flight batches keep their snapshot
            memory_changed = (config.memory, config.memory_checkpoint) != (
                self._config.memory,
                self._config.memory_checkpoint,
            )
            self._config = config
            if swapped or memory_changed:
                self._reset_episodes()
            self._apply_settings()

    def _reset_episodes(self) -> None:
        """A new, empty episode cache for the loaded model: memories are per checkpoint (the
        LoRA adapters copy its denoiser) and per memory config."""
        old = self._episodes
        if old is not None and old.entries:
            logger.info("episode memory: dropped %d episodes (new checkpoint or memory config)",
                        len(old.entries))  # fmt: skip
        loaded = self._loaded
        self._episodes = (
            None
            if loaded is None
            else EpisodeCache(
                loaded.model,
                self._config.memory,
                loaded.checkpoint_id,
                self._config.memory_checkpoint,
            )  # fmt: skip
        )

    def _needs_load(self, config: ServeConfig) -> bool:
        current = self._loaded
        if current is None or current.path != config.checkpoint:
            return True
        return checkpoint_fingerprint(config.checkpoint)[0] != current.checkpoint_id

    def _apply_settings(self) -> None:
        self._run_batch.set_max_batch_size(self._config.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(self._config.batch_wait_timeout_s)
        asgi = getattr(self, "app", None)  # the FastAPI app this replica serves
        if asgi is not None and hasattr(asgi, "state"):
            asgi.state.max_body_bytes = self._config.max_body_bytes
        if isinstance(asgi, FastAPI) and self._loaded is not None:
            # /openapi.json for this model and these limits: FastAPI serves the cached
            # openapi_schema, so regenerate the generic one, then specialise it.
            asgi.openapi_schema = None
            spec = self._loaded.model.spec
            asgi.openapi_schema = served_openapi(asgi.openapi(), spec, self._config)

    def _model(self) -> LoadedModel:
        if self._loaded is None:
            raise RuntimeError(
                "no world-model checkpoint is loaded: set user_config.checkpoint (or build_app "
                "args.checkpoint) to a .safetensors file or a folder holding one"
            )
        return self._loaded

    # ------------------------------------------------------------------ batched execution

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _run_batch(self, jobs: list[Any]) -> list[Any]:
        loaded = self._model()  # one snapshot for the whole batch (hot swap safe)
        start = time.perf_counter()
        results = await asyncio.to_thread(
            execute_batch, loaded, jobs, self._config.num_threads, self._episodes
        )
        failed = sum(isinstance(r, Failure) for r in results)
        rows = sum(job.rows for job in jobs)
        self._stats.record(len(jobs), rows, failed, time.perf_counter() - start)
        return results

    async def _submit(self, job: Any) -> dict[str, Any]:
        result = await self._run_batch(job)
        if isinstance(result, Failure):
            raise result.error
        return result

    # ------------------------------------------------------------------ handle API

    async def imagine(self, request: dict[str, Any]) -> dict[str, Any]:
        """{"start_obs", "actions" | "policy": "random", "horizon", "num_samples", "seed",
        "noise_scale", "sampler", "context"} -> Trajectories fields as numpy arrays (plus
        agent_ids, checkpoint_id, seed); ``Trajectories.from_dict`` takes it as is."""
        loaded = self._model()
        job = parse_imagine(request, loaded.model.spec, loaded.model.config, self._config)
        if job.episode_id is not None:
            self._episode_cache().check(job.episode_id)  # 404 before queueing; again at run
        return await self._submit(job)

    async def remember_episode(self, request: dict[str, Any]) -> dict[str, Any]:
        """{"episode_id", "obs" [L+1, N, D], "actions" [L, N, A] | [L, N], "seed"} -> the
        episode's steps, created, evicted ids, LoRA logs: builds or continues its memory."""
        loaded = self._model()
        job = parse_episode(request, loaded.model.spec)
        return await asyncio.to_thread(self._remember, self._episode_cache(), job)

    def _remember(self, cache: EpisodeCache, job: Any) -> dict[str, Any]:
        """Runs in a worker thread (LoRA finetuning); the torch thread count is set here, in
        the thread that runs the model, as in execute_batch."""
        if self._config.num_threads:
            torch.set_num_threads(self._config.num_threads)
        return cache.remember(job.episode_id, job.obs, job.action, job.seed)

    def _episode_cache(self) -> EpisodeCache:
        self._model()  # no model: the same error as every other route
        assert self._episodes is not None  # built with every loaded model
        return self._episodes

    def episodes(self) -> dict[str, Any]:
        """This replica's episode memories (a handle call reaches one replica)."""
        return self._episode_cache().summary()

    async def step(self, request: dict[str, Any]) -> dict[str, Any]:
        """{"obs", "action", "seed", "noise_scale", "sampler"} -> next_obs, reward, terminated,
        uncertainty, obs_std (numpy)."""
        loaded = self._model()
        job = parse_step(request, loaded.model.spec, loaded.model.config, self._config)
        return await self._submit(job)

    def info(self) -> dict[str, Any]:
        loaded = self._model()
        return {
            "env": spec_info(loaded.model.spec),
            "model_config": loaded.model.config.to_dict(),
            "param_counts": loaded.model.param_counts(),
            "checkpoint": loaded.describe(),
            "limits": self._config.limits(),
            "batching": {
                "max_batch_size": self._config.max_batch_size,
                "batch_wait_timeout_s": self._config.batch_wait_timeout_s,
            },
            "device": str(loaded.device),
        }

    def stats(self) -> dict[str, Any]:
        """Observed batch sizes of this replica (a handle call reaches one replica)."""
        summary = self._stats.summary()
        summary["replica_id"] = serve.get_replica_context().replica_id.unique_id
        runtime = ray.get_runtime_context()
        summary["actor_name"] = runtime.get_actor_name()
        summary["actor_id"] = runtime.get_actor_id()
        summary["checkpoint_id"] = self._loaded.checkpoint_id if self._loaded else None
        summary["episodes"] = self._episodes.summary() if self._episodes else None
        return summary

    async def check_health(self) -> None:
        """Serve calls this periodically: the model must be loaded and a tiny step finite."""
        await asyncio.to_thread(smoke_test, self._model())

    # ------------------------------------------------------------------ HTTP routes

    @app.post("/v1/imagine", response_model=ImagineResponse, responses=errors(400, 404, 413, 422))
    async def http_imagine(self, body: ImagineRequest) -> JSONResponse:
        return JSONResponse(json_ready(await self.imagine(body)))

    @app.post("/v1/step", response_model=StepResponse, responses=errors(400, 413, 422))
    async def http_step(self, body: StepRequest) -> JSONResponse:
        return JSONResponse(json_ready(await self.step(body)))

    @app.post("/v1/episodes", response_model=EpisodeResponse, responses=errors(400, 413, 422))
    async def http_remember_episode(self, body: EpisodeRequest) -> JSONResponse:
        return JSONResponse(await self.remember_episode(body))

    @app.get("/v1/episodes", response_model=EpisodeCacheSummary)
    async def http_episodes(self) -> dict[str, Any]:
        return self.episodes()

    @app.get("/v1/info")
    async def http_info(self) -> dict[str, Any]:
        return self.info()

    @app.get("/healthz")
    async def http_health(self) -> dict[str, Any]:
        loaded = self._loaded
        if loaded is None:
            return error_response(503, "checkpoint", "checkpoint: no world model is loaded")
        return {"status": "ok", "checkpoint_id": loaded.checkpoint_id}


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application for ``serve run`` / ``serve deploy`` (import_path
    ``moedream.platform.serve:build_app``). ``args``: ``checkpoint`` (required) and optionally
    any other ServeConfig field, used as the initial user_config; a YAML's own user_config
    overrides them."""
    args = dict(args or {})
    config = ServeConfig.from_dict(args)
    if not config.checkpoint:
        raise ValueError("build_app: args.checkpoint is required (a world-model checkpoint path)")
    deployment = WorldModelDeployment.options(
        user_config=config.to_dict(),
        max_ongoing_requests=max(DEFAULT_MAX_ONGOING_REQUESTS, config.max_batch_size),
    )
    return deployment.bind()  # the checkpoint loads in reconfigure(user_config), at replica start
