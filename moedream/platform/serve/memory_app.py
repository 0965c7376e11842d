"""Ray Serve deployment of the memory world model: an episode's memory follows it across requests.

Every request names an episode (Serve's multiplexed model id: the HTTP header
``serve_multiplexed_model_id`` or ``handle.options(multiplexed_model_id=episode_id)``), so Serve
routes an episode to the replica that already holds its memory. Per episode a replica keeps
(``EpisodeSlot``): the real history (for the test-time LoRA finetune), the live short-term and
spatial memory (``EpisodeMemory``) and, in the shared ``MemoryStore``, its LoRA adapter.

    observe(steps)   append real steps; every ``finetune_every`` steps refit the LoRA adapter
    imagine(request) roll the episode forward with the chosen experts composed by PoCE
    forget()         drop the episode's history, memory and adapter
    stats()          episodes held (LRU order), evictions, adapters, finetunes

Bounded memory: ``@serve.multiplexed(max_num_models_per_replica=max_episodes)`` caches at most
``max_episodes`` slots; evicting one (least recently used) releases its adapter and history,
and a later request for that episode starts fresh (``memory_steps: 0``, ``fresh: true``).

All torch work of a replica runs on one worker thread, in request order: the MemoryStore's
active adapter is global state, so two requests must never interleave on it, and the event
loop stays free for health checks. Seeding: ``imagine`` with ``seed`` s equals the in-process
``rollout.imagine(..., generator=torch.Generator().manual_seed(s))``; the k-th finetune of an
episode runs under ``torch.manual_seed(finetune_seed + k)`` (the LoRA init) with a generator
seeded the same (the minibatches and noise), so an in-process store reproduces the adapter.
"""

import asyncio
import concurrent.futures
import copy
import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from moedream.config import ConfigBase, check
from moedream.platform.serve.app import on_request_error, on_validation_error
from moedream.platform.serve.schemas import RequestError, as_number_array, json_ready
from moedream.world_model.memory.checkpoint import MemoryCheckpoint, load_memory_checkpoint
from moedream.world_model.memory.config import EXPERTS
from moedream.world_model.memory.long_term import MemoryStore
from moedream.world_model.memory.network import EpisodeHistory
from moedream.world_model.memory.predictor import ComposedPredictor
from moedream.world_model.memory.rollout import EpisodeMemory, imagine

MEMORY_APP_NAME = "memory_world_model"
MEMORY_DEPLOYMENT_NAME = "MemoryWorldModelDeployment"
EPISODE_HEADER = "serve_multiplexed_model_id"


@dataclasses.dataclass
class MemoryServeConfig(ConfigBase):
    """Settings of the memory deployment (``build_memory_app`` args)."""

    checkpoint: str = ""
    """A memory checkpoint (``save_memory_checkpoint``): a .safetensors file or its folder."""
    max_episodes: int = 16
    """Episodes (history + memory + LoRA adapter) one replica keeps; LRU-evicted beyond it."""
    finetune_every: int = 16
    """Refit an episode's LoRA adapter each time this many new real steps were observed."""
    finetune_seed: int = 0
    """The k-th finetune of an episode runs with seed finetune_seed + k (reproducible)."""
    lora_steps: int | None = None
    """Adam steps per finetune (None: the checkpoint's MemoryConfig.lora_steps)."""
    max_history: int = 4096
    """Real steps kept per episode for finetuning (older ones dropped)."""
    max_observe_steps: int = 1024
    """Steps one observe request may append."""
    max_horizon: int = 64
    """Longest imagined rollout one request may ask for."""
    max_num_samples: int = 16
    """Samples one imagine request may ask for."""
    num_threads: int | None = 1
    """torch intra-op threads in the replica (1 for tiny models on shared cores)."""
    device: str | None = None
    """Where the model runs (None: cuda if visible, else cpu)."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check(isinstance(self.checkpoint, str), f"{prefix}checkpoint", self.checkpoint, "a path")
        for name in ("max_episodes", "finetune_every", "max_history", "max_observe_steps",
                     "max_horizon", "max_num_samples"):  # fmt: skip
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            check(ok, f"{prefix}{name}", value, "must be an integer >= 1")
        for name in ("lora_steps", "num_threads"):
            value = getattr(self, name)
            ok = value is None or (isinstance(value, int) and value >= 1)
            check(ok, f"{prefix}{name}", value, "must be an integer >= 1 or null")


# ---------------------------------------------------------------------------------------------
# One episode's state (what @serve.multiplexed caches per episode id)
# ---------------------------------------------------------------------------------------------


class EpisodeSlot:
    """History, live memory and finetune schedule of one episode on this replica."""

    def __init__(self, episode_id: str, on_release: Callable[[str], None]) -> None:
        self.episode_id = episode_id
        self._on_release: Callable[[str], None] | None = on_release
        self.clear()

    def clear(self) -> None:
        self.obs: list[torch.Tensor] = []  # o_0..o_T, each [N, D]
        self.actions: list[torch.Tensor] = []  # a_0..a_{T-1}, each [N, A]
        self.positions: list[torch.Tensor] = []  # each [N, P]
        self.memory: EpisodeMemory | None = None
        self.since_finetune = 0
        self.finetunes = 0
        self.total_steps = 0

    @property
    def steps(self) -> int:
        """Real steps held (the history length, <= max_history)."""
        return len(self.actions)

    def history(self) -> EpisodeHistory:
        return EpisodeHistory(
            torch.stack(self.obs), torch.stack(self.actions), torch.stack(self.positions)
        )

    def release(self) -> None:
        """Drop this episode's adapter (once): called when Serve evicts the slot."""
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release(self.episode_id)

    def __del__(self) -> None:  # Serve's multiplexer calls this when it evicts the episode
        self.release()


# ---------------------------------------------------------------------------------------------
# Request parsing (RequestError names the field and the fix)
# ---------------------------------------------------------------------------------------------


def _array(request: dict, field: str, shape: tuple, layout: str, *, root: str) -> np.ndarray:
    if field not in request:
        raise RequestError(f"{root}{field}", f"is missing: send {layout}")
    arr = as_number_array(request[field], f"{root}{field}")
    ok = arr.ndim == len(shape) and all(e is None or e == s for e, s in zip(shape, arr.shape))
    if not ok:
        want = ["any" if e is None else e for e in shape]
        raise RequestError(
            f"{root}{field}", f"has shape {list(arr.shape)}, expected {layout} = {want}"
        )
    return arr


def parse_actions(value: Any, rows: int, net, field: str) -> torch.Tensor:
    """[T, N] action indices (one-hot encoded here) or [T, N, A] encoded actions -> [T, N, A]."""
    n, a = net.n_agents, net.action_dim
    arr = as_number_array(value, field)
    if arr.ndim == 2 and arr.shape == (rows, n):
        if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
            raise RequestError(field, "holds action indices [T, N]: send whole numbers")
        idx = arr.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= a):
            raise RequestError(field, f"action indices must be in [0, {a - 1}]")
        return torch.from_numpy(np.eye(a, dtype=np.float32)[idx])
    if arr.ndim == 3 and arr.shape == (rows, n, a):
        return torch.from_numpy(arr.astype(np.float32))
    raise RequestError(
        field,
        f"has shape {list(arr.shape)}, expected indices [T, N] = [{rows}, {n}] or encoded "
        f"actions [T, N, A] = [{rows}, {n}, {a}]",
    )


def _int(request: dict, field: str, default: int, low: int, high: int | None = None) -> int:
    value = request.get(field, default)
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low
    ok = ok and (high is None or value <= high)
    if not ok:
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise RequestError(field, f"is {value!r}: must be an integer {bound}")
    return int(value)


def _check_keys(request: Any, allowed: set[str], what: str) -> dict:
    if not isinstance(request, dict):
        raise RequestError(
            "body", f"{what} must be an object (a dict), got {type(request).__name__}"
        )
    unknown = sorted(set(request) - allowed)
    if unknown:
        raise RequestError(unknown[0], f"is not a {what} field; valid fields: {sorted(allowed)}")
    return request


def parse_experts(value: Any, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    if not isinstance(value, (list, tuple)) or not value:
        raise RequestError("experts", f"must be a non-empty list, a subset of {list(EXPERTS)}")
    for i, name in enumerate(value):
        if name not in EXPERTS:
            raise RequestError(
                f"experts[{i}]", f"{name!r} is not an expert: choose from {list(EXPERTS)}"
            )
    if len(set(value)) != len(value):
        raise RequestError("experts", f"lists an expert twice: {list(value)}")
    return tuple(name for name in EXPERTS if name in value)  # canonical order


# ---------------------------------------------------------------------------------------------
# The engine: plain torch, one replica's model, adapters and episode work
# ---------------------------------------------------------------------------------------------


class MemoryEngine:
    """The loaded network, the shared MemoryStore and the per-episode operations."""

    def __init__(self, loaded: MemoryCheckpoint, config: MemoryServeConfig) -> None:
        self.loaded, self.config = loaded, config
        self.net = loaded.net
        cfg = self.net.cfg
        self.memory_cfg = cfg.replace(
            max_adapters=max(cfg.max_adapters, config.max_episodes),
            lora_steps=config.lora_steps or cfg.lora_steps,
        )
        self.store = MemoryStore(self.net, self.memory_cfg)
        self.sampler = loaded.sampler()
        self.device = next(self.net.parameters()).device
        self._predictors: dict[tuple[str, ...], ComposedPredictor] = {}
        self.finetunes = 0

    def predictor(self, experts: tuple[str, ...]) -> ComposedPredictor:
        if experts not in self._predictors:
            cfg = self.memory_cfg.only(*experts)
            store = self.store if cfg.long_term else None
            self._predictors[experts] = ComposedPredictor(self.net, cfg, store)
        return self._predictors[experts]

    def release(self, episode_id: str) -> None:
        if episode_id in self.store:
            self.store.evict(episode_id)

    # ----- observe ----------------------------------------------------------------------
    def parse_observe(self, request: Any, slot: EpisodeSlot) -> tuple[torch.Tensor, ...]:
        request = _check_keys(request, {"obs", "actions", "positions", "episode_id"}, "observe")
        n, d, p = self.net.n_agents, self.net.obs_dim, self.memory_cfg.key_dim
        first = 1 if slot.memory is None else 0  # a fresh episode starts with o_0
        layout = "[T + 1, N, D] (o_0..o_T: a new episode)" if first else "[T, N, D]"
        obs = _array(request, "obs", (None, n, d), layout, root="")
        rows = obs.shape[0] - first
        if rows < 0 or rows > self.config.max_observe_steps:
            raise RequestError(
                "obs", f"brings {rows} steps: must be 0..{self.config.max_observe_steps} "
                f"(max_observe_steps); a new episode needs o_0 first"
            )  # fmt: skip
        pos_layout = layout.replace("D", "P").replace("o_", "p_")
        positions = _array(request, "positions", (rows + first, n, p), pos_layout, root="")
        actions = parse_actions(request.get("actions", []) if rows else np.zeros((0, n)), rows,
                                self.net, "actions")  # fmt: skip
        as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)  # noqa: E731
        return as_t(obs), actions.to(self.device), as_t(positions)

    def observe(self, slot: EpisodeSlot, obs, actions, positions) -> dict[str, Any]:
        """Append real steps; finetune the episode's adapter when the schedule says so."""
        fresh = slot.memory is None
        if fresh:
            slot.memory = EpisodeMemory(
                self.memory_cfg,
                n_agents=self.net.n_agents,
                obs_dim=self.net.obs_dim,
                action_dim=self.net.action_dim,
                episode_id=slot.episode_id,
                device=self.device,
            )
            slot.memory.reset(obs[0], positions[0])
            slot.obs, slot.positions = [obs[0]], [positions[0]]
            obs, positions = obs[1:], positions[1:]
        for action, o, pos in zip(actions, obs, positions, strict=True):
            slot.memory.observe(action, o, pos)
            slot.obs.append(o)
            slot.actions.append(action)
            slot.positions.append(pos)
        self._trim(slot)
        slot.since_finetune += len(actions)
        slot.total_steps += len(actions)
        logs: dict[str, float] = {}
        if slot.since_finetune >= self.config.finetune_every:
            logs = self.finetune(slot)
        return {
            "episode_id": slot.episode_id,
            "fresh": fresh,
            "memory_steps": slot.steps,
            "observed": len(actions),
            "finetuned": bool(logs),
            "finetunes": slot.finetunes,
            "adapter": slot.episode_id in self.store,
            **logs,
        }

    def finetune(self, slot: EpisodeSlot) -> dict[str, float]:
        seed = self.config.finetune_seed + slot.finetunes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the LoRA init of a new adapter draws from the global RNG
            gen = torch.Generator(device=self.device).manual_seed(seed)
            logs = self.store.finetune(slot.episode_id, slot.history(), generator=gen)
        slot.finetunes += 1
        slot.since_finetune = 0
        self.finetunes += 1
        return logs

    def _trim(self, slot: EpisodeSlot) -> None:
        extra = slot.steps - self.config.max_history
        if extra > 0:
            del slot.obs[:extra], slot.actions[:extra], slot.positions[:extra]

    # ----- imagine ----------------------------------------------------------------------
    def parse_imagine(self, request: Any, slot: EpisodeSlot) -> dict[str, Any]:
        allowed = {"actions", "positions", "horizon", "seed", "experts", "start", "num_samples",
                   "noise_scale", "episode_id"}  # fmt: skip
        request = _check_keys(request, allowed, "imagine")
        n, d, p = self.net.n_agents, self.net.obs_dim, self.memory_cfg.key_dim
        horizon = _int(request, "horizon", -1, 1, self.config.max_horizon)
        positions = _array(request, "positions", (horizon, n, p), "[H, N, P]", root="")
        actions = parse_actions(request.get("actions"), horizon, self.net, "actions")
        start = request.get("start")
        if start is None and slot.memory is None:
            raise RequestError(
                "start",
                f"episode {slot.episode_id!r} has no memory on this replica (new, forgotten or "
                "evicted): send start = {'obs': [N, D], 'positions': [N, P]} or observe it first",
            )
        if start is not None:
            start = _check_keys(start, {"obs", "positions"}, "start")
            start = {
                "obs": _array(start, "obs", (n, d), "[N, D]", root="start."),
                "positions": _array(start, "positions", (n, p), "[N, P]", root="start."),
            }
        noise = request.get("noise_scale")
        if noise is not None and (not isinstance(noise, (int, float)) or noise < 0):
            raise RequestError("noise_scale", f"is {noise!r}: must be a number >= 0 or null")
        return {
            "horizon": horizon,
            "actions": actions.to(self.device),
            "positions": torch.as_tensor(positions, dtype=torch.float32, device=self.device),
            "start": start,
            "seed": _int(request, "seed", 0, 0, 2**63 - 1),
            "num_samples": _int(request, "num_samples", 1, 1, self.config.max_num_samples),
            "experts": parse_experts(request.get("experts"), self.memory_cfg.enabled_experts),
            "noise_scale": noise,
        }

    def imagine(self, slot: EpisodeSlot, job: dict[str, Any]) -> dict[str, Any]:
        """Copies of the episode's memory (the real memory is not touched) rolled H steps."""
        memory = self._start_memory(slot, job["start"])
        s = job["num_samples"]
        memories = [copy.deepcopy(memory) for _ in range(s)]
        predictor = self.predictor(job["experts"])
        gen = torch.Generator(device=self.device).manual_seed(job["seed"])
        sampler = self.sampler
        if job["noise_scale"] is not None:
            sampler = copy.copy(self.sampler)
            sampler.cfg = self.sampler.cfg.replace(noise_scale=float(job["noise_scale"]))
        actions = job["actions"][None].expand(s, -1, -1, -1)  # [S, H, N, A]
        positions = job["positions"][None].expand(s, -1, -1, -1)  # [S, H, N, P]
        out = imagine(predictor, sampler, memories, actions, positions, generator=gen)
        return {
            "episode_id": slot.episode_id,
            "obs": out.cpu().numpy(),  # [S, H, N, D]
            "experts": list(job["experts"]),
            "seed": job["seed"],
            "memory_steps": slot.steps,
            "fresh": slot.memory is None,
            "adapter": slot.episode_id in self.store,
            "finetunes": slot.finetunes,
        }

    def _start_memory(self, slot: EpisodeSlot, start: dict | None) -> EpisodeMemory:
        """The episode's memory; with ``start`` the short-term context restarts there (the
        spatial and long-term memory stay: e.g. imagining from a revisited state)."""
        if slot.memory is None:
            memory = EpisodeMemory(
                self.memory_cfg,
                n_agents=self.net.n_agents,
                obs_dim=self.net.obs_dim,
                action_dim=self.net.action_dim,
                episode_id=slot.episode_id,
                device=self.device,
            )
        else:
            memory = copy.deepcopy(slot.memory)
        if start is not None:
            as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)  # noqa: E731
            memory.frames.clear()
            memory.obs = as_t(start["obs"])
            memory.spatial.add(as_t(start["positions"]), memory.obs)
        return memory

    def forget(self, slot: EpisodeSlot) -> dict[str, Any]:
        had = slot.steps
        self.release(slot.episode_id)
        slot.clear()
        return {"episode_id": slot.episode_id, "forgot_steps": had, "memory_steps": 0}


# ---------------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------------


def _episode_field(request: Any) -> str | None:
    return request.get("episode_id") if isinstance(request, dict) else None


app = FastAPI(
    title="moedream memory world model",
    description="Per-episode memory experts (short-term, LoRA long-term, spatial) over HTTP. "
    f"Send the episode id in the `{EPISODE_HEADER}` header.",
    version="1",
)
app.add_exception_handler(RequestValidationError, on_validation_error)
app.add_exception_handler(RequestError, on_request_error)


@serve.deployment(
    name=MEMORY_DEPLOYMENT_NAME,
    max_ongoing_requests=16,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10.0,
    health_check_timeout_s=60.0,
)
@serve.ingress(app)
class MemoryWorldModelDeployment:
    """One memory checkpoint; per-episode memory multiplexed by episode id (LRU-bounded)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = MemoryServeConfig.from_dict(config)
        if not self.config.checkpoint:
            raise ValueError("MemoryWorldModelDeployment: `checkpoint` is required")
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        device = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.engine = MemoryEngine(load_memory_checkpoint(self.config.checkpoint, map_location=device),
                                   self.config)  # fmt: skip
        # One worker thread: torch work in request order (the store's active adapter is global).
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="memory")
        self._held: OrderedDict[str, None] = OrderedDict()  # episodes held, LRU first
        self._lock = threading.Lock()
        self.evictions = 0

        async def load_episode(episode_id: str) -> EpisodeSlot:  # a function: Serve sets attrs
            return await self._new_slot(episode_id)

        bound = self.config.max_episodes  # fixed for the replica's life (Serve's multiplexer)
        self.load_episode = serve.multiplexed(max_num_models_per_replica=bound)(load_episode)

    async def _new_slot(self, episode_id: str) -> EpisodeSlot:
        with self._lock:
            self._held[episode_id] = None
        return EpisodeSlot(episode_id, self._on_evicted)

    def _on_evicted(self, episode_id: str) -> None:
        """Serve evicted the slot (LRU): drop its adapter on the worker, after queued work."""
        with self._lock:
            self._held.pop(episode_id, None)
            self.evictions += 1
        try:
            self._worker.submit(self.engine.release, episode_id)
        except RuntimeError:  # the worker is shut down: the replica is exiting
            pass

    async def _slot(self, episode_id: str | None) -> EpisodeSlot:
        routed = serve.get_multiplexed_model_id()
        if episode_id is not None and routed and episode_id != routed:
            raise RequestError(
                "episode_id", f"{episode_id!r} differs from the multiplexed id {routed!r}: "
                "send one episode id (handle.options(multiplexed_model_id=...))"
            )  # fmt: skip
        episode_id = episode_id or routed
        if not isinstance(episode_id, str) or not episode_id:
            raise RequestError(
                "episode_id", f"is missing: send the `{EPISODE_HEADER}` header or call "
                "handle.options(multiplexed_model_id=episode_id)"
            )  # fmt: skip
        slot = await self.load_episode(episode_id)
        with self._lock:
            self._held.move_to_end(episode_id)
        return slot

    async def _run(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # ------------------------------------------------------------------ handle API

    async def observe(self, steps: dict[str, Any], episode_id: str | None = None) -> dict[str, Any]:
        """steps = {"obs": [T(+1), N, D], "actions": [T, N] or [T, N, A], "positions":
        [T(+1), N, P]} (a new episode sends o_0 first: T + 1 rows of obs and positions)."""
        slot = await self._slot(episode_id or _episode_field(steps))
        parsed = await self._run(self.engine.parse_observe, steps, slot)
        return await self._run(self.engine.observe, slot, *parsed)

    async def imagine(
        self, request: dict[str, Any], episode_id: str | None = None
    ) -> dict[str, Any]:
        """{"actions": [H, N] | [H, N, A], "positions": [H, N, P], "horizon": H, "seed",
        "experts": [...], "start": {"obs", "positions"} (optional), "num_samples",
        "noise_scale"} -> {"obs": [S, H, N, D], "memory_steps", "adapter", "fresh", ...}."""
        slot = await self._slot(episode_id or _episode_field(request))
        job = await self._run(self.engine.parse_imagine, request, slot)
        return await self._run(self.engine.imagine, slot, job)

    async def forget(self, episode_id: str | None = None) -> dict[str, Any]:
        slot = await self._slot(episode_id)
        return await self._run(self.engine.forget, slot)

    async def stats(self) -> dict[str, Any]:
        def collect() -> dict[str, Any]:  # on the worker: after queued evictions ran
            with self._lock:
                held, evictions = list(self._held), self.evictions
            return {
                "episodes": held,
                "episodes_held": len(held),
                "max_episodes": self.config.max_episodes,
                "evictions": evictions,
                "adapters": self.engine.store.episode_ids,
                "finetunes": self.engine.finetunes,
                "checkpoint_id": self.engine.loaded.checkpoint_id,
                "replica_id": replica_id,
            }

        replica_id = serve.get_replica_context().replica_id.unique_id
        return await self._run(collect)

    async def check_health(self) -> None:
        """Serve calls this periodically: the worker thread must still take work."""
        await asyncio.wait_for(self._run(lambda: None), timeout=50.0)

    # ------------------------------------------------------------------ HTTP routes

    @app.post("/v1/observe")
    async def http_observe(self, request: Request) -> JSONResponse:
        return JSONResponse(json_ready(await self.observe(await request.json())))

    @app.post("/v1/imagine")
    async def http_imagine(self, request: Request) -> JSONResponse:
        return JSONResponse(json_ready(await self.imagine(await request.json())))

    @app.post("/v1/forget")
    async def http_forget(self) -> dict[str, Any]:
        return await self.forget()

    @app.get("/v1/stats")
    async def http_stats(self) -> dict[str, Any]:
        return await self.stats()


def build_memory_app(args: dict[str, Any] | None = None) -> Application:
    """The application for ``serve run moedream.platform.serve.memory_app:build_memory_app
    checkpoint=...``; ``args`` are :class:`MemoryServeConfig` fields (``checkpoint`` required)."""
    config = MemoryServeConfig.from_dict(dict(args or {}))
    if not config.checkpoint:
        raise ValueError("build_memory_app: args.checkpoint is required (a memory checkpoint)")
    return MemoryWorldModelDeployment.bind(config.to_dict())
