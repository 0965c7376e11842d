"""What each variant of a results spec trains on the platform: its AgentsConfig, its world-model
preparation, and the overrides a replay-matched control derives from its model-based variant.

The spec's ``train:`` section (:class:`TrainSettings`) names the base configs; a variant's
``overrides`` are dotted keys into them::

    train:
      agents_config: configs/agents_overcooked.yaml     # AgentsConfig of every variant
      prepare_config: configs/quickstart.yaml           # collect, world model, Serve, gate
    variants:
      - name: model_based
        overrides:
          imagination.enabled: true
          imagination.provider: world_model
          prepare.world_model.model.moe.backend: dense  # keys under `prepare.` go to the
                                                        # preparation (QuickstartConfig) config

A variant is model-based when its imagination is enabled with the ``world_model`` provider;
only those run the preparation (stages 1-4 of the main job) and count its real steps.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from moedream.config import ConfigBase, ConfigError, check, load_yaml
from moedream.results.spec import ResultsSpec, Variant

PREPARE_PREFIX = "prepare."
EVAL_SEED_BASE = 1_000_000
"""Evaluation episode k resets its env with seed EVAL_SEED_BASE + k: the same episodes for every
variant and seed, far from the training seeds (RLlib seeds its env runners' envs with the run's
seed plus small worker and vector offsets)."""


@dataclasses.dataclass
class TrainSettings(ConfigBase):
    """The spec's ``train:`` section: the base configs every variant's overrides apply to."""

    agents_config: str = ""
    """AgentsConfig YAML (e.g. configs/agents_overcooked.yaml)."""
    prepare_config: str = ""
    """QuickstartConfig YAML whose collect, world_model, serve, gate and gate_actor sections
    prepare a model-based variant (its agents section is replaced by the variant's)."""
    eval_seed: int = EVAL_SEED_BASE
    """First env seed of the evaluation episodes (disjoint from the training seeds)."""
    http_port: int = 8000
    """Serve's HTTP port on 127.0.0.1 for model-based variants."""

    def validate(self, prefix: str = "train.") -> None:
        super().validate(prefix)
        check(bool(self.agents_config), f"{prefix}agents_config", self.agents_config,
              "must name the AgentsConfig YAML every variant starts from")  # fmt: skip
        check(self.eval_seed >= 1000, f"{prefix}eval_seed", self.eval_seed,
              "must be >= 1000, away from the training seeds")  # fmt: skip


def train_settings(spec: ResultsSpec) -> TrainSettings:
    settings = TrainSettings.from_dict(spec.train, prefix="train.")
    settings.validate()
    return settings


def set_dotted(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    """``data[a][b][c] = value`` for key 'a.b.c', creating missing mappings."""
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(
                f"{where}: override `{key}`: `{'.'.join(parents[: i + 1])}` is {node!r}, not a "
                "mapping; override the whole value or fix the key"
            )
    node[leaf] = copy.deepcopy(value)


def variant_configs(variant: Variant, settings: TrainSettings) -> tuple[dict, dict | None]:
    """(AgentsConfig dict, QuickstartConfig dict or None) of ``variant``: the base YAMLs with
    its overrides; the second is None unless the variant is model-based."""
    agents = load_yaml(settings.agents_config)
    prepare = load_yaml(settings.prepare_config) if settings.prepare_config else {}
    where = f"variant {variant.name!r}"
    for key, value in variant.overrides.items():
        if key.startswith(PREPARE_PREFIX):
            set_dotted(prepare, key[len(PREPARE_PREFIX) :], value, where)
        else:
            set_dotted(agents, key, value, where)
    if not is_model_based(agents):
        return agents, None
    if not settings.prepare_config:
        raise ConfigError(
            f"{where} imagines with the world_model provider but `train.prepare_config` is "
            "not set: name the QuickstartConfig YAML that collects, trains, serves and gates"
        )
    return agents, prepare


def is_model_based(agents: dict[str, Any]) -> bool:
    imagination = agents.get("imagination") or {}
    return bool(imagination.get("enabled")) and imagination.get("provider") == "world_model"


def real_passes(agents: dict[str, Any]) -> int:
    """PPO epochs over each real batch per iteration (ImaginationConfig.real_batch_passes: the
    first update's num_epochs, plus the later updates' epochs when real_every_update)."""
    from moedream.platform.agents import AgentsConfig

    cfg = AgentsConfig.from_dict(agents)
    return cfg.imagination.real_batch_passes(cfg.num_epochs)


def resolve(spec: ResultsSpec) -> ResultsSpec:
    """The spec with every replay-matched variant's overrides made concrete: its own, plus
    imagination off and num_epochs = the real passes of the variant it matches."""
    settings = train_settings(spec)
    variants = []
    for variant in spec.variants:
        if variant.replay_matched_to:
            target = spec.variant(variant.replay_matched_to)
            variant = dataclasses.replace(
                variant, overrides=replay_matched_overrides(variant, target, settings)
            )
        variants.append(variant)
    return dataclasses.replace(spec, variants=tuple(variants))


def replay_matched_overrides(
    variant: Variant, target: Variant, settings: TrainSettings
) -> dict[str, Any]:
    derived = {
        "num_epochs": real_passes(variant_configs(target, settings)[0]),
        "imagination.enabled": False,
    }
    clash = sorted(set(derived) & set(variant.overrides))
    if clash:
        raise ConfigError(
            f"variant {variant.name!r}: overrides {clash} are derived from "
            f"replay_matched_to = {target.name!r}; remove them from its overrides"
        )
    return {**variant.overrides, **derived}
