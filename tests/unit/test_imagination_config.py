"""ImaginationConfig: the one home of the imagination settings, shared by the agents YAML and
MBMAPPOConfig. Errors name the field; copies, pickles and RLlib's dict round trip keep it whole."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from moedream.config import ConfigError, load_yaml
from moedream.envs import env_spec
from moedream.platform.agents import AgentsConfig
from moedream.platform.serve.names import APP_NAME
from moedream.policies.imagination_config import ImaginationConfig

AGENTS_CONFIGS = ["configs/agents_overcooked.yaml", "configs/agents_mamujoco.yaml"]
QUICKSTART_CONFIGS = ["configs/quickstart.yaml", "configs/quickstart_mamujoco.yaml"]

BAD_VALUES = [
    ("enabled", "yes", "true or false"),
    ("provider", "crystal_ball", "one of"),
    ("horizon", 0, "integer > 0"),
    ("horizon", 2.5, "integer > 0"),
    ("imagined_ratio", -1.0, ">= 0"),
    ("updates", 0, "integer >= 1"),
    ("updates", True, "integer >= 1"),
    ("start_iteration", -1, "integer >= 0"),
    ("later_epochs", -1, "integer >= 0"),
    ("later_epochs", 1.5, "integer >= 0"),
    ("real_every_update", 1, "true or false"),
    ("uncertainty_penalty", -0.5, ">= 0"),
    ("world_model_retrain_every", -2, "integer >= 0"),
    ("gate", None, "true or false"),
    ("serve_app_name", "", "non-empty string"),
    ("world_model", [], "mapping"),
    ("memory", "yes", "true or false"),
    ("memory_branches", 0, "integer >= 1"),
]


@pytest.mark.parametrize(("field", "value", "fix"), BAD_VALUES)
def test_validate_names_the_field_and_the_fix(field, value, fix):
    bad = dataclasses.replace(ImaginationConfig(), **{field: value})  # replace skips validate
    with pytest.raises(ConfigError, match=rf"`imagination\.{field}` = .* is invalid: .*{fix}"):
        bad.validate(prefix="imagination.")


def test_real_batch_passes_count_every_update_that_learns_from_the_real_batch():
    anchored = ImaginationConfig(enabled=True, updates=16, real_every_update=True)
    assert anchored.real_batch_passes(6) == 6 * 16
    assert anchored.replace(later_epochs=2).real_batch_passes(6) == 6 + 15 * 2
    assert anchored.replace(later_epochs=2).epochs_of_later_updates(6) == 2
    assert anchored.epochs_of_later_updates(6) == 6  # 0: the first update's num_epochs
    assert anchored.replace(real_every_update=False).real_batch_passes(6) == 6
    assert anchored.replace(enabled=False).real_batch_passes(6) == 6  # model-free


def test_imagination_on_needs_imagined_steps():
    ImaginationConfig(imagined_ratio=0.0).validate()  # model-free: no imagined steps is fine
    with pytest.raises(ConfigError, match="imagined_ratio.*> 0 when imagination is enabled"):
        ImaginationConfig(enabled=True, imagined_ratio=0.0).validate()


def test_memory_needs_the_served_world_model():
    ImaginationConfig(memory=True).validate()  # provider world_model: the default
    with pytest.raises(ConfigError, match=r"`imagination\.memory` = True.*provider 'world_model'"):
        ImaginationConfig(memory=True, provider="env_replay").validate(prefix="imagination.")


def test_agents_yaml_sections_load_unchanged():
    """The agents YAMLs' `imagination:` keys are the config's fields; the defaults hold."""
    fields = {f.name for f in dataclasses.fields(ImaginationConfig)}
    for path in AGENTS_CONFIGS:
        section = load_yaml(path)["imagination"]
        assert set(section) <= fields, path
        loaded = AgentsConfig.from_yaml(path).imagination
        assert isinstance(loaded, ImaginationConfig)
        assert {k: getattr(loaded, k) for k in section} == section
    for path in QUICKSTART_CONFIGS:
        section = load_yaml(path)["agents"]["imagination"]
        assert set(section) <= fields, path
    assert ImaginationConfig().serve_app_name == APP_NAME
    with pytest.raises(ConfigError, match=r"imagination\.horizon"):
        AgentsConfig.from_dict({"imagination": {"horizon": 0}})
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['imagination\.horizn'\]"):
        AgentsConfig.from_dict({"imagination": {"horizn": 5}})


def test_deepcopy_and_pickle_round_trip():
    original = ImaginationConfig(
        enabled=True,
        provider="world_model",
        horizon=7,
        updates=3,
        world_model={"checkpoint_dir": "/tmp/wm", "retrain_steps": 5},
    )
    for clone in (copy.deepcopy(original), pickle.loads(pickle.dumps(original))):
        assert clone == original
        assert clone.world_model is not original.world_model  # nothing shared
    assert ImaginationConfig.from_dict(original.to_dict()) == original


# ---------------------------------------------------------------------------------------------
# MBMAPPOConfig holds it whole (imports RLlib; starts no Ray)


def mbmappo_config(imagination: ImaginationConfig):
    from moedream.policies.algorithm import MBMAPPOConfig
    from moedream.policies.imagination import EnvReplayImaginerFactory

    spec = env_spec("overcooked", layout="cramped_room")
    return MBMAPPOConfig().model_based(
        imagination=imagination,
        imagination_provider=EnvReplayImaginerFactory("overcooked", {"layout": "cramped_room"}),
        env_spec_json=spec.to_json(),
    )


@pytest.mark.parametrize("value", [True, {"enabled": True, "horizon": 5}, None])
def test_mbmappo_config_rejects_anything_but_an_imagination_config(value):
    from moedream.policies.algorithm import MBMAPPOConfig

    with pytest.raises(ConfigError, match="`imagination` = .* must be an ImaginationConfig"):
        MBMAPPOConfig().model_based(imagination=value)
    config = mbmappo_config(ImaginationConfig())
    config.imagination = value  # set behind model_based's back: validation still catches it
    with pytest.raises(ConfigError, match="must be an ImaginationConfig"):
        config.validate_model_based()


def test_mbmappo_config_validates_its_imagination_once_by_its_own_validate():
    config = mbmappo_config(ImaginationConfig(enabled=True, horizon=5))
    config.validate_model_based()
    assert config.imagination.horizon == 5
    assert not hasattr(config, "serve_app_name") and not hasattr(config, "imagination_horizon")
    bad = mbmappo_config(dataclasses.replace(ImaginationConfig(), updates=0))
    with pytest.raises(ConfigError, match=r"`imagination\.updates` = 0"):
        bad.validate_model_based()
    no_provider = mbmappo_config(ImaginationConfig(enabled=True)).model_based(
        imagination_provider=None
    )
    with pytest.raises(ConfigError, match="imagination_provider.*imagination.enabled"):
        no_provider.validate_model_based()


@pytest.mark.parametrize("threads", [0, "2", 1.5, True])
def test_mbmappo_config_checks_its_torch_threads(threads):
    config = mbmappo_config(ImaginationConfig()).model_based(torch_num_threads=threads)
    with pytest.raises(ConfigError, match="`torch_num_threads` .* must be an integer >= 1"):
        config.validate_model_based()
    for ok in (1, 2, None):
        mbmappo_config(ImaginationConfig()).model_based(torch_num_threads=ok).validate_model_based()


def test_mbmappo_config_survives_rllib_copies_and_dicts():
    """What Tune and RLlib do with a config: copy(), to_dict() -> from_dict(), get_state()."""
    from moedream.policies.algorithm import MBMAPPOConfig

    imagination = ImaginationConfig(enabled=True, horizon=4, imagined_ratio=0.5, gate=False)
    config = mbmappo_config(imagination)
    for clone in (
        config.copy(copy_frozen=False),
        MBMAPPOConfig.from_dict(config.to_dict()),
        MBMAPPOConfig.from_state(config.get_state()),
        pickle.loads(pickle.dumps(config)),
    ):
        assert isinstance(clone.imagination, ImaginationConfig)
        assert clone.imagination == imagination
        clone.validate_model_based()
    # a sweep's param space carries the settings as a dict: the trial gets the object back
    space = config.to_dict()
    space["imagination"] = {**imagination.to_dict(), "horizon": 9}
    trial = MBMAPPOConfig.from_dict(space)
    assert trial.imagination == dataclasses.replace(imagination, horizon=9)
    space["imagination"] = {"horizn": 9}
    with pytest.raises(ConfigError, match=r"imagination\.horizn"):
        MBMAPPOConfig.from_dict(space)


def test_the_regressed_mean_switch_is_an_imagination_setting():
    """imagination.world_model.prediction reaches the served-model provider (the regressed
    mean row of the results table); a typo fails before Ray starts, naming the field."""
    from moedream.platform.agents import provider_factory

    data = load_yaml("configs/agents_overcooked.yaml")
    data["imagination"] = {"enabled": True, "provider": "world_model",
                           "world_model": {"prediction": "mean"}}  # fmt: skip
    assert provider_factory(AgentsConfig.from_dict(data)).prediction == "mean"
    data["imagination"]["world_model"]["prediction"] = "median"
    with pytest.raises(ConfigError, match=r"prediction` = 'median' is invalid: must be one of"):
        provider_factory(AgentsConfig.from_dict(data))


def test_memory_with_the_regressed_mean_names_both_fields():
    with pytest.raises(ConfigError, match=r"memory.*prediction: sample"):
        ImaginationConfig.from_dict(
            {"enabled": True, "provider": "world_model", "memory": True,
             "world_model": {"prediction": "mean"}}
        )  # fmt: skip
