"""The gate's model terms, causes and truncation on real Overcooked data (no Ray).

"Model outputs" on real windows are built around the real next steps with known errors, so
every fault below has a known size; a real world model's outputs are covered by
test_world_model_outputs_calibrate_and_catch_a_reward_bias.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moedream.coherence.kernel import (
    CAUSES,
    GateConfig,
    Normalizer,
    Verdict,
    judge,
    truncate,
)
from moedream.platform.commands.calibrate_gate import (
    collect_random_episodes,
    windows_from_episodes,
)
from moedream.world_model.trajectory import Trajectories

HORIZON = 5


@pytest.fixture(scope="module")
def data():
    """(normalizer fitted on 12 episodes, calibration windows, held-out test windows)."""
    episodes = collect_random_episodes("overcooked", n_episodes=20, max_steps=150, seed=3)
    config = GateConfig()
    normalizer = Normalizer.fit([e["obs"] for e in episodes[:12]], config)
    calib = windows_from_episodes(episodes[12:16], HORIZON, stride=1)
    test = windows_from_episodes(episodes[16:], HORIZON, stride=2)
    return normalizer, calib, test


def model_outputs(windows: Trajectories, seed: int, normalizer: Normalizer) -> Trajectories:
    """A model's view of real windows: its ensemble's mean next obs within about half a real
    step of the truth, a spread of about a quarter step, rewards near the real ones."""
    rng = np.random.default_rng(seed)
    b, h = windows.batch_size, windows.horizon
    step = normalizer.delta_std  # [N, D]
    nxt = windows.obs[:, 1:]
    shape = windows.reward.shape  # [B, H, N]; random play's real rewards are all 0 here
    ens_reward = windows.reward + rng.normal(0, 0.1, shape)
    return dataclasses.replace(
        windows,
        reward=ens_reward + rng.normal(0, 0.05, shape),
        ensemble_obs=nxt + 0.5 * step * rng.normal(size=nxt.shape),
        obs_std=0.25 * step * rng.uniform(0.5, 1.5, size=(b, h, 1, 1)),
        ensemble_reward=ens_reward,
        reward_spread=rng.uniform(0.05, 0.15, shape),
    )


@pytest.fixture(scope="module")
def calibrated(data):
    normalizer, calib, test = data
    norm = Normalizer.from_dict(normalizer.to_dict())
    fitted = norm.calibrate_model_terms(model_outputs(calib, 0, norm), calib.reward, GateConfig())
    assert set(fitted) == {"gap", "obs_spread", "reward_spread", "reward_gap", "error"}
    return norm, model_outputs(test, 1, norm)


def approve_rate(result) -> float:
    return float(np.mean(result.verdicts == Verdict.APPROVE))


def test_held_out_real_windows_are_approved_with_and_without_model_outputs(data, calibrated):
    normalizer, _, test = data
    norm, view = calibrated
    assert approve_rate(judge(test, normalizer, GateConfig())) >= 0.95  # as the gate sees real
    result = judge(view, norm, GateConfig())
    assert {"gap", "obs_spread", "reward_spread", "reward_gap", "error"} <= set(result.metrics)
    for term in ("gap", "obs_spread", "reward_spread", "reward_gap", "error"):  # ~1% each
        assert np.mean(result.metrics[term] > norm.quantiles[term]) <= 0.03, term
    # five terms at 1% each on top of drift: still most real trajectories through the model
    assert approve_rate(result) >= 0.85, result.counts()


@pytest.mark.parametrize(
    ("fault", "cause"),
    [("reward_bias", "reward"), ("dynamics", "drift"), ("disagreement", "disagreement")],
)
def test_each_fault_is_rejected_for_its_cause(calibrated, fault, cause):
    norm, view = calibrated
    reward_std = norm.reward_std
    if fault == "reward_bias":  # the reward head 2 real reward stds above the ensemble
        bad = dataclasses.replace(view, reward=view.reward + 2.0 * reward_std)
    elif fault == "dynamics":  # next obs 3 real steps away from where the ensemble expects it
        bad = dataclasses.replace(view, ensemble_obs=view.ensemble_obs + 3.0 * norm.delta_std)
    else:  # the members disagree 10x more than on real data
        bad = dataclasses.replace(view, obs_std=view.obs_std * 10.0)
    result = judge(bad, norm, GateConfig())
    assert approve_rate(result) == 0.0
    assert np.mean([c == cause for c in result.cause]) >= 0.9
    codes = result.causes[result.causes > 0]
    assert np.mean(codes == CAUSES.index(cause) + 1) >= 0.9  # the rest: real data's own
    # without the model terms the same trajectories pass: the real-data drift cannot see these
    blind = GateConfig(weight_gap=0, weight_obs_spread=0, weight_reward_spread=0,
                       weight_reward_gap=0, weight_error=0)  # fmt: skip
    assert approve_rate(judge(bad, norm, blind)) >= 0.95


def test_expected_error_grows_with_disagreement_beyond_the_data(calibrated):
    norm, view = calibrated
    curve = norm.error_curve
    assert curve["error"] == sorted(curve["error"]) and len(curve["spread"]) >= 5
    far = dataclasses.replace(view, obs_std=view.obs_std * 40.0)
    near, wide = judge(view, norm, GateConfig()), judge(far, norm, GateConfig())
    assert np.median(wide.metrics["error"]) > 20 * np.median(near.metrics["error"])
    assert np.median(wide.metrics["error"]) > GateConfig().error_reference  # worse than copying


def test_truncation_keeps_the_coherent_prefix(calibrated):
    norm, view = calibrated
    config = GateConfig()
    whole = judge(view, norm, config).h7 == 1.0  # every step coherent
    rows = view.select(np.flatnonzero(whole)[:20])
    reward = rows.reward.copy()
    reward[:, 3:] += 5.0 * norm.reward_std  # hallucinated rewards from step 3 on
    bad = dataclasses.replace(rows, reward=reward)
    first = judge(bad, norm, config)
    assert np.all(first.verdicts != Verdict.APPROVE)
    final, kept = truncate(first, bad, config)
    assert np.all(final.verdicts == Verdict.APPROVE) and np.all(final.truncated)
    assert kept.lengths().tolist() == [3] * 20
    assert all(r.startswith("truncated: reward") for r in final.reasons)
    again = judge(kept, norm, config)  # the kept prefix alone is coherent
    assert np.all(again.verdicts == Verdict.APPROVE) and np.all(again.h7 == 1.0)
    short = dataclasses.replace(config, min_prefix=4)  # a 3-step prefix is too short: rejected
    final, kept = truncate(first, bad, short)
    assert not final.truncated.any() and kept.length is None


def test_normalizer_round_trip_keeps_model_terms_and_reads_older_files(calibrated):
    norm, view = calibrated
    again = Normalizer.from_dict(norm.to_dict())
    assert again.error_curve == norm.error_curve and again.reward_std == norm.reward_std
    a, b = judge(view, norm, GateConfig()), judge(view, again, GateConfig())
    np.testing.assert_array_equal(a.verdicts, b.verdicts)
    old = {k: v for k, v in norm.to_dict().items() if k not in ("mean_step", "reward_std",
                                                                 "error_curve")}  # fmt: skip
    loaded = Normalizer.from_dict(old)
    assert loaded.reward_std == 0.0 and loaded.error_curve == {}
    assert "reward_gap" not in judge(view, loaded, GateConfig()).metrics  # uncalibrated: skipped


def test_bad_inputs_name_the_field(data, calibrated):
    normalizer, _, test = data
    with pytest.raises(ValueError, match="ensemble_obs"):
        normalizer.calibrate_model_terms(test, test.reward, GateConfig())
    with pytest.raises(ValueError, match=r"Trajectories.length must be \[B="):
        dataclasses.replace(test, length=np.zeros(test.batch_size, dtype=np.int64))
    norm, view = calibrated
    with pytest.raises(ValueError, match="Trajectories.ensemble_reward has shape"):
        judge(dataclasses.replace(view, ensemble_reward=view.ensemble_reward[:, :2]), norm,
              GateConfig())  # fmt: skip
    from moedream.config import ConfigError

    with pytest.raises(ConfigError, match="min_prefix"):
        GateConfig(min_prefix=0).validate()
    with pytest.raises(ConfigError, match="refine_mode"):
        from moedream.coherence.actor_config import GateActorConfig

        GateActorConfig(refine_mode="resample").validate()


@pytest.mark.slow
def test_world_model_outputs_calibrate_and_catch_a_reward_bias(data):
    """A real (untrained, tiny) world model: calibrated on its own view of real windows, the
    same model with its reward head shifted by 3 reward stds is caught for its rewards."""
    import torch

    from moedream.coherence.model_calibration import calibrate_model_terms, model_view
    from moedream.envs import env_spec
    from moedream.world_model.model import WorldModel
    from tests.world_models import tiny_config

    normalizer, calib, test = data
    calib, test = calib.select(np.arange(0, calib.batch_size, 2)), test.select(np.arange(100))
    torch.manual_seed(0)  # the same untrained model whatever ran before
    model = WorldModel(tiny_config(), env_spec("overcooked"))
    model.fit_normalization({"obs": calib.obs, "reward": calib.reward})
    norm = Normalizer.from_dict(normalizer.to_dict())
    windows = lambda t: {f: getattr(t, f) for f in ("obs", "action", "reward", "terminated")}  # noqa: E731
    calibrate_model_terms(norm, model, windows(calib), GateConfig())
    good = judge(model_view(model, windows(test)), norm, GateConfig())
    assert approve_rate(good) >= 0.9, good.counts()
    with torch.no_grad():
        model.reward_head.net[-1].bias.add_(3.0)  # normalised units: 3 of the model's reward stds
    biased = judge(model_view(model, windows(test)), norm, GateConfig())
    assert approve_rate(biased) <= 0.1 and biased.cause.count("reward") >= 0.9 * len(biased)


def test_imagined_episodes_stop_at_the_kept_length():
    from moedream.envs import env_spec
    from moedream.policies.imagination import build_imagined_episodes
    from moedream.policies.rl_modules import team_module_spec

    spec = env_spec("overcooked")
    module = team_module_spec(
        spec, embedding_dim=16, perceiver_hidden=[16], planner_hidden=[16], reflector_hidden=[16]
    ).build()
    b, h = 3, 5
    rng = np.random.default_rng(0)
    actions = np.eye(spec.action_dim, dtype=np.float32)[rng.integers(0, 6, size=(b, h, 2))]
    trajs = Trajectories(
        obs=rng.normal(size=(b, h + 1, 2, spec.obs_dim)).astype(np.float32),
        action=actions,
        reward=np.ones((b, h, 2), np.float32),
        terminated=np.zeros((b, h, 2), np.float32),
        length=np.array([5, 2, 3]),
    )
    episodes = build_imagined_episodes(trajs, module, spec)
    assert [e.env_steps() for e in episodes] == [5, 2, 3]
    for e, length in zip(episodes, (5, 2, 3), strict=True):
        assert e.is_truncated  # PPO bootstraps from the value at the last kept state
        agent = e.agent_episodes[spec.agent_ids[0]]
        np.testing.assert_allclose(
            agent.get_observations(slice(0, length + 1)),
            trajs.obs[episodes.index(e), : length + 1, 0],
        )
    kept = trajs.select([1, 2])
    assert kept.lengths().tolist() == [2, 3]


def test_cause_rates_reach_the_provider_metrics_and_the_report(calibrated):
    from moedream.platform.model_based import gate_cause_rates
    from moedream.platform.report import _cause_rates

    norm, view = calibrated
    config = GateConfig()
    whole = np.flatnonzero(judge(view, norm, config).h7 == 1.0)[:20]
    rows = view.select(whole)
    reward = rows.reward.copy()
    reward[:10] += 5.0 * norm.reward_std  # 10 hallucinate rewards from the start: rejected
    reward[10:, 2:] += 5.0 * norm.reward_std  # 10 from step 2 on: truncated to 2 steps
    bad = dataclasses.replace(rows, reward=reward)
    result, _ = truncate(judge(bad, norm, config), bad, config)
    rates = gate_cause_rates(result)
    assert rates["gate_cause_reward_rate"] == 1.0 and rates["gate_truncated_rate"] == 0.5
    assert all(rates[f"gate_cause_{c}_rate"] == 0.0 for c in CAUSES if c != "reward")
    last = {f"provider/{k}": v for k, v in rates.items()}
    assert _cause_rates(last) == "drift 0, reward 1, disagreement 0, support 0, stall 0, value 0"
    assert _cause_rates({}) == "n/a"


# ------------------------------------------------------------------- the reflector's term


def with_residuals(trajs: Trajectories, residual: np.ndarray) -> Trajectories:
    return dataclasses.replace(trajs, td_residual=residual.astype(np.float32))


def test_reflector_term_is_calibrated_on_real_residuals_and_truncates_where_it_disagrees(
    calibrated,
):
    """Residuals of real steps set the scale; an imagined step the critic finds 5 of those
    quantiles off is incoherent for its value, and truncation keeps the steps before it."""
    norm, view = calibrated
    config = GateConfig()
    rng = np.random.default_rng(4)
    real = rng.normal(0.0, 0.5, size=5000)  # a critic's TD residuals on real steps
    norm = Normalizer.from_dict(norm.to_dict())
    q = norm.calibrate_value_term(real, config)
    assert q == pytest.approx(np.quantile(np.abs(real), 0.99))
    whole = np.flatnonzero(judge(view, norm, config).h7 == 1.0)[:20]
    rows = view.select(whole)
    residual = rng.normal(0.0, 0.5, size=(rows.batch_size, rows.horizon))
    assert np.all(judge(with_residuals(rows, residual), norm, config).h7 >= 0.8)
    residual[:, :2] = 0.0
    residual[:, 2:] = 5.0 * q  # the imagined return disagrees with the critic from step 2 on
    first = judge(with_residuals(rows, residual), norm, config)
    assert np.all(first.verdicts != Verdict.APPROVE)
    assert first.cause.count("value") == rows.batch_size
    assert all(r == "value inconsistent" for r in first.reasons)
    final, kept = truncate(first, with_residuals(rows, residual), config)
    assert np.all(final.truncated) and kept.lengths().tolist() == [2] * rows.batch_size
    off = dataclasses.replace(config, weight_value_gap=0.0)  # the term off: approved whole
    assert approve_rate(judge(with_residuals(rows, residual), norm, off)) == 1.0
    uncalibrated = Normalizer.from_dict({**norm.to_dict(), "quantiles": {
        k: v for k, v in norm.quantiles.items() if k != "value_gap"}})  # fmt: skip
    assert "value_gap" not in judge(with_residuals(rows, residual), uncalibrated, config).metrics


def test_reflector_term_floor_and_bad_residuals(calibrated):
    norm, view = calibrated
    config = GateConfig()
    norm = Normalizer.from_dict(norm.to_dict())
    norm.calibrate_value_term(np.zeros(100), config)  # a critic exact on real steps
    small = with_residuals(view, np.full((view.batch_size, view.horizon), 0.05 * norm.reward_std))
    assert "value" not in judge(small, norm, config).cause  # below value_reference: fine
    for bad in (np.zeros(0), np.array([0.0, np.nan])):
        with pytest.raises(ValueError, match="finite real TD residuals"):
            norm.calibrate_value_term(bad, config)
    with pytest.raises(ValueError, match="Trajectories.td_residual has shape"):
        judge(with_residuals(view, np.zeros((view.batch_size, 2))), norm, config)


def test_team_td_residuals_use_the_reflector_and_real_episodes():
    """td_residuals = r̄ + γ(1 − d̄)V' − V with the team module's critic; on real RLlib-like
    episodes the same formula applies step by step."""
    from moedream.envs import env_spec
    from moedream.policies.imagination import TeamPolicy, td_residuals
    from moedream.policies.rl_modules import team_module_spec

    spec = env_spec("overcooked")
    module = team_module_spec(
        spec, embedding_dim=16, perceiver_hidden=[16], planner_hidden=[16], reflector_hidden=[16]
    ).build()
    policy = TeamPolicy(module, spec, True)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(3, 5, 2, spec.obs_dim)).astype(np.float32)
    reward = rng.normal(size=(3, 4, 2))
    terminated = np.zeros((3, 4, 2))
    terminated[0, -1] = 1.0
    value = policy.values(obs.reshape(15, 2, -1)).reshape(3, 5)
    assert value.shape == (3, 5) and np.std(value) > 0
    delta = td_residuals(policy, obs, reward, terminated, 0.9)
    expected = reward.mean(2) + 0.9 * value[:, 1:] - value[:, :-1]
    expected[0, -1] = reward[0, -1].mean() - value[0, -2]  # terminal: no bootstrap
    np.testing.assert_allclose(delta, expected, rtol=1e-6, atol=1e-6)


def test_gate_keeps_the_reflector_calibration_through_refits_and_restarts(data, tmp_path):
    """The actor class itself (no Ray): calibrate_value_term persists, a refit of φ on new
    real episodes keeps it, a restarted gate reads it back, and stats list every cause."""
    from moedream.coherence.actor_config import GateActorConfig
    from moedream.coherence.gate import CoherenceGate

    normalizer, _, test = data
    gate = CoherenceGate(GateActorConfig(), normalizer, str(tmp_path))
    assert gate.calibrate_value_term(np.linspace(-1.0, 1.0, 201)) == {
        "value_gap_quantile": pytest.approx(0.99)
    }
    gate.refit(list(test.obs[:10]))
    assert gate.normalizer.quantiles["value_gap"] == pytest.approx(0.99)
    again = CoherenceGate(GateActorConfig(), normalizer, str(tmp_path))
    assert again.normalizer.quantiles["value_gap"] == pytest.approx(0.99)
    again.judge(test.select(np.arange(8)), "overcooked", "team")
    stats = again.stats()
    for cause in CAUSES:
        assert f"gate/overcooked/team/causes/{cause}" in stats


def less_sure(view: Trajectories) -> Trajectories:
    """The same view from a retrained model whose ensemble disagrees 3x more."""
    return dataclasses.replace(view, obs_std=view.obs_std * 3.0)


def test_gate_recalibrates_model_terms_and_keeps_them_in_the_units_of_a_refit_phi(data, tmp_path):
    """The actor class itself (no Ray): calibrate_model_terms on a retrained model's view of real
    windows moves the quantiles to its scale (its real windows are approved again) and is
    counted; a refit of φ recalibrates the terms from the kept view in the new φ's units (real
    steps twice as large: the spread quantile halves), also after a restart (the view is
    kept)."""
    from moedream.coherence.actor_config import GateActorConfig
    from moedream.coherence.gate import CoherenceGate

    normalizer, calib, test = data
    gate = CoherenceGate(GateActorConfig(), normalizer, str(tmp_path))
    first = gate.calibrate_model_terms(model_outputs(calib, 0, normalizer), calib.reward)
    held_out = less_sure(model_outputs(test, 1, normalizer))
    assert approve_rate(gate.judge(held_out, record=False)) < 0.5  # the old model's scale
    second = gate.calibrate_model_terms(less_sure(model_outputs(calib, 0, normalizer)),
                                        calib.reward)  # fmt: skip
    assert approve_rate(gate.judge(held_out, record=False)) >= 0.85
    assert second["obs_spread_quantile"] == pytest.approx(3.0 * first["obs_spread_quantile"])
    assert second["gap_quantile"] == pytest.approx(first["gap_quantile"])
    stats = gate.stats()
    assert second["model_calibrations"] == 2.0 == stats["gate/model_calibrations"]
    assert stats["gate/refits"] == 0  # not a refit of φ

    gate.refit(list(test.obs))
    spread, gap = (gate.normalizer.quantiles[t] for t in ("obs_spread", "gap"))
    gate.refit([2.0 * o for o in test.obs])  # σ_Δ x2 (the support only widens)
    assert gate.normalizer.quantiles["obs_spread"] == pytest.approx(spread / 2.0, rel=1e-6)
    assert gate.normalizer.quantiles["gap"] == pytest.approx(gap)  # σ_e: the model's, not φ's
    restarted = CoherenceGate(GateActorConfig(), normalizer, str(tmp_path))
    restarted.refit(list(test.obs))
    assert restarted.normalizer.quantiles["obs_spread"] == pytest.approx(spread, rel=1e-6)
