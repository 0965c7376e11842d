"""Typed configs: YAML loading and errors that name the field, the value and the fix."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from moedream.config import ConfigBase, ConfigError, check, load_yaml
from moedream.platform.collect import CollectConfig
from moedream.platform.quickstart import DEFAULT_CONFIG, QuickstartConfig


@dataclasses.dataclass
class Inner(ConfigBase):
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check(self.rate > 0, f"{prefix}rate", self.rate, "must be > 0")


@dataclasses.dataclass
class Outer(ConfigBase):
    steps: int = 10
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_nested_from_dict_and_int_to_float():
    cfg = Outer.from_dict({"steps": 3, "inner": {"rate": 2, "mode": "b"}})
    assert cfg == Outer(steps=3, inner=Inner(rate=2.0, mode="b"))
    assert isinstance(cfg.inner.rate, float)
    assert Outer.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "data,pattern",
    [
        ({"inner": {"rate": -1}}, r"`inner\.rate` = -1(\.0)? is invalid: must be > 0"),
        ({"inner": {"mode": "c"}}, r"`inner\.mode` = 'c'.*one of \['a', 'b'\]"),
        ({"steps": "ten"}, r"`steps` = 'ten'.*integer"),
        ({"stpes": 1}, r"unknown config field.*stpes.*valid fields: \['inner', 'steps'\]"),
        ({"inner": {"rat": 1}}, r"unknown config field.*inner\.rat"),
        ({"inner": 3}, r"`inner` = 3.*mapping"),
    ],
)
def test_errors_name_field_value_and_fix(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Outer.from_dict(data)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*not valid YAML"):
        Outer.from_yaml(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("steps: -x\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml.*`steps`"):
        Outer.from_yaml(wrong)
    with pytest.raises(ConfigError, match="does not exist"):
        Outer.from_yaml(tmp_path / "missing.yaml")


def test_quickstart_default_config_loads():
    cfg = QuickstartConfig.from_yaml(DEFAULT_CONFIG)
    assert cfg.collect.env == "overcooked"
    assert cfg.collect.env_options["layout"] == "cramped_room"


def test_the_provider_finds_the_gate_actor_the_quickstart_names():
    data = load_yaml(DEFAULT_CONFIG)
    data["gate_actor"] = {"actor_name": "my_gate", "namespace": "my_ns"}
    wm = QuickstartConfig.from_dict(data).agents_config().imagination.world_model
    assert (wm["gate_actor_name"], wm["gate_namespace"]) == ("my_gate", "my_ns")
    data["agents"]["imagination"]["world_model"] = {"gate_actor_name": "other"}
    with pytest.raises(ConfigError, match=r"gate_actor_name = 'other' differs.*'my_gate'"):
        QuickstartConfig.from_dict(data).agents_config()


def test_collect_config_checks_env_options():
    with pytest.raises(ConfigError, match=r"env 'overcooked'.*`layout` = 'x'"):
        CollectConfig.from_dict({"env": "overcooked", "env_options": {"layout": "x"}})
    with pytest.raises(ConfigError, match=r"`episodes` = 0"):
        CollectConfig.from_dict({"episodes": 0})


def test_ray_workers_get_a_fixed_hash_seed(monkeypatch):
    """Ray workers get the driver's PYTHONHASHSEED, or 0: never a random one per process."""
    from moedream.platform.ray_setup import worker_env_vars

    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    assert worker_env_vars()["PYTHONHASHSEED"] == "0"
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    assert worker_env_vars()["PYTHONHASHSEED"] == "7"


def test_ray_train_polls_its_workers_often_unless_told_otherwise(monkeypatch):
    from moedream.platform.ray_setup import worker_env_vars

    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    assert worker_env_vars()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    assert worker_env_vars()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
