"""The central gate actor on the session's local Ray cluster: object refs, the refine loop (with
a callable and through a real Serve deployment), and counters that survive a restart."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from moedream.coherence.actor_config import GateActorConfig
from moedream.coherence.kernel import GateConfig, Normalizer, Verdict, judge
from moedream.platform.commands.calibrate_gate import (
    collect_random_episodes,
    windows_from_episodes,
)
from moedream.world_model.trajectory import Trajectories

pytestmark = pytest.mark.integration
HORIZON = 15


@pytest.fixture(scope="module")
def real():
    """A normalizer fitted on real MaMuJoCo episodes and held-out windows of other episodes."""
    episodes = collect_random_episodes("mamujoco", n_episodes=8, max_steps=150, seed=0)
    config = GateConfig()
    normalizer = Normalizer.fit([e["obs"] for e in episodes[:5]], config)
    return normalizer, windows_from_episodes(episodes[5:], HORIZON)


@pytest.fixture
def config():
    """A fresh actor name per test, so tests never share counters; REFINE re-imagines (the
    truncating refine has its own test)."""
    return GateActorConfig(
        actor_name=f"gate_{uuid.uuid4().hex[:8]}", namespace="moedream_test",
        refine_mode="reimagine",
    )  # fmt: skip


@pytest.fixture
def refine_batch(real):
    """12 (clean windows, the same windows with 3 corrupted frames) whose verdict is REFINE
    (H7 = 9/15 when the clean window had no incoherent step)."""
    normalizer, windows = real
    clean = windows.select(np.arange(20))
    obs = clean.obs.copy()
    rng = np.random.default_rng(0)
    for t in (3, 7, 11):  # each bad frame spoils the step into it and out of it
        obs[:, t] += 3.0 * normalizer.state_std * rng.normal(size=obs[:, t].shape)
    noisy = Trajectories(obs, clean.action, clean.reward, clean.terminated)
    refine = np.flatnonzero(judge(noisy, normalizer, GateConfig()).verdicts == Verdict.REFINE)
    assert len(refine) >= 12
    return clean.select(refine[:12]), noisy.select(refine[:12])


def _kill_actor(ray, gate):
    ray.kill(gate, no_restart=True)


def test_gate_judges_object_refs_and_counts(ray_cluster, real, config, tmp_path):
    from moedream.coherence.gate import get_gate, get_or_create_gate

    ray = ray_cluster
    normalizer, windows = real
    gate = get_or_create_gate(config, normalizer, tmp_path)
    expected = judge(windows, normalizer, config.kernel)
    ref = ray.put(windows)
    by_ref, by_value = ray.get(
        [
            gate.judge.remote(ref, "mamujoco", "planner"),
            gate.judge.remote(windows, "mamujoco", "planner"),
        ]
    )
    np.testing.assert_array_equal(by_ref.verdicts, expected.verdicts)
    np.testing.assert_allclose(by_ref.coherence, expected.coherence)
    np.testing.assert_array_equal(by_value.h7, expected.h7)
    # the same named actor, found again
    assert get_gate(config)._actor_id == gate._actor_id
    again = get_or_create_gate(config, normalizer, tmp_path)
    stats = ray.get(again.stats.remote())
    key = "gate/mamujoco/planner"
    n = len(windows.obs)
    assert stats[f"{key}/judged"] == 2 * n
    assert stats[f"{key}/approve"] == 2 * expected.counts()["APPROVE"]
    assert stats[f"{key}/approve_rate"] == pytest.approx(expected.counts()["APPROVE"] / n)
    assert stats[f"{key}/mean_h7"] == pytest.approx(expected.h7.mean())
    hist = [v for k, v in stats.items() if k.startswith(f"{key}/h7_hist/")]
    assert len(hist) == config.h7_bins and sum(hist) == 2 * n
    assert stats[f"{key}/reason/coherent"] == 2 * expected.counts()["APPROVE"]
    # the state on disk is what stats() reports
    on_disk = json.loads((tmp_path / f"{config.actor_name}.json").read_text())
    assert on_disk["counters"]["mamujoco"]["planner"]["judged"] == 2 * n
    with pytest.raises(ray.exceptions.RayTaskError, match="Trajectories"):
        ray.get(gate.judge.remote("not a batch"))
    _kill_actor(ray, gate)


def test_refine_with_a_cleaner_reimaginer_approves(
    ray_cluster, real, config, refine_batch, tmp_path
):
    from moedream.coherence.gate import get_or_create_gate

    ray = ray_cluster
    normalizer, _ = real
    clean, noisy = refine_batch
    clean_by_start = {c.tobytes(): i for i, c in enumerate(clean.obs[:, 0])}
    log = tmp_path / "noise_scales.txt"

    def reimagine(trajs: Trajectories, noise_scale: float) -> Trajectories:
        """Re-imagines with less noise: here, the real continuation of each start state."""
        with open(log, "a") as f:
            f.write(f"{noise_scale}\n")
        rows = [clean_by_start[s.tobytes()] for s in trajs.obs[:, 0]]
        return clean.select(rows)

    gate = get_or_create_gate(config, normalizer, tmp_path / "state", reimagine=reimagine)
    result = ray.get(gate.judge_and_refine.remote(ray.put(noisy), "mamujoco", "planner"))
    assert np.all(result.verdicts == Verdict.APPROVE)
    assert np.all(result.tries == 1)
    np.testing.assert_array_equal(result.trajectories.obs, clean.obs)
    assert [float(x) for x in log.read_text().split()] == [0.75]
    stats = ray.get(gate.stats.remote())
    key = "gate/mamujoco/planner"
    assert stats[f"{key}/entered_refine"] == 12 and stats[f"{key}/refine_recovered"] == 12
    assert stats[f"{key}/refine_attempts"] == 12 and stats[f"{key}/approve"] == 12
    _kill_actor(ray, gate)


def test_truncating_refine_keeps_coherent_prefixes_and_counts_causes(
    ray_cluster, real, config, refine_batch, tmp_path
):
    """The default refine: every trajectory keeps the steps before its first incoherent one
    (if >= min_prefix), needs no re-imaginer, and the counters say why each was not approved."""
    import dataclasses

    from moedream.coherence.gate import get_or_create_gate

    ray = ray_cluster
    normalizer, _ = real
    _, noisy = refine_batch
    config = dataclasses.replace(config, refine_mode="truncate")
    gate = get_or_create_gate(config, normalizer, tmp_path / "state")
    result = ray.get(gate.judge_and_refine.remote(noisy, "mamujoco", "planner"))
    first = judge(noisy, normalizer, config.kernel)
    incoherent = first.coherence < config.kernel.coherence_threshold
    prefix = np.argmax(incoherent, axis=1)  # every row has an incoherent step (REFINE)
    cut = prefix >= config.kernel.min_prefix
    assert cut.any()
    np.testing.assert_array_equal(result.truncated, cut)
    np.testing.assert_array_equal(result.verdicts == Verdict.APPROVE, cut)
    np.testing.assert_array_equal(result.trajectories.lengths()[cut], prefix[cut])
    stats = ray.get(gate.stats.remote())
    key = "gate/mamujoco/planner"
    assert stats[f"{key}/truncated"] == cut.sum() and stats[f"{key}/approve"] == cut.sum()
    causes = {k: v for k, v in stats.items() if k.startswith(f"{key}/causes/")}
    assert sum(v for k, v in causes.items() if not k.endswith("_rate")) == 12
    kept = [v for k, v in stats.items()
            if k.startswith(f"{key}/truncated_causes/") and not k.endswith("_rate")]  # fmt: skip
    assert sum(kept) == cut.sum()
    _kill_actor(ray, gate)


def test_refine_that_does_not_help_rejects_after_two_tries(
    ray_cluster, real, config, refine_batch, tmp_path
):
    from moedream.coherence.gate import get_or_create_gate

    ray = ray_cluster
    normalizer, windows = real
    _, noisy = refine_batch
    log = tmp_path / "noise_scales.txt"

    def reimagine(trajs: Trajectories, noise_scale: float) -> Trajectories:
        """A model that ignores the noise scale: returns the same trajectories."""
        with open(log, "a") as f:
            f.write(f"{noise_scale}\n")
        return trajs

    good = windows.select(judge(windows, normalizer, config.kernel).approved_index()[:4])
    mixed = Trajectories(
        np.concatenate([noisy.obs, good.obs]),
        np.concatenate([noisy.action, good.action]),
        np.concatenate([noisy.reward, good.reward]),
        np.concatenate([noisy.terminated, good.terminated]),
    )
    gate = get_or_create_gate(config, normalizer, tmp_path / "state", reimagine=reimagine)
    result = ray.get(gate.judge_and_refine.remote(mixed, "mamujoco", "planner"))
    assert result.verdicts.tolist() == [Verdict.REJECT] * 12 + [Verdict.APPROVE] * 4
    assert result.tries.tolist() == [2] * 12 + [0] * 4
    assert all(r.startswith("refine failed") for r in result.reasons[:12])
    assert [float(x) for x in log.read_text().split()] == [0.75, 0.5625]
    stats = ray.get(gate.stats.remote())
    assert stats["gate/mamujoco/planner/refine_attempts"] == 24
    assert stats["gate/mamujoco/planner/reject"] == 12
    _kill_actor(ray, gate)


def test_refine_through_a_serve_deployment(ray_cluster, real, config, refine_batch, tmp_path):
    """The documented request dict reaches a real Serve deployment's `imagine` method."""
    from ray import serve

    from moedream.coherence.gate import get_or_create_gate

    ray = ray_cluster
    normalizer, _ = real
    clean, noisy = refine_batch

    @serve.deployment(name="ToyWorldModel", ray_actor_options={"num_cpus": 0.1})
    class ToyWorldModel:
        """Replays the real continuation of known start states (a world model stand-in that
        checks the request format)."""

        def __init__(self, clean_dict: dict):
            self.clean = Trajectories.from_dict(clean_dict)
            self.rows = {c.tobytes(): i for i, c in enumerate(self.clean.obs[:, 0])}
            self.requests: list[dict] = []

        def imagine(self, request: dict) -> dict:
            fields = {"start_obs", "actions", "horizon", "noise_scale", "seed", "prediction"}
            assert set(request) == fields and request["prediction"] == "sample"  # the default
            start = np.asarray(request["start_obs"], dtype=np.float32)  # [B, N, D]
            actions = np.asarray(request["actions"], dtype=np.float32)  # [B, H, N, A]
            assert actions.shape[:1] == start.shape[:1] and actions.shape[1] == HORIZON
            self.requests.append({"noise_scale": request["noise_scale"], "seed": request["seed"]})
            return self.clean.select([self.rows[s.tobytes()] for s in start]).to_dict()

        def seen(self) -> list[dict]:
            return self.requests

    serve.start(proxy_location="Disabled")
    handle = serve.run(ToyWorldModel.bind(clean.to_dict()), name="gate_test_wm", route_prefix=None)
    config = config.replace(reimaginer_app="gate_test_wm", reimaginer_deployment="ToyWorldModel")
    gate = get_or_create_gate(config, normalizer, tmp_path)
    try:
        result = ray.get(gate.judge_and_refine.remote(noisy, "mamujoco", "planner", 1.0, 7))
        assert np.all(result.verdicts == Verdict.APPROVE)
        assert handle.seen.remote().result() == [{"noise_scale": 0.75, "seed": 8}]
    finally:
        _kill_actor(ray, gate)
        serve.delete("gate_test_wm")


def test_killed_gate_restarts_and_keeps_its_counters(ray_cluster, real, config, tmp_path):
    from moedream.coherence.gate import get_or_create_gate

    ray = ray_cluster
    normalizer, windows = real
    gate = get_or_create_gate(config, normalizer, tmp_path)
    ref = ray.put(windows)
    n = len(windows.obs)
    ray.get([gate.judge.remote(ref, "mamujoco", "p") for _ in range(3)])
    assert ray.get(gate.stats.remote())["gate/mamujoco/p/judged"] == 3 * n

    ray.kill(gate, no_restart=False)  # crash: Ray restarts it (max_restarts=-1)
    ray.get([gate.judge.remote(ref, "mamujoco", "p") for _ in range(2)])  # retried until it is up
    stats = ray.get(gate.stats.remote())
    assert stats["gate/starts"] == 2
    assert stats["gate/mamujoco/p/judged"] == 5 * n
    assert stats["gate/calls"] == 5

    # mid-stream: calls in flight while the actor dies are retried (at-least-once counting)
    pending = [gate.judge.remote(ref, "mamujoco", "p") for _ in range(6)]
    ray.get(pending[:2])
    ray.kill(gate, no_restart=False)
    results = ray.get(pending)
    assert all(len(r) == n for r in results)
    stats = ray.get(gate.stats.remote())
    assert stats["gate/starts"] == 3
    assert 11 * n <= stats["gate/mamujoco/p/judged"] <= 12 * n
    _kill_actor(ray, gate)


def test_stats_go_to_tensorboard(ray_cluster, real, config, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from moedream.coherence.gate import get_or_create_gate, write_stats_to_tensorboard

    ray = ray_cluster
    normalizer, windows = real
    gate = get_or_create_gate(config, normalizer, tmp_path / "state")
    ray.get(gate.judge.remote(windows, "mamujoco", "planner"))
    stats = ray.get(gate.stats.remote())
    with SummaryWriter(log_dir=str(tmp_path / "tb")) as writer:
        assert write_stats_to_tensorboard(stats, writer, step=1) == len(stats)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "gate/mamujoco/planner/approve_rate" in events.Tags()["scalars"]
    assert "gate/mamujoco/planner/h7" in events.Tags()["histograms"]
    _kill_actor(ray, gate)


def _faster(obs: np.ndarray, factor: float) -> np.ndarray:
    """The same paths taken `factor` times faster: [.., T+1, N, D] with every step scaled."""
    steps = np.diff(obs, axis=-3) * factor
    return np.concatenate([obs[..., :1, :, :], obs[..., :1, :, :] + np.cumsum(steps, -3)], -3)


def test_refit_follows_the_teams_real_data_and_survives_a_restart(
    ray_cluster, real, config, tmp_path
):
    """A trained team's real steps are larger than random play's: φ fitted on the random
    collection rejects them; refit on the team's episodes approves them again, keeps the
    model-metric quantiles, widens the support, and is kept by a restarted actor."""
    from moedream.coherence.gate import get_or_create_gate

    ray = ray_cluster
    normalizer, windows = real
    normalizer.quantiles["ensemble"] = 0.123  # as if calibrated on the model
    episodes = collect_random_episodes("mamujoco", n_episodes=8, max_steps=150, seed=1)
    team = [_faster(e["obs"], 3.0) for e in episodes[:5]]
    held_out = Trajectories(_faster(windows.obs, 3.0), windows.action, windows.reward,
                            windows.terminated)  # fmt: skip
    gate = get_or_create_gate(config, normalizer, tmp_path)

    def approve_rate() -> float:
        result = ray.get(gate.judge.remote(held_out, record=False))
        return float(np.mean(result.verdicts == Verdict.APPROVE))

    before = approve_rate()
    info = ray.get(gate.refit.remote(team))
    after = approve_rate()
    assert before < 0.2 and after > 0.8, (before, after)
    assert info["refit_steps"] == sum(len(e) - 1 for e in team)
    refit = Normalizer.from_dict(ray.get(gate.get_normalizer.remote()))
    assert refit.quantiles["ensemble"] == 0.123
    assert np.all(refit.state_min <= normalizer.state_min)
    assert np.all(refit.state_max >= normalizer.state_max)
    stats = ray.get(gate.stats.remote())
    assert stats["gate/refits"] == 1 and stats["gate/calls"] == 0  # record=False: uncounted
    assert (tmp_path / f"{config.actor_name}_normalizer.json").is_file()

    ray.kill(gate, no_restart=False)  # restarted with the constructor's (random) φ ...
    assert approve_rate() == after  # ... but it reloads the refit one
    with pytest.raises(ray.exceptions.RayTaskError, match="same env"):
        ray.get(gate.refit.remote([e[:, :, :5] for e in team]))
    _kill_actor(ray, gate)
