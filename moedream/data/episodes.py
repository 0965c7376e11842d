"""Episode shards: Parquet files of multi-agent steps, and fixed-length training windows.

Schema (version 1): one row per (episode, step); per-agent values are flattened in the
order of ``EnvSpec.agent_ids`` (N agents, observations zero-padded to D = ``EnvSpec.obs_dim``).

    episode_id  string              unique per episode ("<run>-<seed>-<k>")
    step        int32               0-based step within the episode
    obs         list<float32>       [N * D] observation before the step
    next_obs    list<float32>       [N * D] observation after the step
    action      list<float32>       [N] action indices (discrete) or [N * A] vectors
    reward      list<float32>       [N]
    terminated  list<bool>          [N]
    truncated   list<bool>          [N]

File metadata: ``moedream.schema_version`` ("1"), ``moedream.env_spec`` (EnvSpec JSON: env name
and full config, agents, sizes), ``moedream.episodes`` (episode count). A shard is written to a
hidden temp file beside it and renamed when complete, so readers (which only read ``*.parquet``)
never see a half-written shard, even if the writer crashes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moedream.envs.spec import EnvSpec
from moedream.files import atomic_path

SCHEMA_VERSION = "1"
_META_VERSION = b"moedream.schema_version"
_META_SPEC = b"moedream.env_spec"
_META_EPISODES = b"moedream.episodes"

ARROW_SCHEMA = pa.schema(
    [
        ("episode_id", pa.string()),
        ("step", pa.int32()),
        ("obs", pa.list_(pa.float32())),
        ("next_obs", pa.list_(pa.float32())),
        ("action", pa.list_(pa.float32())),
        ("reward", pa.list_(pa.float32())),
        ("terminated", pa.list_(pa.bool_())),
        ("truncated", pa.list_(pa.bool_())),
    ]
)


class EpisodeDataError(ValueError):
    """An episode file or folder is missing, truncated, foreign or inconsistent."""


@dataclasses.dataclass
class Episode:
    """One episode as arrays. L = steps.

    obs [L + 1, N, D], action [L, N] (discrete) or [L, N, A], reward [L, N],
    terminated [L, N] bool, truncated [L, N] bool.
    """

    episode_id: str
    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray

    @property
    def length(self) -> int:
        return int(self.reward.shape[0])


# ---------------------------------------------------------------------------------------- write


def episode_to_table(episode: Episode) -> pa.Table:
    n_steps = episode.length
    flat = lambda a: [row.reshape(-1).tolist() for row in a]  # noqa: E731
    return pa.table(
        {
            "episode_id": [episode.episode_id] * n_steps,
            "step": np.arange(n_steps, dtype=np.int32),
            "obs": flat(episode.obs[:-1]),
            "next_obs": flat(episode.obs[1:]),
            "action": flat(np.asarray(episode.action, dtype=np.float32)),
            "reward": flat(episode.reward.astype(np.float32)),
            "terminated": flat(episode.terminated.astype(bool)),
            "truncated": flat(episode.truncated.astype(bool)),
        },
        schema=ARROW_SCHEMA,
    )


def write_shard(path: str | Path, episodes: list[Episode], spec: EnvSpec) -> Path:
    """Write ``episodes`` to one Parquet shard atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tables = [episode_to_table(ep) for ep in episodes]
    table = pa.concat_tables(tables) if tables else ARROW_SCHEMA.empty_table()
    table = table.replace_schema_metadata(
        {
            _META_VERSION: SCHEMA_VERSION.encode(),
            _META_SPEC: spec.to_json().encode(),
            _META_EPISODES: str(len(episodes)).encode(),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


# ---------------------------------------------------------------------------------- rollouts

Policy = Callable[[dict[str, np.ndarray]], dict[str, Any]]


def random_policy(env: Any) -> Policy:
    return lambda obs: {a: env.action_space(a).sample() for a in obs}


def rollout_episode(
    env: Any, spec: EnvSpec, seed: int, episode_id: str, policy: Policy | None = None
) -> Episode:
    """Run one episode of a PettingZoo ParallelEnv and return it as arrays."""
    obs, _ = env.reset(seed=seed)
    for index, agent in enumerate(env.possible_agents):
        # A stable per-agent offset: hash(str) changes per process (PYTHONHASHSEED).
        env.action_space(agent).seed(seed * 1009 + index)
    policy = policy or random_policy(env)
    observations = [spec.stack_obs(obs)]
    actions, rewards, terms, truncs = [], [], [], []
    while env.agents:
        joint = policy(obs)
        obs, rew, term, trunc, _ = env.step(joint)
        observations.append(spec.stack_obs(obs))
        actions.append(spec.stack_actions(joint))
        rewards.append([rew[a] for a in spec.agent_ids])
        terms.append([term[a] for a in spec.agent_ids])
        truncs.append([trunc[a] for a in spec.agent_ids])
    return Episode(
        episode_id=episode_id,
        obs=np.stack(observations),
        action=np.stack(actions),
        reward=np.asarray(rewards, dtype=np.float32),
        terminated=np.asarray(terms, dtype=bool),
        truncated=np.asarray(truncs, dtype=bool),
    )


def collect_episodes(
    env_name: str,
    env_options: dict[str, Any] | None,
    n_episodes: int,
    out_path: str | Path,
    *,
    seed: int = 0,
    run_id: str = "run",
    policy_factory: Callable[[Any], Policy] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Collect ``n_episodes`` in this process into the shard ``out_path`` (Parquet)."""
    from moedream.envs import env_spec, make_env

    env_options = dict(env_options or {})
    env = make_env(env_name, **env_options)
    spec = env_spec(env_name, **env_options)
    policy = policy_factory(env) if policy_factory else None
    episodes = []
    for k in range(n_episodes):
        ep_seed = seed * 100_003 + k
        episodes.append(rollout_episode(env, spec, ep_seed, f"{run_id}-{seed}-{k}", policy))
        if progress:
            progress(1)
    env.close()
    return write_shard(out_path, episodes, spec)


# ----------------------------------------------------------------------------------------- read


def shard_paths(path: str | Path | Iterable[str | Path]) -> list[Path]:
    """The complete shards under a folder, or the given files. Temp files are never read."""
    if isinstance(path, (str, Path)):
        p = Path(path)
        if p.is_dir():
            files = sorted(p.glob("*.parquet"))
            if not files:
                raise EpisodeDataError(
                    f"no episode shards (*.parquet) in {str(p)!r}; run `moedream collect --out {p}` first"
                )
            return files
        if not p.exists():
            raise EpisodeDataError(f"episode data path {str(p)!r} does not exist")
        return [p]
    return [Path(x) for x in path]


def read_spec(path: str | Path) -> EnvSpec:
    """The EnvSpec stored in a shard's metadata (checks that it is a moedream shard)."""
    meta = _read_metadata(Path(path))
    return EnvSpec.from_json(meta[_META_SPEC].decode())


def _read_metadata(path: Path) -> dict[bytes, bytes]:
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as err:
        raise EpisodeDataError(
            f"{str(path)!r} is not a readable Parquet file ({err}); it may be truncated: "
            "delete it and collect again"
        ) from None
    if _META_VERSION not in meta or _META_SPEC not in meta:
        raise EpisodeDataError(
            f"{str(path)!r} is not a moedream episode shard (no moedream.schema_version metadata)"
        )
    version = meta[_META_VERSION].decode()
    if version != SCHEMA_VERSION:
        raise EpisodeDataError(
            f"{str(path)!r} has episode schema version {version}, this moedream reads "
            f"version {SCHEMA_VERSION}; re-collect the data with this version"
        )
    return meta


def read_episodes(path: str | Path | Iterable[str | Path]) -> tuple[EnvSpec, list[Episode]]:
    """All episodes of the shards at ``path`` (a folder or files); all must share one env."""
    spec: EnvSpec | None = None
    episodes: list[Episode] = []
    for file in shard_paths(path):
        file_spec = EnvSpec.from_json(_read_metadata(file)[_META_SPEC].decode())
        if spec is not None and file_spec != spec:
            raise EpisodeDataError(
                f"{str(file)!r} holds env {file_spec.env_name} {file_spec.env_config}, but earlier "
                f"shards hold {spec.env_name} {spec.env_config}; keep one env per data folder"
            )
        spec = file_spec
        try:
            table = pq.read_table(file, schema=ARROW_SCHEMA)
        except (pa.ArrowInvalid, OSError) as err:
            raise EpisodeDataError(
                f"{str(file)!r} cannot be read ({err}); delete and re-collect"
            ) from None
        episodes.extend(_table_to_episodes(table, file_spec, file))
    assert spec is not None
    return spec, episodes


def _table_to_episodes(table: pa.Table, spec: EnvSpec, file: Path) -> list[Episode]:
    n, d = spec.n_agents, spec.obs_dim
    a = 1 if spec.action_kind == "discrete" else spec.action_dim
    cols = {name: table.column(name) for name in table.column_names}
    ids = cols["episode_id"].to_numpy(zero_copy_only=False)
    steps = cols["step"].to_numpy()

    def arr(name: str, width: int, dtype) -> np.ndarray:
        flat = cols[name].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        if flat.size != len(table) * width:
            raise EpisodeDataError(f"{str(file)!r}: column {name!r} has rows of the wrong size")
        return flat.astype(dtype).reshape(len(table), width)

    obs, next_obs = arr("obs", n * d, np.float32), arr("next_obs", n * d, np.float32)
    action, reward = arr("action", n * a, np.float32), arr("reward", n, np.float32)
    term, trunc = arr("terminated", n, bool), arr("truncated", n, bool)
    episodes = []
    for ep_id in dict.fromkeys(ids):  # first-seen order
        rows = np.flatnonzero(ids == ep_id)
        rows = rows[np.argsort(steps[rows])]
        if not np.array_equal(steps[rows], np.arange(len(rows))):
            raise EpisodeDataError(
                f"{str(file)!r}: episode {ep_id!r} has missing or repeated steps"
            )
        ep_action = action[rows].reshape(len(rows), n, a)
        episodes.append(
            Episode(
                episode_id=str(ep_id),
                obs=np.concatenate([obs[rows], next_obs[rows[-1:]]]).reshape(len(rows) + 1, n, d),
                action=ep_action[..., 0].astype(np.int64)
                if spec.action_kind == "discrete"
                else ep_action,
                reward=reward[rows],
                terminated=term[rows],
                truncated=trunc[rows],
            )
        )
    return episodes


# -------------------------------------------------------------------------------------- windows


def episode_windows(
    episode: Episode, spec: EnvSpec, window: int, stride: int | None = None
) -> dict[str, np.ndarray]:
    """Fixed-length windows of one episode in the training-window format
    (moedream/world_model/trajectory.py): obs [M, T+1, N, D], action [M, T, N, A] encoded,
    reward [M, T, N], terminated [M, T, N] float32."""
    stride = stride or window
    starts = range(0, episode.length - window + 1, stride)
    action = spec.encode_actions(episode.action)
    pick = lambda a, extra=0: np.stack([a[s : s + window + extra] for s in starts])  # noqa: E731
    if not len(starts):
        return {}
    return {
        "obs": pick(episode.obs, 1),
        "action": pick(action),
        "reward": pick(episode.reward),
        "terminated": pick(episode.terminated.astype(np.float32)),
    }


def load_windows(
    path: str | Path | Iterable[str | Path],
    window: int,
    *,
    stride: int | None = None,
    holdout: float = 0.0,
    seed: int = 0,
) -> tuple[EnvSpec, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Windows of length ``window`` from all episodes at ``path``, split by episode into
    (train, holdout) with a fraction ``holdout`` of the episodes held out."""
    if window < 1:
        raise EpisodeDataError(f"window = {window} must be >= 1")
    spec, episodes = read_episodes(path)
    order = np.random.default_rng(seed).permutation(len(episodes))
    n_hold = int(round(holdout * len(episodes)))
    if holdout > 0 and n_hold == 0 and len(episodes) > 1:
        n_hold = 1
    held = set(order[:n_hold].tolist())
    parts: dict[str, list] = {"train": [], "holdout": []}
    for i, ep in enumerate(episodes):
        w = episode_windows(ep, spec, window, stride)
        if w:
            parts["holdout" if i in held else "train"].append(w)
    merged = {k: _concat(v) for k, v in parts.items()}
    if not merged["train"]:
        raise EpisodeDataError(
            f"no training windows of length {window}: episodes at {path!s} are shorter; "
            "lower `window` or collect longer episodes"
        )
    return spec, merged["train"], merged["holdout"]


def _concat(windows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not windows:
        return {}
    return {k: np.concatenate([w[k] for w in windows]) for k in windows[0]}
