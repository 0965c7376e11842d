"""The sample-efficiency benchmark's headline arithmetic (no Ray): trailing smoothing in real
steps, the first step reaching a target, and the reported ratio."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "sample_efficiency.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sample_efficiency", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smooth_averages_the_trailing_window_in_real_steps(bench):
    steps = np.array([2000, 4000, 6000, 8000])
    returns = np.array([1.0, 3.0, np.nan, 9.0])
    np.testing.assert_allclose(bench.smooth(steps, returns, 4000), [1.0, 2.0, 3.0, 9.0])
    np.testing.assert_allclose(bench.smooth(steps, returns, 1), [1.0, 3.0, np.nan, 9.0])


def test_ratio_is_model_free_steps_over_the_first_model_based_hit(bench):
    mf = (np.array([2000, 4000, 6000]), np.array([1.0, 2.0, 4.0]), 10.0, {})
    mb = (np.array([3200, 5200, 7200]), np.array([1.0, 4.5, 5.0]), 20.0, {})
    cells = bench.compare(mf, mb)
    assert cells[1] == 4.0 and cells[-2] == 5200 and cells[-1] == pytest.approx(6000 / 5200)
    never = bench.compare(mf, (mb[0], np.array([1.0, 2.0, 3.9]), 20.0, {}))
    assert np.isnan(never[-2]) and np.isnan(never[-1])


def test_by_budget_gives_a_ratio_per_part_of_the_model_free_budget(bench):
    mf = (np.array([1000, 2000, 3000, 4000]), np.array([1.0, 2.0, 3.0, 4.0]), 0.0, {})
    mb = (np.array([500, 1000, 1500, 2000]), np.array([2.0, 3.0, 3.5, 3.8]), 0.0, {})
    cells = bench.by_budget(mf, mb)
    assert cells == ["2.00x (1.0)", "4.00x (2.0)", "3.00x (3.0)", "never (4.0)"]


def test_horizon_comes_from_each_env_config_unless_given(bench, tmp_path, monkeypatch):
    import yaml

    from moedream.config import load_yaml

    root = Path(__file__).resolve().parents[2]
    # both shipped configs say 5; distinct copies show each env reads its own
    configs, configured = {}, {"overcooked": 3, "mamujoco": 4}
    for env, path in bench.CONFIGS.items():
        data = load_yaml(root / path)
        assert data["imagination"]["horizon"] == 5, f"{path}: the headline runs use horizon 5"
        data["imagination"]["horizon"] = configured[env]
        configs[env] = tmp_path / f"{env}.yaml"
        configs[env].write_text(yaml.safe_dump(data))
    monkeypatch.setattr(bench, "CONFIGS", configs)
    args = bench.Args()  # --horizon 0: each env's agents config
    for env, horizon in configured.items():
        assert bench.run_config(args, env, 0, True).imagination.horizon == horizon
    assert bench.horizons(args) == "overcooked 3, mamujoco 4"
    args.horizon = 7
    assert {bench.run_config(args, env, 0, True).imagination.horizon for env in configured} == {7}


def test_grad_clip_flags_set_both_runs_or_the_model_free_run_only():
    """--grad-clip sets both runs' clip, --mf-grad-clip only the baseline's (0 = off)."""
    from benchmarks.sample_efficiency import Args, run_config

    def clips(args: Args) -> tuple[float, float]:
        return tuple(
            run_config(args, "mamujoco", 0, imagine).grad_clip for imagine in (False, True)
        )

    assert clips(Args()) == (0.5, 0.5)  # the agents config's
    assert clips(Args(grad_clip=5.0)) == (5.0, 5.0)
    assert clips(Args(mf_grad_clip=0.0)) == (0.0, 0.5)
    assert clips(Args(grad_clip=5.0, mf_grad_clip=0.0)) == (0.0, 5.0)
