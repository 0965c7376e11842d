"""Episode data: Parquet shards of multi-agent steps and fixed-length training windows."""

from moedream.data.episodes import (
    ARROW_SCHEMA,
    SCHEMA_VERSION,
    Episode,
    EpisodeDataError,
    collect_episodes,
    episode_windows,
    load_windows,
    read_episodes,
    read_spec,
    rollout_episode,
    shard_paths,
    write_shard,
)

__all__ = [
    "ARROW_SCHEMA",
    "SCHEMA_VERSION",
    "Episode",
    "EpisodeDataError",
    "collect_episodes",
    "episode_windows",
    "load_windows",
    "read_episodes",
    "read_spec",
    "rollout_episode",
    "shard_paths",
    "write_shard",
]
