"""Per-replica episode memories of the served world model: a bounded LRU cache keyed by episode id.

An episode's memory (its spatial memory and its test-time LoRA adapter, kept by one
:class:`MemoryExperts` per loaded checkpoint) is built from the real history a caller posts
(``POST /v1/episodes``) and read by ``/v1/imagine`` requests that name the episode. The cache
holds at most ``memory.max_adapters`` episodes; posting one more evicts the least recently
used (posted or imagined from), which is counted and logged. A request naming an episode this
replica does not hold (never posted, evicted, or posted before a checkpoint swap) gets an
:class:`EpisodeError` (HTTP 404) that says which and how to fix it: never an answer from the
plain model in its place.

Why not ``@serve.multiplexed``: its loader receives only a model id, while an episode's memory
is built from the history in a request body; the cache below gives the same bound and LRU
policy per replica. The memory is per replica: with several replicas, post the history to
every replica that may serve the episode, or keep the deployment at one replica.

Threads: posting (LoRA finetuning) and imagining with memory run in worker threads; one lock
serialises every use of the memory, so an episode is never evicted or half-updated while a
rollout reads it. Nothing here imports ray.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moedream.platform.serve.schemas import RequestError
from moedream.world_model.memory import MemoryConfig, MemoryExperts, load_memory, save_memory
from moedream.world_model.model import WorldModel

logger = logging.getLogger(__name__)
REMEMBERED_EVICTIONS = 1024  # evicted ids kept to tell "evicted" from "never posted"
ATOL = 1e-5  # a continued part's first observation must match the last one posted


class EpisodeError(RequestError):
    """An episode id this replica holds no memory for (HTTP 404)."""

    status = 404


@dataclasses.dataclass
class EpisodeEntry:
    """What the cache knows of one episode (its memory lives in :class:`MemoryExperts`)."""

    steps: int
    """Real transitions posted so far: the latest posted observation is the episode's step
    ``steps``, where rollouts that name the episode start."""
    last_obs: np.ndarray  # [N, D] the latest posted observation
    posts: int = 1


class EpisodeCache:
    """Bounded LRU cache of episode memories on one loaded world model."""

    def __init__(
        self, model: WorldModel, config: MemoryConfig, checkpoint_id: str, fitted: str = ""
    ) -> None:
        self.memory = served_memory(model, config, fitted)
        self.capacity = config.max_adapters
        self.checkpoint_id = checkpoint_id
        self.entries: OrderedDict[str, EpisodeEntry] = OrderedDict()
        self.evicted: deque[str] = deque(maxlen=REMEMBERED_EVICTIONS)
        self.counts = {"posts": 0, "evictions": 0, "hits": 0, "misses": 0}
        self.lock = threading.Lock()

    def remember(
        self, episode_id: str, obs: np.ndarray, action: np.ndarray, seed: int
    ) -> dict[str, Any]:
        """Store an episode's real steps obs [L+1, N, D], actions [L, N, A] (or indices
        [L, N]); a known episode is continued (its ``obs[0]`` must be the latest posted one).
        Returns the episode's steps, whether it was new, the evicted ids and the LoRA logs."""
        with self.lock:
            entry = self.entries.get(episode_id)
            if entry is not None and not np.allclose(obs[0], entry.last_obs, atol=ATOL):
                raise RequestError(
                    "obs[0]",
                    f"differs from the latest observation posted for episode {episode_id!r} "
                    f"(step {entry.steps}): a continued episode starts where it stopped; send "
                    "another episode_id to start over",
                )
            evicted = [] if entry is not None else self._make_room()
            start = 0 if entry is None else entry.steps
            logs = remember_seeded(self.memory, episode_id, obs, action, start, seed)
            steps = start + int(obs.shape[0]) - 1
            posts = 1 if entry is None else entry.posts + 1
            self.entries[episode_id] = EpisodeEntry(steps, np.array(obs[-1]), posts)
            self.entries.move_to_end(episode_id)
            self.counts["posts"] += 1
        return {
            "episode_id": episode_id,
            "steps": steps,
            "created": entry is None,
            "evicted": evicted,
            "lora": {k: _plain(v) for k, v in (logs or {}).items()},
        }

    def _make_room(self) -> list[str]:
        evicted = []
        while len(self.entries) >= self.capacity:
            episode_id, _ = self.entries.popitem(last=False)
            self.memory.forget(episode_id)
            self.evicted.append(episode_id)
            self.counts["evictions"] += 1
            evicted.append(episode_id)
            logger.info(
                "episode memory: evicted %r (least recently used; capacity %d, %d evictions)",
                episode_id, self.capacity, self.counts["evictions"],
            )  # fmt: skip
        return evicted

    def check(self, episode_id: str) -> EpisodeEntry:
        """The entry of ``episode_id`` (marked recently used), or EpisodeError (404): the
        early check of a request, before it queues; its hit is counted when it runs."""
        with self.lock:
            return self._entry(episode_id, count_hit=False)

    def _entry(self, episode_id: str, *, count_hit: bool = True) -> EpisodeEntry:
        entry = self.entries.get(episode_id)
        if entry is None:
            self.counts["misses"] += 1  # a refused request: counted where it is refused
            raise EpisodeError("episode_id", self._why_unknown(episode_id))
        self.counts["hits"] += int(count_hit)
        self.entries.move_to_end(episode_id)
        return entry

    def _why_unknown(self, episode_id: str) -> str:
        if episode_id in self.evicted:
            what = (
                f"episode {episode_id!r} was evicted from this replica's memory (least recently "
                f"used beyond memory.max_adapters = {self.capacity})"
            )
        else:
            what = (
                f"this replica holds no memory of episode {episode_id!r} (never posted here, "
                "or posted before the checkpoint changed)"
            )
        return f"{what}: POST its real history to /v1/episodes, then imagine again"

    @contextmanager
    def reading(self, episode_id: str, model: WorldModel) -> Iterator[tuple[Any, EpisodeEntry]]:
        """Hold the memory for one rollout of ``episode_id`` on ``model``: yields (the
        ``MemoryExperts``, the entry); EpisodeError if it is gone or built on another model."""
        with self.lock:
            if self.memory.model is not model:
                raise EpisodeError(
                    "episode_id",
                    f"episode {episode_id!r} was remembered on another checkpoint than the one "
                    "now served: POST its real history to /v1/episodes again",
                )
            yield self.memory, self._entry(episode_id)

    def summary(self) -> dict[str, Any]:
        """The cache's figures for /v1/episodes and the replica's stats."""
        with self.lock:
            return {
                "capacity": self.capacity,
                "cached": len(self.entries),
                "checkpoint_id": self.checkpoint_id,
                **self.counts,
                "episodes": {k: e.steps for k, e in self.entries.items()},  # LRU first
            }


def served_memory(model: WorldModel, config: MemoryConfig, fitted: str = "") -> MemoryExperts:
    """The replica's memory experts on ``model``: with ``fitted`` (a :func:`save_memory` file,
    ServeConfig.memory_checkpoint), the spatial expert's measured error and adapter weights it
    holds, under ``config`` and with none of its episodes; without, unfitted (the retrieval
    spatial expert then trusts its memory nowhere and abstains)."""
    if not fitted:
        return MemoryExperts(model, config)
    memory = load_memory(fitted, model)
    memory.set_config(config)  # ConfigError when the file was fitted with another key
    memory.spatial_stores.clear()  # the replica's episodes are the ones posted to it
    memory.store = None  # LoRA adapters too; the first post copies the loaded model's denoiser
    return memory


def fit_served_memory(checkpoint: str, data: str, config: MemoryConfig, out: str | Path) -> Path:
    """Measure the spatial expert's error (:meth:`MemoryExperts.fit_spatial`) on the real
    episode shards ``data`` with the world model ``checkpoint``, and write it (no episode in
    it) to ``out``, the file ServeConfig.memory_checkpoint names."""
    from moedream.data import read_episodes

    model = WorldModel.load(checkpoint, map_location="cpu")
    _, episodes = read_episodes(data)
    memory = MemoryExperts(model, config)
    info = memory.fit_spatial([(e.obs, e.action) for e in episodes])
    logger.info("served memory fitted on %d real episodes of %s (%d memory answers): %s",
                len(episodes), data, info["hits"], out)  # fmt: skip
    return save_memory(memory, out)


def remember_seeded(
    memory: MemoryExperts, episode_id: str, obs: Any, action: Any, start_step: int, seed: int
) -> dict[str, float]:
    """``memory.remember`` as a function of ``seed`` alone: the minibatches and noise come from
    a generator, and a new LoRA adapter's initial weights (peft draws them from torch's global
    RNG) from the global RNG seeded here and restored after."""
    device = memory.model.obs_mean.device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return memory.remember(episode_id, obs, action, start_step=start_step, generator=generator)


def _plain(value: Any) -> float | None:
    """A LoRA finetuning log value -> a JSON number (NaN/inf -> null: JSON has no such numbers)."""
    value = float(value)
    return value if np.isfinite(value) else None
