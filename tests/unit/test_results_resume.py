"""Resume points of a results run: written whole or not at all, only the newest kept, and the
episode store a model-based run retrains on survives a save and restore."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from moedream.data.episodes import Episode
from moedream.envs.spec import EnvSpec
from moedream.platform.retrain import RealEpisodeStore
from moedream.results.resume import RunCheckpoints


def point(evaluations: int) -> dict:
    return {"evaluations": evaluations, "real_steps": 1200 + 8000 * (evaluations - 1),
            "offset": 1200, "wallclock_s": 10.0 * evaluations, "next_mark": 16000}  # fmt: skip


def write_files(folder):
    folder.mkdir()
    (folder / "algorithm_state.pkl").write_bytes(b"state")


def test_save_keeps_only_the_newest_point_and_reads_it_back(tmp_path):
    checkpoints = RunCheckpoints(tmp_path)
    assert checkpoints.latest() is None
    checkpoints.save(point(1), write_files)
    saved = checkpoints.save(point(2), write_files)
    latest = checkpoints.latest()
    assert latest == saved and latest.evaluations == 2 and latest.team_real_steps == 8000
    assert (checkpoints.path(latest) / "algorithm_state.pkl").read_bytes() == b"state"
    assert sorted(p.name for p in checkpoints.dir.iterdir()) == ["eval_00002", "resume.json"]


def test_a_kill_while_writing_leaves_the_previous_point_whole(tmp_path):
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(point(1), write_files)

    def killed(folder):
        write_files(folder)
        raise KeyboardInterrupt  # e.g. SIGINT half way through RLlib's save_to_path

    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(point(2), killed)
    assert checkpoints.latest().evaluations == 1
    assert sorted(p.name for p in checkpoints.dir.iterdir()) == ["eval_00001", "resume.json"]
    # a folder renamed before the pointer moved (a kill between the two) is written again
    (checkpoints.dir / "eval_00002").mkdir()
    assert checkpoints.latest().evaluations == 1
    assert checkpoints.save(point(2), write_files).evaluations == 2


def test_a_pointer_to_a_missing_or_unreadable_point_means_no_resume(tmp_path):
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(point(1), write_files)
    checkpoints.pointer.write_text("{not json")
    assert checkpoints.latest() is None
    checkpoints.save(point(1), write_files)
    checkpoints.path(checkpoints.latest()).rename(tmp_path / "elsewhere")
    assert checkpoints.latest() is None


def test_episode_store_state_round_trips_through_a_pickle(tmp_path):
    spec = EnvSpec("toy", ("a", "b"), (3, 3), "discrete", (4, 4))
    rng = np.random.default_rng(0)

    def episode(k, length):
        return Episode(f"ep{k}", rng.normal(size=(length + 1, 2, 3)).astype(np.float32),
                       rng.integers(0, 4, size=(length, 2)), np.ones((length, 2), np.float32),
                       np.zeros((length, 2), bool), np.zeros((length, 2), bool))  # fmt: skip

    store = RealEpisodeStore(spec, max_steps=25)
    store.add([episode(0, 10), episode(1, 10), episode(2, 10)])  # the first is dropped
    restored = RealEpisodeStore(spec, max_steps=25)
    restored.set_state(pickle.loads(pickle.dumps(store.get_state())))
    assert (restored.steps, restored.added_steps, restored.dropped_steps) == (20, 30, 10)
    assert [ep.episode_id for ep in restored.episodes] == ["ep1", "ep2"]
    for key, value in store.windows(4).items():
        np.testing.assert_array_equal(restored.windows(4)[key], value)
