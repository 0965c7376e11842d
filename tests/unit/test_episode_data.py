"""Episode shards: exact round trip, windows, and clear errors on bad files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moedream.data import (
    EpisodeDataError,
    collect_episodes,
    episode_windows,
    load_windows,
    read_episodes,
    rollout_episode,
    write_shard,
)
from moedream.envs import env_spec, make_env


@pytest.mark.parametrize(
    "name,options",
    [("overcooked", {"horizon": 30}), ("mamujoco", {"max_episode_steps": 30})],
)
def test_parquet_round_trip_is_exact(tmp_path, name, options):
    spec = env_spec(name, **options)
    env = make_env(name, **options)
    episodes = [rollout_episode(env, spec, seed=s, episode_id=f"ep{s}") for s in range(3)]
    write_shard(tmp_path / "shard.parquet", episodes, spec)
    spec2, back = read_episodes(tmp_path)
    assert spec2 == spec
    assert [e.episode_id for e in back] == ["ep0", "ep1", "ep2"]
    for a, b in zip(episodes, back):
        np.testing.assert_array_equal(a.obs, b.obs)
        np.testing.assert_array_equal(a.action, b.action)
        assert a.action.dtype == b.action.dtype
        np.testing.assert_array_equal(a.reward, b.reward)
        np.testing.assert_array_equal(a.terminated, b.terminated)
        np.testing.assert_array_equal(a.truncated, b.truncated)


def test_windows_format_and_holdout(tmp_path):
    collect_episodes("overcooked", {"horizon": 40}, 5, tmp_path / "s.parquet", seed=2)
    spec, train, hold = load_windows(tmp_path, window=8, holdout=0.4)
    n, d = spec.n_agents, spec.obs_dim
    assert train["obs"].shape[1:] == (9, n, d)
    assert train["action"].shape[1:] == (8, n, 6)
    np.testing.assert_array_equal(train["action"].sum(-1), 1.0)  # one-hot
    assert train["reward"].shape[1:] == (8, n) and train["terminated"].shape[1:] == (8, n)
    assert len(train["obs"]) == 3 * 5 and len(hold["obs"]) == 2 * 5
    # Windows are consecutive slices: the next window starts where the last one ended.
    _, episodes = read_episodes(tmp_path)
    w = episode_windows(episodes[0], spec, window=8)
    np.testing.assert_array_equal(w["obs"][0, -1], w["obs"][1, 0])
    np.testing.assert_array_equal(w["obs"][1], episodes[0].obs[8:17])


def test_truncated_file_names_the_file(tmp_path):
    path = collect_episodes("overcooked", {"horizon": 20}, 1, tmp_path / "s.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EpisodeDataError, match=r"s\.parquet.*truncated"):
        read_episodes(tmp_path)


def test_foreign_parquet_is_refused(tmp_path):
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "other.parquet")
    with pytest.raises(EpisodeDataError, match=r"other\.parquet.*not a moedream episode shard"):
        read_episodes(tmp_path)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(EpisodeDataError, match="does not exist"):
        read_episodes(tmp_path / "nope.parquet")
    with pytest.raises(EpisodeDataError, match=r"no episode shards.*moedream collect"):
        read_episodes(tmp_path)


def test_half_written_shard_is_invisible(tmp_path):
    """A crash mid-write leaves only a .tmp file, which readers never pick up."""
    collect_episodes("overcooked", {"horizon": 20}, 1, tmp_path / "a.parquet")
    (tmp_path / "b.parquet.tmp").write_bytes(b"PAR1 partial")
    _, episodes = read_episodes(tmp_path)
    assert len(episodes) == 1


def test_mixed_envs_in_one_folder_are_refused(tmp_path):
    collect_episodes("overcooked", {"horizon": 20}, 1, tmp_path / "a.parquet")
    collect_episodes("mamujoco", {"max_episode_steps": 20}, 1, tmp_path / "b.parquet")
    with pytest.raises(EpisodeDataError, match=r"b\.parquet.*mamujoco.*one env per data folder"):
        read_episodes(tmp_path)


def test_window_longer_than_episodes(tmp_path):
    collect_episodes("overcooked", {"horizon": 10}, 1, tmp_path / "a.parquet")
    with pytest.raises(EpisodeDataError, match=r"no training windows of length 50.*lower `window`"):
        load_windows(tmp_path, window=50)


def test_collection_is_reproducible_across_processes(tmp_path):
    """Same seed, two fresh interpreters with different hash seeds: identical episodes."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from moedream.data import collect_episodes; "
        "collect_episodes('overcooked', {'horizon': 20}, 2, sys.argv[1], seed=5)"
    )
    for i, hash_seed in enumerate(("1", "2")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / f"r{i}" / "s.parquet")], env=env, check=True
        )
    (_, a), (_, b) = read_episodes(tmp_path / "r0"), read_episodes(tmp_path / "r1")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.action, y.action)
