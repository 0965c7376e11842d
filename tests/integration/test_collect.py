"""Parallel collection on the shared local Ray cluster (the whole main job: test_quickstart.py)."""

from __future__ import annotations

import pytest

from moedream.data import load_windows, read_episodes
from moedream.platform.collect import CollectConfig, collect_parallel

pytestmark = pytest.mark.integration


def test_collect_parallel_writes_complete_shards(ray_cluster, tmp_path):
    cfg = CollectConfig(
        env="mamujoco",
        env_options={"max_episode_steps": 25},
        episodes=5,
        episodes_per_shard=2,
        out=str(tmp_path),
        seed=3,
    )
    paths = collect_parallel(cfg, show_progress=False)
    assert [p.name for p in paths] == [f"shard-0003-{i:05d}.parquet" for i in range(3)]
    spec, episodes = read_episodes(tmp_path)
    assert len(episodes) == 5 and len({e.episode_id for e in episodes}) == 5
    assert all(e.length == 25 for e in episodes)
    assert not list(tmp_path.glob("*.tmp"))
    _, train, _ = load_windows(tmp_path, window=5)
    assert train["obs"].shape == (25, 6, 2, 12)
