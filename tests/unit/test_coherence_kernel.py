"""The coherence kernel on real trajectories of both envs (no Ray).

Real data: random-policy rollouts of the real envs, split by episode into fit and held-out sets.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from moedream.coherence.actor_config import GateActorConfig
from moedream.coherence.kernel import (
    ACTOR_FIELDS,
    GateConfig,
    Normalizer,
    Verdict,
    drift_scale,
    inter_agent_dispersion,
    judge,
    judge_coherence,
    kl_drift,
    stall_runs,
)
from moedream.config import ConfigError
from moedream.platform.commands.calibrate_gate import (
    collect_random_episodes,
    windows_from_episodes,
)
from moedream.world_model.trajectory import Trajectories

ENVS = ("overcooked", "mamujoco")
HORIZON = 15


@pytest.fixture(scope="module", params=ENVS)
def real(request):
    """(env name, normalizer fitted on 8 episodes, held-out windows from 6 other episodes)."""
    episodes = collect_random_episodes(request.param, n_episodes=14, max_steps=150, seed=0)
    fit, held = episodes[:8], episodes[8:]
    config = GateConfig()
    normalizer = Normalizer.fit([e["obs"] for e in fit], config)
    windows = windows_from_episodes(held, HORIZON, stride=5)
    return request.param, normalizer, windows, [e["obs"] for e in fit]


def with_obs(trajs: Trajectories, obs: np.ndarray) -> Trajectories:
    return Trajectories(obs.astype(np.float32), trajs.action, trajs.reward, trajs.terminated)


def test_held_out_real_trajectories_are_approved(real):
    env, normalizer, windows, _ = real
    result = judge(windows, normalizer, GateConfig())
    rate = np.mean(result.verdicts == Verdict.APPROVE)
    assert len(result) >= 150
    assert rate >= 0.95, f"{env}: only {rate:.3f} of held-out real windows approved"
    assert result.coherence.shape == (len(result), HORIZON)
    assert set(result.reasons) <= {"coherent", "low coherence", "frozen state", "off support"}


def test_real_with_injected_noise_is_rejected(real):
    env, normalizer, windows, _ = real
    rng = np.random.default_rng(1)
    noise = rng.normal(size=windows.obs.shape) * normalizer.state_std  # N(0, 1 std) per feature
    result = judge(with_obs(windows, windows.obs + noise), normalizer, GateConfig())
    assert np.mean(result.verdicts == Verdict.REJECT) >= 0.9, f"{env}: {result.counts()}"
    assert np.mean(result.verdicts == Verdict.APPROVE) == 0.0


@pytest.mark.parametrize("kind", ["standard_normal", "state_distribution"])
def test_random_noise_trajectories_are_rejected(real, kind):
    env, normalizer, windows, _ = real
    rng = np.random.default_rng(2)
    obs = rng.normal(size=windows.obs.shape)
    if kind == "state_distribution":  # every frame a plausible state, but no dynamics
        obs = normalizer.state_mean + normalizer.state_std * obs
    result = judge(with_obs(windows, obs), normalizer, GateConfig())
    assert np.mean(result.verdicts == Verdict.REJECT) >= 0.9, f"{env} {kind}: {result.counts()}"
    assert np.mean(result.verdicts == Verdict.APPROVE) == 0.0


def test_untrained_world_model_rollouts_are_rejected(real):
    """A randomly initialised MLP dynamics model s_{t+1} = f(s_t, a_t), rolled out
    autoregressively from real start states with the real actions."""
    env, normalizer, windows, _ = real
    torch.manual_seed(0)
    n, d = windows.obs.shape[2:]
    a = windows.action.shape[-1]
    model = torch.nn.Sequential(torch.nn.Linear(d + a, 64), torch.nn.Tanh(), torch.nn.Linear(64, d))
    obs = [torch.as_tensor(windows.obs[:, 0])]  # [B, N, D]
    with torch.no_grad():
        for t in range(HORIZON):
            inp = torch.cat([obs[-1], torch.as_tensor(windows.action[:, t])], dim=-1)  # [B, N, D+A]
            obs.append(model(inp))
    imagined = torch.stack(obs, dim=1).numpy()  # [B, H+1, N, D]
    result = judge(with_obs(windows, imagined), normalizer, GateConfig())
    assert np.mean(result.verdicts == Verdict.REJECT) >= 0.9, f"{env}: {result.counts()}"


def test_frozen_state_is_rejected_as_frozen(real):
    """A repeated state has zero step change: the drift metrics alone would call it perfectly
    coherent, the stall test (runs longer than real data shows) rejects it."""
    env, normalizer, windows, _ = real
    frozen = np.repeat(windows.obs[:, :1], HORIZON + 1, axis=1)
    config = GateConfig()
    result = judge(with_obs(windows, frozen), normalizer, config)
    assert np.all(result.verdicts == Verdict.REJECT), f"{env}: {result.counts()}"
    assert set(result.reasons) == {"frozen state"}
    # without the stall test the same batch would pass: that is why the test exists
    unchecked = judge(with_obs(windows, frozen), normalizer, config.replace(stall_check=False))
    assert np.mean(unchecked.verdicts == Verdict.APPROVE) > 0.9
    # a frozen state with tiny jitter (a world model's rounding) is still frozen
    jitter = frozen + 1e-4 * normalizer.delta_std * np.random.default_rng(3).normal(
        size=frozen.shape
    )
    assert np.all(judge(with_obs(windows, jitter), normalizer, config).verdicts == Verdict.REJECT)


def test_scaling_observations_by_1000_changes_no_verdict(real):
    env, normalizer, windows, fit_obs = real
    config = GateConfig()
    rng = np.random.default_rng(4)
    mixed_obs = np.concatenate(
        [
            windows.obs,
            windows.obs + 0.3 * rng.normal(size=windows.obs.shape) * normalizer.state_std,
            np.repeat(windows.obs[:, :1], HORIZON + 1, axis=1),
        ]
    )
    mixed = Trajectories(
        mixed_obs.astype(np.float32),
        np.concatenate([windows.action] * 3),
        np.concatenate([windows.reward] * 3),
        np.concatenate([windows.terminated] * 3),
    )
    scaled_norm = Normalizer.fit([o * 1000.0 for o in fit_obs], config)
    before = judge(mixed, normalizer, config)
    after = judge(with_obs(mixed, mixed.obs * 1000.0), scaled_norm, config)
    assert len(set(before.verdicts.tolist())) >= 2, "the batch should mix verdicts"
    np.testing.assert_array_equal(before.verdicts, after.verdicts)
    np.testing.assert_allclose(before.coherence, after.coherence, atol=1e-6)


def test_calibration_maps_the_real_quantile_to_the_threshold(real):
    env, normalizer, _, fit_obs = real
    config = GateConfig()
    q = normalizer.quantiles["l2"]
    assert 1.0 / (1.0 + q / drift_scale(q, 0.70)) == pytest.approx(0.70, abs=1e-12)
    assert drift_scale(q, 0.70) == pytest.approx(q * 7 / 3)
    # on the fitting data itself, ~95% of steps are coherent (stall runs aside)
    fit = np.stack([o[:100] for o in fit_obs])
    b, n = fit.shape[0], fit.shape[2]
    trajs = Trajectories(
        fit,
        np.zeros((b, 99, n, 1), np.float32),
        np.zeros((b, 99, n), np.float32),
        np.zeros((b, 99, n), np.float32),
    )
    coherent = judge(trajs, normalizer, config.replace(stall_check=False)).coherence >= 0.70
    assert 0.92 <= coherent.mean() <= 0.98, f"{env}: {coherent.mean():.3f}"


def test_normalizer_save_load_round_trip(real, tmp_path):
    _, normalizer, windows, _ = real
    path = normalizer.save(tmp_path / "gate" / "normalizer.json")
    assert json.loads(path.read_text())["max_stall_run"] == normalizer.max_stall_run
    loaded = Normalizer.load(path)
    config = GateConfig()
    a, b = judge(windows, normalizer, config), judge(windows, loaded, config)
    np.testing.assert_array_equal(a.coherence, b.coherence)
    assert loaded.quantiles == normalizer.quantiles
    with pytest.raises(FileNotFoundError, match="calibrate-gate"):
        Normalizer.load(tmp_path / "missing.json")


def test_non_finite_values_are_rejected_with_their_reason(real):
    _, normalizer, windows, _ = real
    trajs = windows.select(np.arange(4))
    obs, reward = trajs.obs.copy(), trajs.reward.copy()
    obs[1, 3, 0, 0] = np.nan
    reward[2, 0, 1] = np.inf
    obs[3, 5, 1, 2] = -np.inf
    reward[3, 1, 0] = np.nan
    bad = Trajectories(obs, trajs.action, reward, trajs.terminated)
    result = judge(bad, normalizer, GateConfig())
    assert result.verdicts.tolist() == [
        Verdict.APPROVE,
        Verdict.REJECT,
        Verdict.REJECT,
        Verdict.REJECT,
    ]
    assert result.reasons[1:] == [
        "non-finite values in obs",
        "non-finite values in reward",
        "non-finite values in obs, reward",
    ]
    assert np.all(result.h7[1:] == 0.0) and np.all(np.isfinite(result.coherence))


def test_band_edges_are_exact():
    config = GateConfig()

    def verdict(n_coherent: int, horizon: int) -> Verdict:
        coherence = np.zeros((1, horizon))
        coherence[0, :n_coherent] = 0.70  # exactly at the threshold counts as coherent
        verdicts, h7 = judge_coherence(coherence, config)
        assert h7[0] == n_coherent / horizon
        return Verdict(int(verdicts[0]))

    assert verdict(7, 10) == Verdict.APPROVE  # H7 = 0.70
    assert verdict(6, 10) == Verdict.REFINE
    assert verdict(5, 10) == Verdict.REFINE  # H7 = 0.50
    assert verdict(4, 10) == Verdict.REJECT
    assert verdict(7000, 10000) == Verdict.APPROVE
    assert verdict(6999, 10000) == Verdict.REFINE  # 0.6999
    assert verdict(5000, 10000) == Verdict.REFINE
    assert verdict(4999, 10000) == Verdict.REJECT  # 0.4999
    assert verdict(21, 30) == Verdict.APPROVE  # 0.7 again, through a different fraction
    assert verdict(0, 15) == Verdict.REJECT and verdict(15, 15) == Verdict.APPROVE
    below = np.full((1, 10), np.nextafter(0.70, 0.0))
    assert judge_coherence(below, config)[0][0] == Verdict.REJECT


def test_metric_golden_values():
    # KL(N(0,1) || N(1,1)) = 0.5 per feature; shapes [B=1, H=1, N=1, D=1]
    obs = np.array([0.0, 1.0]).reshape(1, 2, 1, 1)
    assert kl_drift(obs, np.ones((1, 1, 1, 1)), np.full((1, 1), 1e-6))[0, 0] == pytest.approx(0.5)
    # KL(N(0,1) || N(0,2)) = log 2 + 1/8 - 1/2, with s_{-1} := s_0 only at t = 0
    obs = np.zeros((1, 3, 1, 1))
    std = np.array([1.0, 2.0]).reshape(1, 2, 1, 1)
    kl = kl_drift(obs, std, np.full((1, 1), 1e-6))
    assert kl[0, 0] == pytest.approx(0.0) and kl[0, 1] == pytest.approx(np.log(2) + 1 / 8 - 1 / 2)
    # dispersion: agents at +1 and -1 around the mean 0 -> 1 + 1 = 2
    x = np.array([[[[0.0], [0.0]], [[1.0], [-1.0]]]])  # [B=1, H+1=2, N=2, D=1]
    assert inter_agent_dispersion(x)[0, 0] == pytest.approx(2.0)
    runs = stall_runs(np.array([[True, True, False, True, True, True]]))
    assert runs.tolist() == [[1, 2, 0, 1, 2, 3]]


def test_optional_metrics_kl_and_ensemble_lower_coherence(real):
    _, normalizer, windows, _ = real
    config = GateConfig(weight_l2=1.0, weight_kl=0.5, weight_ensemble=0.5)
    b, h = windows.batch_size, windows.horizon
    calm = Trajectories(
        windows.obs,
        windows.action,
        windows.reward,
        windows.terminated,
        uncertainty=np.full((b, h), 0.01 * normalizer.step_rms),
        obs_std=np.broadcast_to(normalizer.delta_std, (b, h) + normalizer.delta_std.shape).copy(),
    )
    normalizer_copy = Normalizer.from_dict(normalizer.to_dict())
    normalizer_copy.calibrate_model_metrics(calm, config)
    assert {"kl", "ensemble"} <= normalizer_copy.quantiles.keys()
    calm_result = judge(calm, normalizer, config)
    assert set(calm_result.metrics) == {"l2", "kl", "ensemble"}
    unsure = Trajectories(
        calm.obs,
        calm.action,
        calm.reward,
        calm.terminated,
        uncertainty=np.full((b, h), 10.0 * normalizer.step_rms),
        obs_std=calm.obs_std,
    )
    unsure_result = judge(unsure, normalizer, config)
    moving = calm_result.coherence > 0  # steps not zeroed by the stall/support checks
    assert np.all(unsure_result.coherence[moving] < calm_result.coherence[moving])
    assert np.mean(unsure_result.verdicts == Verdict.REJECT) > 0.9
    # without model outputs the optional metrics drop out and real data passes as before
    plain = judge(windows, normalizer, config)
    assert set(plain.metrics) == {"l2"}
    assert np.mean(plain.verdicts == Verdict.APPROVE) >= 0.95


def test_bad_inputs_name_the_field(real):
    _, normalizer, windows, _ = real
    config = GateConfig()
    wrong_d = with_obs(windows, windows.obs[..., :-1])
    with pytest.raises(ValueError, match=r"Trajectories.obs has \[N, D\]"):
        judge(wrong_d, normalizer, config)
    with pytest.raises(ValueError, match="calibration_quantile"):
        judge(windows, normalizer, config.replace(calibration_quantile=0.9))
    with pytest.raises(TypeError, match="Trajectories"):
        judge({"obs": windows.obs}, normalizer, config)
    with pytest.raises(ValueError, match="NaN or inf"):
        Normalizer.fit([np.full((5, 2, 3), np.nan)], config)
    with pytest.raises(ValueError, match="never vary"):
        Normalizer.fit([np.ones((5, 2, 3))], config)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"refine_h7": 0.8}, "refine_h7"),
        ({"approve_h7": 1.5}, "approve_h7"),
        ({"coherence_threshold": 1.0}, "coherence_threshold"),
        ({"calibration_quantile": 0.0}, "calibration_quantile"),
        ({"weight_l2": 0.0}, "weight_l2"),
        ({"weight_kl": -1.0}, "weight_kl"),
        ({"support_margin": 0.0}, "support_margin"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        GateConfig.from_dict(changes)


@pytest.mark.parametrize("key", ["actor_name", "namespace", "num_cpus", "reimaginer_app",
                                 "max_refine_tries", "h7_bins"])  # fmt: skip
def test_config_refuses_the_actors_settings_and_names_their_home(key, tmp_path):
    """The gate actor's settings left the kernel's config: an old YAML gets told where to."""
    path = tmp_path / "quickstart.yaml"
    path.write_text(f"gate:\n  approve_h7: 0.8\n  {key}: 1\n")
    with pytest.raises(ConfigError) as err:
        GateConfig.from_yaml(path, section="gate")
    assert f"['{key}'] belong to the gate actor" in str(err.value)
    assert "GateActorConfig (moedream/coherence/actor_config.py)" in str(err.value)
    assert "`gate_actor` section" in str(err.value)
    with pytest.raises(ConfigError, match=rf"\['gate\.{key}'\]"):
        GateConfig.from_dict({key: 1}, prefix="gate.")
    with pytest.raises(TypeError, match=key):
        GateConfig(**{key: 1})


def test_config_unknown_key_and_yaml_round_trip(tmp_path):
    with pytest.raises(ConfigError, match="approve_h8"):
        GateConfig.from_dict({"approve_h8": 0.7})
    path = tmp_path / "gate.yaml"
    path.write_text("gate:\n  approve_h7: 0.8\n  refine_h7: 0.6\n")
    config = GateConfig.from_yaml(path, section="gate")
    assert (config.approve_h7, config.refine_h7, config.coherence_threshold) == (0.8, 0.6, 0.7)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"noise_shrink": 0.0}, "noise_shrink"),
        ({"max_refine_tries": -1}, "max_refine_tries"),
        ({"reimaginer_app": "world_model"}, "reimaginer_deployment"),
        ({"h7_bins": 0}, "h7_bins"),
        ({"num_cpus": 0}, "num_cpus"),
        ({"actor_name": ""}, "actor_name"),
        ({"kernel": {"refine_h7": 0.8}}, r"kernel\.refine_h7"),
    ],
)
def test_actor_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        GateActorConfig.from_dict(changes)


def test_the_kernel_refuses_exactly_the_actors_settings():
    """GateConfig points every GateActorConfig setting (and only those) to its new home."""
    actor_only = {f.name for f in dataclasses.fields(GateActorConfig)} - {"kernel"}
    assert set(ACTOR_FIELDS) == actor_only
    assert not actor_only & {f.name for f in dataclasses.fields(GateConfig)}
    config = GateActorConfig.from_dict({"kernel": {"approve_h7": 0.8}, "actor_name": "g"})
    assert (config.kernel.approve_h7, config.actor_name, config.h7_bins) == (0.8, "g", 10)


def test_calibrate_gate_command(tmp_path, capsys):
    from moedream.platform.cli import main

    out = tmp_path / "gate.json"
    argv = [
        "calibrate-gate",
        "--env",
        "mamujoco",
        "--episodes",
        "5",
        "--max-steps",
        "60",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "approval rate on held-out real trajectories" in printed
    assert Normalizer.load(out).n_agents == 2


def test_calibrate_gate_command_on_episode_shards(tmp_path, capsys):
    from moedream.data import collect_episodes
    from moedream.platform.cli import main

    data = tmp_path / "episodes"
    collect_episodes("mamujoco", {"max_episode_steps": 60}, 5, data / "shard-0.parquet")
    out = tmp_path / "gate.json"
    argv = ["calibrate-gate", "--env", "mamujoco", "--data", str(data), "--out", str(out)]
    assert main(argv) == 0
    assert "held-out windows (H=15): 4," in capsys.readouterr().out  # 1 episode x 60 // 15
    assert Normalizer.load(out).n_steps == 4 * 60
    with pytest.raises(ConfigError, match="not --env overcooked"):
        main(["calibrate-gate", "--env", "overcooked", "--data", str(data), "--out", str(out)])


def test_calibrate_gate_command_calibrates_the_model_terms_of_a_checkpoint(tmp_path, capsys):
    from moedream.data import collect_episodes, read_episodes
    from moedream.platform.cli import main
    from moedream.world_model.model import WorldModel
    from tests.world_models import tiny_config

    data = tmp_path / "episodes"
    collect_episodes("mamujoco", {"max_episode_steps": 60}, 5, data / "shard-0.parquet")
    spec, _ = read_episodes(data)
    checkpoint = WorldModel(tiny_config(), spec).save(tmp_path / "wm.safetensors")
    out = tmp_path / "gate.json"
    argv = ["calibrate-gate", "--env", "mamujoco", "--data", str(data), "--out", str(out),
            "--horizon", "5", "--checkpoint", str(checkpoint)]  # fmt: skip
    assert main(argv) == 0
    assert "model terms calibrated on 12 held-out windows" in capsys.readouterr().out
    saved = Normalizer.load(out)
    assert {"gap", "obs_spread", "reward_spread", "reward_gap", "error"} <= saved.quantiles.keys()
    assert saved.error_curve["spread"] and saved.reward_std > 0
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        main([*argv[:-4], "--horizon", "15", "--checkpoint", str(checkpoint)])
    with pytest.raises(ConfigError, match="--checkpoint .* is not a file"):
        main([*argv[:-1], str(tmp_path / "missing.safetensors")])
