"""The results runner's train_fn on the platform: train one variant with one seed through
moedream's own pipeline and report separate fixed-seed evaluations every M real steps.

A model-free variant trains with :func:`moedream.platform.agents.train`. A model-based one first
runs the main job's stages 1-4 for its seed (collect random episodes, train its own world model
with Ray Train, deploy it with Serve, start the gate: :func:`prepare_imagination`); the real
steps of that collection count, so its evaluations sit that much further along the real-step
axis and its team trains for that many fewer real steps within the budget.

Every evaluation runs ``protocol.eval_episodes`` whole episodes on env seeds
``train.eval_seed + k`` (the same for every variant and seed, disjoint from the training envs)
with the team's current weights, apart from training (moedream.policies.metrics.evaluate_team).
The first is at real step 0, on the untrained team (the world-model data never touch its
weights). Reported metrics:

    team_return           mean team return of the evaluation episodes (shaped on Overcooked)
    soups_per_episode     soups delivered per evaluation episode (NaN off Overcooked)
    action_rate_<k>       fraction of the evaluation's agent steps on action k (discrete envs)
    gate_approve_rate     imagined trajectories the gate approved, mean over the iterations since
                          the last evaluation (NaN without imagination)
    coherent_fraction     mean H7 (fraction of coherent imagined steps), same iterations
    imagined_env_steps    imagined steps learnt from so far
    train_team_return     the training episodes' running mean (for reference only)

``wallclock_s`` is the seconds of the run so far without the evaluations' own time (world-model
preparation included).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from moedream.config import ConfigError
from moedream.results.runner import Callback
from moedream.results.spec import Protocol, ResultsSpec, Variant
from moedream.results.variants import train_settings, variant_configs

log = logging.getLogger(__name__)
RUN_FOLDER = "seed_{seed}_run"  # per run, next to the runner's files: RLlib logs, TensorBoard


class PlatformTrainer:
    """``train_fn(variant, seed, callback)`` for :func:`moedream.results.runner.run_all`."""

    def __init__(self, spec: ResultsSpec, out_dir: str | Path, *, progress: bool = True):
        self.settings = train_settings(spec)
        self.out_dir, self.progress = Path(out_dir).resolve(), progress
        for variant in spec.variants:  # every variant's configs build before Ray work starts
            protocol_fits(spec.protocol, self.configs(variant, seed=spec.protocol.seeds[0])[0])

    def configs(self, variant: Variant, seed: int):
        """(AgentsConfig, QuickstartConfig or None) of ``variant`` trained with ``seed``."""
        from moedream.platform.agents import AgentsConfig
        from moedream.platform.quickstart import QuickstartConfig

        agents, prepare = variant_configs(variant, self.settings)
        agents["seed"] = seed
        where = f"variant {variant.name!r}: "
        if prepare is None:
            return _built(AgentsConfig, agents, where), None
        prepare.update(
            name="prepare", out=str(self.run_dir(variant, seed)), http_port=self.settings.http_port
        )
        prepare["collect"] = {**prepare.get("collect", {}), "seed": seed, "env": agents["env"],
                              "env_options": dict(agents.get("env_options") or {})}  # fmt: skip
        prepare["agents"] = agents
        quickstart = _built(QuickstartConfig, prepare, where)
        return quickstart.agents_config(), quickstart

    def run_dir(self, variant: Variant, seed: int) -> Path:
        return self.out_dir / variant.name / RUN_FOLDER.format(seed=seed)

    def __call__(self, variant: Variant, seed: int, callback: Callback) -> None:
        from moedream.platform.agents import train

        agents, quickstart = self.configs(variant, seed)
        run_dir = self.run_dir(variant, seed)
        if run_dir.exists():  # an unfinished earlier try: its logs and models must not mix in
            log.warning("%s seed %d: removing the unfinished run's folder %s", variant.name, seed,
                        run_dir)  # fmt: skip
            shutil.rmtree(run_dir)
        clock = _Clock()
        offset = self._prepare(quickstart) if quickstart is not None else 0
        budget = variant.protocol.budget_real_steps
        if offset >= budget:
            raise ConfigError(
                f"variant {variant.name!r}: the world model's collection took {offset} real "
                f"steps, the whole budget of {budget}; collect fewer episodes or raise "
                "protocol.budget_real_steps"
            )
        evaluations = _Evaluations(
            agents, variant, self.settings.eval_seed, offset, callback, clock
        )
        try:
            train(
                agents,
                run_dir,
                env_steps=budget - offset,
                run_name="team",
                progress=self.progress,
                checkpoint=False,
                on_iteration=evaluations,
            )
        finally:
            if quickstart is not None:
                from ray import serve

                serve.shutdown()  # frees the replica's CPU for the runs after this one

    def _prepare(self, quickstart) -> int:
        """Stages 1-4 of the main job for this run; the real env steps they took."""
        from moedream.platform.quickstart import prepare_imagination

        return int(prepare_imagination(quickstart)["collect_env_steps"])


def _built(cls, data: dict[str, Any], where: str):
    try:
        return cls.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None


class _Clock:
    """Seconds since the run started, without the evaluations' own time."""

    def __init__(self):
        self.start, self.excluded = time.perf_counter(), 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.excluded


class _Evaluations:
    """``on_iteration`` of agents.train: evaluates at real step 0 and whenever the run's real
    steps (world-model data included) pass the next multiple of protocol.eval_every_real_steps
    or reach the budget."""

    def __init__(self, agents, variant: Variant, eval_seed: int, offset: int, callback, clock):
        self.agents, self.protocol, self.name = agents, variant.protocol, variant.name
        self.eval_seed, self.offset, self.callback, self.clock = eval_seed, offset, callback, clock
        self.policy, self.next_mark, self.seen = None, 0, 0

    def __call__(self, algo, history: list[dict[str, float]]) -> None:
        real = self.offset + int(history[-1]["charts/real_env_steps"]) if history else 0
        p = self.protocol
        if history and real < self.next_mark and real < p.budget_real_steps:
            return
        if history and real >= self.next_mark + p.eval_every_real_steps:
            raise ConfigError(
                f"variant {self.name!r}: one iteration passed two evaluation points (real steps "
                f"{real - int(history[-1]['charts/real_env_steps_iter'])} -> {real}); make "
                f"protocol.eval_every_real_steps ({p.eval_every_real_steps}) at least the real "
                f"steps of an iteration (train_batch_size {self.agents.train_batch_size})"
            )
        seconds = self.clock.seconds()
        before = time.perf_counter()
        metrics = {**self._evaluate(algo), **self._training_metrics(history)}
        self.clock.excluded += time.perf_counter() - before
        self.callback(real, seconds, metrics)
        log.info("%s: real step %d, %.0f s: %s", self.name, real, seconds,
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))  # fmt: skip
        self.next_mark = (real // p.eval_every_real_steps + 1) * p.eval_every_real_steps
        self.seen = len(history)

    def _evaluate(self, algo) -> dict[str, float]:
        from moedream.envs import env_spec
        from moedream.policies.metrics import evaluate_team

        spec = env_spec(self.agents.env, **self.agents.env_options)
        policy = self._team_policy(algo, spec)
        result = evaluate_team(policy, self.agents.env, dict(self.agents.env_options), spec,
                               episodes=self.protocol.eval_episodes, seed=self.eval_seed)  # fmt: skip
        rates = {f"action_rate_{k}": rate for k, rate in enumerate(result.action_rates)}
        return {"team_return": result.team_return, "soups_per_episode": result.soups_per_episode,
                **rates}  # fmt: skip

    def _team_policy(self, algo, spec):
        """The team's current weights as a TeamPolicy (an inference copy of the learner's)."""
        from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE

        from moedream.policies.imagination import TeamPolicy

        if self.policy is None:
            spaces = algo.env_runner_group.get_spaces()
            module = algo.config.get_multi_rl_module_spec(
                spaces=spaces, inference_only=True
            ).build()
            self.policy = TeamPolicy(module, spec, self.agents.team.shared_planner)
        state = algo.learner_group.get_state(
            components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}", inference_only=True
        )
        self.policy.module.set_state(state[COMPONENT_LEARNER][COMPONENT_RL_MODULE])
        return self.policy

    def _training_metrics(self, history: list[dict[str, float]]) -> dict[str, float]:
        """Gate figures over the iterations since the last evaluation; training return."""
        recent = history[self.seen :]

        def mean(key: str) -> float:
            values = [h.get(key, math.nan) for h in recent]
            values = [v for v in values if v == v]
            return float(np.mean(values)) if values else math.nan

        last = history[-1] if history else {}
        return {
            "gate_approve_rate": mean("gate/approve_rate"),
            "coherent_fraction": mean("provider/gate_h7_mean"),
            "imagined_env_steps": float(last.get("charts/imagined_env_steps", 0.0)),
            "train_team_return": float(last.get("charts/team_return", math.nan)),
        }


def protocol_fits(protocol: Protocol, agents) -> None:
    """ConfigError unless an iteration's real steps fit between two evaluations."""
    if protocol.eval_every_real_steps < agents.train_batch_size:
        raise ConfigError(
            f"protocol.eval_every_real_steps = {protocol.eval_every_real_steps} is below "
            f"train_batch_size {agents.train_batch_size}: one iteration would pass two "
            "evaluation points; raise it to at least the batch"
        )
