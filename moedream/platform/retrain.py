"""World-model retraining during agent training: the store of real episodes and the fine-tune.

Plain numpy/PyTorch (no ray here, so it is unit-testable; the driver that fine-tunes the served
checkpoint and pushes it to Serve is ``moedream.platform.served_retrain``):

- :func:`episode_from_rllib` turns one RLlib ``MultiAgentEpisode`` (new API stack, as MBMAPPO
  samples it: possibly a chunk of a longer episode) into an :class:`~moedream.data.Episode`;
- :class:`RealEpisodeStore` keeps the newest real episodes up to a step budget (FIFO) and cuts
  them into training windows (moedream/world_model/trajectory.py format) on demand; every
  ``holdout_every``-th episode goes to a rolling hold-out instead, which no fine-tune sees (the
  coherence gate's model terms are recalibrated on it after every retrain);
- :func:`fine_tune` continues training a loaded WorldModel on a mix of the original training
  windows and the new real ones (``train_step`` + ``lr_schedule`` of train_local; the model's
  normalisation is kept, so the served input/output scale does not move under the gate);
- :func:`write_versioned_checkpoint` writes ``<root>/retrain_<iteration>/`` atomically.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moedream.data.episodes import Episode, episode_windows, write_shard
from moedream.envs.spec import EnvSpec
from moedream.world_model.model import WEIGHTS_FILE, WorldModel
from moedream.world_model.train_local import (
    TrainConfig,
    autocast_dtype,
    lr_schedule,
    make_optimizer,
    sample_batch,
    train_step,
)
from moedream.world_model.trajectory import WINDOW_KEYS

logger = logging.getLogger("moedream.retrain")

RETRAIN_PREFIX = "retrain_"
INFO_FILE = "retrain.json"


def ensure_log_handler() -> None:
    """Show the one-line retrain logs (INFO) on stderr unless logging is configured already."""
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------------
# Real episodes -> Episode
# ---------------------------------------------------------------------------------------------


def episode_from_agent_arrays(
    episode_id: str,
    spec: EnvSpec,
    per_agent: dict[str, dict[str, Any]],
) -> Episode:
    """Per-agent arrays of one simultaneous-move episode -> Episode (stacked, padded).

    ``per_agent[agent]``: ``obs`` [L + 1, d_i], ``action`` [L] ints or [L, a_i] floats,
    ``reward`` [L], ``terminated`` bool (the agent's episode ended by termination at step L).
    Continuous actions are clipped to [-1, 1] (what the env applied). Raises ValueError when
    an agent is missing or the agents' lengths differ (turn-based envs are not supported).
    """
    missing = [a for a in spec.agent_ids if a not in per_agent]
    if missing:
        raise ValueError(f"episode {episode_id!r} has no steps of agents {missing}")
    lengths = {a: len(per_agent[a]["reward"]) for a in spec.agent_ids}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"episode {episode_id!r}: agents stepped different numbers of times {lengths}; the "
            "world model needs every agent to act at every step"
        )
    length = lengths[spec.agent_ids[0]]
    n, d = spec.n_agents, spec.obs_dim
    obs = np.zeros((length + 1, n, d), dtype=np.float32)  # [L + 1, N, D]
    reward = np.zeros((length, n), dtype=np.float32)  # [L, N]
    terminated = np.zeros((length, n), dtype=bool)  # [L, N]
    if spec.action_kind == "discrete":
        action = np.zeros((length, n), dtype=np.int64)  # [L, N]
    else:
        action = np.zeros((length, n, spec.action_dim), dtype=np.float32)  # [L, N, A]
    for i, agent in enumerate(spec.agent_ids):
        arrays = per_agent[agent]
        agent_obs = np.asarray(arrays["obs"], dtype=np.float32).reshape(length + 1, -1)
        obs[:, i, : agent_obs.shape[1]] = agent_obs
        reward[:, i] = np.asarray(arrays["reward"], dtype=np.float32).reshape(length)
        if length and bool(arrays["terminated"]):
            terminated[-1, i] = True
        if spec.action_kind == "discrete":
            action[:, i] = np.asarray(arrays["action"], dtype=np.int64).reshape(length)
        else:
            agent_action = np.asarray(arrays["action"], dtype=np.float32).reshape(length, -1)
            action[:, i, : agent_action.shape[1]] = np.clip(agent_action, -1.0, 1.0)
    truncated = np.zeros_like(terminated)
    return Episode(episode_id, obs, action, reward, terminated, truncated)


def episode_from_rllib(episode: Any, spec: EnvSpec) -> Episode:
    """An RLlib ``MultiAgentEpisode`` (or a chunk of one) -> Episode.

    Reads each agent's ``SingleAgentEpisode`` (observations include the chunk's first one, so
    obs has one row more than actions). The id is ``<episode id>@<env_t_started>`` so that
    chunks of one long episode stay distinct.
    """
    per_agent = {}
    for agent in spec.agent_ids:
        sa = episode.agent_episodes.get(agent)
        if sa is None:
            continue
        per_agent[agent] = {
            "obs": _stack(sa.get_observations()),
            "action": _stack(sa.get_actions()),
            "reward": _stack(sa.get_rewards()),
            "terminated": bool(sa.is_terminated),
        }
    episode_id = f"{episode.id_}@{int(getattr(episode, 'env_t_started', 0))}"
    return episode_from_agent_arrays(episode_id, spec, per_agent)


def _stack(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    return np.stack([np.asarray(v) for v in values]) if len(values) else np.zeros((0,))


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class RealEpisodeStore:
    """The newest real episodes, at most ``max_steps`` transitions in all (oldest dropped first),
    and a rolling hold-out of at most ``holdout_max_steps`` that training never sees.

    An episode longer than ``max_steps`` keeps only its last ``max_steps`` transitions.
    ``holdout_every`` = k > 0: the k-th, 2k-th, ... episode ever added (chunks count as
    episodes) goes to the hold-out instead of the training episodes (0: no hold-out), so a
    model fine-tuned on :meth:`windows` can be checked on :meth:`held_out_windows`.
    ``shard_dir`` (optional): every :meth:`add` also writes its episodes (both kinds) as one
    Parquet shard there (moedream.data format, atomic), readable by ``moedream
    train-world-model``.
    """

    def __init__(
        self,
        spec: EnvSpec,
        max_steps: int,
        shard_dir: str | Path | None = None,
        holdout_every: int = 0,
        holdout_max_steps: int = 0,
    ):
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"RealEpisodeStore max_steps = {max_steps!r} must be an integer >= 1")
        if not isinstance(holdout_every, int) or holdout_every < 0:
            raise ValueError(
                f"RealEpisodeStore holdout_every = {holdout_every!r} must be an integer >= 0 "
                "(0: no hold-out)"
            )
        if holdout_every and (not isinstance(holdout_max_steps, int) or holdout_max_steps < 1):
            raise ValueError(
                f"RealEpisodeStore holdout_max_steps = {holdout_max_steps!r} must be an integer "
                f">= 1 with holdout_every = {holdout_every}"
            )
        self.spec, self.max_steps = spec, max_steps
        self.holdout_every, self.holdout_max_steps = holdout_every, holdout_max_steps
        self.shard_dir = Path(shard_dir) if shard_dir else None
        self._episodes: collections.deque[Episode] = collections.deque()
        self._held_out: collections.deque[Episode] = collections.deque()
        self.steps = 0
        self.held_out_steps = 0
        self.added_episodes = 0
        self.added_steps = 0
        self.dropped_steps = 0
        self.shards_written = 0

    def __len__(self) -> int:
        return len(self._episodes)

    @property
    def episodes(self) -> list[Episode]:
        """The training episodes (never the held-out ones)."""
        return list(self._episodes)

    @property
    def held_out(self) -> list[Episode]:
        """The rolling hold-out, oldest first."""
        return list(self._held_out)

    def add(self, episodes: Iterable[Episode]) -> int:
        """Store episodes with at least one step; returns the transitions added."""
        fresh = [ep for ep in episodes if ep.length > 0]
        for ep in fresh:
            self.added_episodes += 1
            self.added_steps += ep.length
            if self.holdout_every and self.added_episodes % self.holdout_every == 0:
                self.held_out_steps += self._append(self._held_out, ep, self.holdout_max_steps)
            else:
                self.steps += self._append(self._episodes, ep, self.max_steps)
        self.steps -= self._drop_oldest(self._episodes, self.steps, self.max_steps)
        self.held_out_steps -= self._drop_oldest(
            self._held_out, self.held_out_steps, self.holdout_max_steps
        )
        if fresh and self.shard_dir is not None:
            name = f"real_{self.shards_written:06d}_{uuid.uuid4().hex[:8]}.parquet"
            write_shard(self.shard_dir / name, fresh, self.spec)
            self.shards_written += 1
        return sum(ep.length for ep in fresh)

    def _append(self, queue: collections.deque[Episode], episode: Episode, cap: int) -> int:
        """Append ``episode`` (its last ``cap`` steps); returns the steps kept."""
        queue.append(_last_steps(episode, cap))
        self.dropped_steps += episode.length - queue[-1].length
        return queue[-1].length

    def _drop_oldest(self, queue: collections.deque[Episode], steps: int, cap: int) -> int:
        """Drop the oldest episodes of ``queue`` until it holds <= ``cap`` steps; returns the
        steps dropped."""
        dropped = 0
        while steps - dropped > cap:
            dropped += queue.popleft().length
        self.dropped_steps += dropped
        return dropped

    def get_state(self) -> dict[str, Any]:
        """The stored episodes and counters (a resumed run retrains on the same data)."""
        return {
            "episodes": [dataclasses.asdict(ep) for ep in self._episodes],
            "held_out": [dataclasses.asdict(ep) for ep in self._held_out],
            **{k: getattr(self, k) for k in STORE_COUNTERS},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_state` (a state saved before the hold-out existed has none)."""
        self._episodes = collections.deque(Episode(**ep) for ep in state["episodes"])
        self._held_out = collections.deque(Episode(**ep) for ep in state.get("held_out", []))
        for key in STORE_COUNTERS:
            setattr(self, key, int(state.get(key, 0)))

    def windows(self, window: int, stride: int | None = None) -> dict[str, np.ndarray]:
        """Training windows of the training episodes (those shorter than ``window`` give none):
        obs [M, T+1, N, D], action [M, T, N, A], reward [M, T, N], terminated [M, T, N]."""
        return _windows_of(self._episodes, self.spec, window, stride)

    def held_out_windows(self, window: int, max_windows: int) -> dict[str, np.ndarray]:
        """Non-overlapping windows of ``window`` steps of the hold-out, at most
        ``max_windows``, the newest episodes' first ({} while none is long enough)."""
        out = _windows_of(reversed(self._held_out), self.spec, window, window)
        return {k: v[:max_windows] for k, v in out.items()}


STORE_COUNTERS = ("steps", "held_out_steps", "added_episodes", "added_steps", "dropped_steps",
                  "shards_written")  # fmt: skip


def _windows_of(
    episodes: Iterable[Episode], spec: EnvSpec, window: int, stride: int | None
) -> dict[str, np.ndarray]:
    parts = [episode_windows(ep, spec, window, stride) for ep in episodes]
    return concat_windows([p for p in parts if p])


def _last_steps(episode: Episode, max_steps: int) -> Episode:
    if episode.length <= max_steps:
        return episode
    cut = episode.length - max_steps
    return Episode(
        episode.episode_id,
        episode.obs[cut:],
        episode.action[cut:],
        episode.reward[cut:],
        episode.terminated[cut:],
        episode.truncated[cut:],
    )


def concat_windows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate window dicts along the batch axis ({} when there are none)."""
    parts = [p for p in parts if p and len(p["obs"])]
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in WINDOW_KEYS}


# ---------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------


def fine_tune(
    model: WorldModel,
    new_windows: dict[str, np.ndarray],
    cfg: TrainConfig,
    *,
    base_windows: dict[str, np.ndarray] | None = None,
    new_fraction: float = 0.5,
    progress: bool = False,
) -> dict[str, float]:
    """Continue training ``model`` for ``cfg.steps`` steps; returns the loss summary.

    Each batch of ``cfg.batch_size`` windows takes ``round(new_fraction * batch_size)`` (at
    least 1) from ``new_windows`` and the rest from ``base_windows`` (all from the new ones
    when there are no base windows). Before training, the imagined-observation support
    widens to cover the new windows (``WorldModel.widen_support``) and the reward
    statistics are refitted to all the windows with the heads rescaled to match
    (``WorldModel.refit_reward_normalization``); the other statistics stay as trained.
    Returns ``loss_first`` / ``loss_last`` (means over the first / last tenth of the steps),
    ``loss`` (= loss_last), ``steps``, ``seconds``.
    """
    from tqdm.auto import tqdm

    cfg.validate()
    if not new_windows:
        raise ValueError("fine_tune: no new windows; observe real episodes of >= window steps")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    model.widen_support(new_windows)
    model.refit_reward_normalization(
        concat_windows([new_windows, base_windows]) if base_windows else new_windows
    )
    n_new = cfg.batch_size
    if base_windows:
        n_new = min(cfg.batch_size, max(1, round(new_fraction * cfg.batch_size)))
    device = model.obs_mean.device
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = lr_schedule(optimizer, cfg)
    dtype = autocast_dtype(cfg.precision, device)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="world model retrain", disable=not progress, mininterval=2.0)
    for _ in bar:
        batch = sample_batch(new_windows, n_new, rng)
        if n_new < cfg.batch_size:
            base = sample_batch(base_windows, cfg.batch_size - n_new, rng)
            batch = {k: np.concatenate([batch[k], base[k]]) for k in WINDOW_KEYS}
        logs = train_step(
            model, optimizer, batch, scheduler=scheduler, autocast=dtype, grad_clip=cfg.grad_clip
        )
        losses.append(float(logs["wm/loss"]))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    tenth = max(1, len(losses) // 10)
    last = float(np.mean(losses[-tenth:]))
    return {
        "loss": last,
        "loss_first": float(np.mean(losses[:tenth])),
        "loss_last": last,
        "steps": float(len(losses)),
        "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------------------------
# Versioned checkpoints
# ---------------------------------------------------------------------------------------------


def write_versioned_checkpoint(
    model: WorldModel, root: str | Path, iteration: int, info: dict[str, Any]
) -> Path:
    """Write ``<root>/retrain_<iteration>/world_model.safetensors`` (+ retrain.json) atomically:
    both go to a temporary folder that is renamed when complete. A folder that already exists
    (e.g. the same iteration after a restore) is never overwritten: ``_2``, ``_3``... follow.
    Returns the weights file."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_{RETRAIN_PREFIX}{iteration}_{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    model.save(tmp / WEIGHTS_FILE)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    name, k = f"{RETRAIN_PREFIX}{iteration}", 1
    while True:
        final = root / name
        try:
            os.rename(tmp, final)  # atomic; fails if `final` exists (and is not empty)
            return final / WEIGHTS_FILE
        except OSError:
            if not final.exists():
                raise
            k += 1
            name = f"{RETRAIN_PREFIX}{iteration}_{k}"
