"""The `moedream` console script."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moedream.platform.cli import COMMANDS, main


def test_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "moedream.platform.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in COMMANDS:
        assert name in out


def test_unknown_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_subcommand_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["collect", "--help"])
    assert exc.value.code == 0
    assert "--episodes" in capsys.readouterr().out


# ---------------------------------------------------------------- the pipeline's stages (no Ray)


def test_train_and_quickstart_are_the_same_pipeline_command():
    from moedream.platform.commands import quickstart, train

    assert quickstart.run is train.run and quickstart.add_arguments is train.add_arguments
    assert COMMANDS["train"] == "train"


def test_stages_parse_in_pipeline_order_and_typos_name_the_choices():
    from moedream.config import ConfigError
    from moedream.platform.pipeline import STAGES, parse_stages

    assert parse_stages(None) == STAGES
    assert parse_stages("gate, collect") == ("collect", "gate")
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['agent'\].*collect,world_model"):
        parse_stages("collect,agent")


def _pipeline_config(tmp_path, **changes):
    from moedream.config import load_yaml, merged
    from moedream.platform.quickstart import DEFAULT_CONFIG, QuickstartConfig

    data = merged(load_yaml(DEFAULT_CONFIG), {"out": str(tmp_path), **changes})
    return QuickstartConfig.from_dict(data)


def test_plan_skips_recorded_stages_and_reruns_from_the_first_changed_config(tmp_path):
    from moedream.config import ConfigError
    from moedream.platform.pipeline import STAGES, StageLedger, fingerprints, plan_stages

    cfg = _pipeline_config(tmp_path)
    prints = fingerprints(cfg)
    ledger = StageLedger(cfg.run_dir)
    for stage in ("collect", "world_model", "serve"):
        ledger.record(stage, prints[stage], 1.5, {"made": stage})
    reloaded = StageLedger(cfg.run_dir)  # read back from <run>/stages.json
    plan = plan_stages(reloaded, prints, STAGES, cfg.run_dir)
    assert [s for s, done in plan if done] == ["collect", "world_model", "serve"]
    assert plan[0][1] == {"made": "collect", "seconds": 1.5}
    with pytest.raises(ConfigError, match="stage `gate` .* has not run .* add it to --stages"):
        plan_stages(reloaded, prints, ["agents"], cfg.run_dir)

    # a changed world-model section: that stage and every later one are stale
    changed = fingerprints(_pipeline_config(tmp_path, world_model={"train": {"steps": 7}}))
    assert (
        changed["collect"] == prints["collect"] and changed["world_model"] != prints["world_model"]
    )
    plan = plan_stages(reloaded, changed, STAGES, cfg.run_dir)
    assert [s for s, done in plan if done] == ["collect"]
    with pytest.raises(ConfigError, match="stage `world_model` .* config .* changed"):
        plan_stages(reloaded, changed, ["serve"], cfg.run_dir)
    with pytest.raises(ConfigError, match="stage `serve` .* a stage before it runs again"):
        plan_stages(reloaded, changed, ["world_model", "gate"], cfg.run_dir)

    # the gate calibrates on windows of the imagination horizon: a new horizon re-runs it
    horizon = cfg.agents_config().imagination.horizon + 1
    longer = fingerprints(_pipeline_config(tmp_path, agents={"imagination": {"horizon": horizon}}))
    assert longer["serve"] == prints["serve"] and longer["gate"] != prints["gate"]

    # the serve stage fits the episode memory only when imagination uses it
    memory = not cfg.agents_config().imagination.memory
    with_memory = fingerprints(
        _pipeline_config(tmp_path, agents={"imagination": {"memory": memory}})
    )
    assert with_memory["world_model"] == prints["world_model"]
    assert with_memory["serve"] != prints["serve"]

    # recording a stage again drops the records made from what it replaced
    reloaded.record("world_model", changed["world_model"], 2.0, {})
    assert list(StageLedger(cfg.run_dir).entries) == ["collect", "world_model"]


def test_a_corrupt_ledger_says_how_to_start_over(tmp_path):
    from moedream.config import ConfigError
    from moedream.platform.pipeline import StageLedger

    (tmp_path / "stages.json").write_text("{not json")
    with pytest.raises(ConfigError, match="stages.json is not valid JSON.*delete it"):
        StageLedger(tmp_path)


def test_imagination_defaults_to_the_world_model_and_team_mode_is_gone():
    from moedream.config import ConfigError
    from moedream.platform.agents import AgentsConfig, imagination_label
    from moedream.policies.imagination_config import ImaginationConfig

    cfg = AgentsConfig.from_dict({"imagination": {"enabled": True}})
    assert cfg.imagination.provider == "world_model"
    assert imagination_label(cfg.imagination) == "model-based"
    assert imagination_label(ImaginationConfig()) == "model-free"
    stand_in = ImaginationConfig(enabled=True, provider="env_replay")
    assert imagination_label(stand_in) == "env_replay (test stand-in)"
    with pytest.raises(ConfigError, match=r"`team\.mode` = 'mpc' was removed.*delete the field"):
        AgentsConfig.from_dict({"team": {"mode": "mpc"}})


def test_pipeline_command_reports_config_errors_with_status_2(tmp_path, capsys):
    from moedream.platform.jobs import train as job

    assert main(["train", "--stages", "collect,agent"]) == 2
    assert "unknown stage(s) ['agent']" in capsys.readouterr().err
    # before Ray: agents needs the stages before it, and this run folder has none of them
    assert job.main(["--stages", "agents", "--out", str(tmp_path)]) == 2
    assert "stage `collect` is needed" in capsys.readouterr().err
