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

``wallclock_s`` is the seconds of the run so far without the evaluations' and resume points'
own time (world-model preparation included).

Resume. After every evaluation the run saves a resume point (moedream.results.resume: the RLlib
algorithm with ``Algorithm.save_to_path``, i.e. the team, its optimizer, RLlib's lifetime
counters and, for model-based runs, the imagination provider's state: the served world model's
current checkpoint, the episode store the world model retrains on, the gate's refit
normaliser; plus the real-step offset of the world model's collection, the next evaluation
mark and the wall-clock so far). When the runner finds an unfinished run with a resume point,
it keeps the curve's rows up to that evaluation and calls this trainer with ``resumed``: the
world model's stages are resumed from the run folder (Serve deployed again from the recorded
checkpoint and the gate started again from its saved normaliser if they are gone), the
algorithm is restored, the provider serves its saved world-model checkpoint again and pushes
the saved normaliser to the gate, and training continues from the restored real-step count.
The real steps sampled after the resume point by an interrupted sitting are neither counted
nor learnt from: they are sampled again. A resumed run does not reproduce an uninterrupted one
exactly: RNG streams (torch, the env runners' action sampling, MBMAPPO's start-state sampling)
restart from their seeds, the envs restart from reset (a partly sampled episode is dropped),
a background world-model fine-tune still running at the resume point is not restarted (the
next scheduled one runs), and the gate actor's own counters keep what the interrupted sitting
judged. ``wallclock_s`` adds the seconds of the earlier sittings up to their resume points to
the resumed sitting's (its start-up included); the time a sitting spent past its last resume
point is not counted.
"""

from __future__ import annotations

import logging
import math
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from moedream.config import ConfigError
from moedream.results.resume import ResumePoint, RunCheckpoints
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

    def resolved_config(self, variant: Variant, seed: int) -> dict[str, Any]:
        """What the run trains with, for its record (moedream.results.runner): the typed
        AgentsConfig and preparation config after the overrides, and the evaluation seed."""
        agents, quickstart = self.configs(variant, seed)
        prepare = quickstart.to_dict() if quickstart is not None else None
        if prepare is not None:
            del prepare["agents"]  # the same AgentsConfig as "agents"
        return {
            "agents": agents.to_dict(),
            "prepare": prepare,
            "eval_seed": self.settings.eval_seed,
        }

    def run_dir(self, variant: Variant, seed: int) -> Path:
        return self.out_dir / variant.name / RUN_FOLDER.format(seed=seed)

    def resume_point(self, variant: Variant, seed: int) -> int:
        """Evaluations the run's last resume point covers (0: none; the run starts over)."""
        point = RunCheckpoints(self.run_dir(variant, seed)).latest()
        return point.evaluations if point is not None else 0

    def __call__(
        self, variant: Variant, seed: int, callback: Callback, *, resumed: int = 0
    ) -> None:
        """Train the run, or with ``resumed`` > 0 continue it from its resume point after that
        many evaluations (already on record: the next one reported is the one after)."""
        from moedream.platform.agents import train

        agents, quickstart = self.configs(variant, seed)
        run_dir = self.run_dir(variant, seed)
        point = self._start(variant, seed, resumed)
        if point is not None and point.real_steps >= variant.protocol.budget_real_steps:
            return  # evaluated at its budget: killed before the runner marked it done
        clock = _Clock(already=point.wallclock_s if point else 0.0)
        offset = self._prepare(quickstart) if quickstart is not None else 0
        budget = variant.protocol.budget_real_steps
        _check_offset(variant, offset, budget, point)
        evaluations = _Evaluations(
            agents, variant, self.settings.eval_seed, offset, callback, clock,
            checkpoints=RunCheckpoints(run_dir), point=point,
        )  # fmt: skip
        try:
            train(
                agents,
                run_dir,
                env_steps=budget - offset,
                run_name="team",
                progress=self.progress,
                checkpoint=False,
                on_iteration=evaluations,
                resume_from=evaluations.checkpoints.path(point) if point else None,
            )
        finally:
            if quickstart is not None:
                from ray import serve

                serve.shutdown()  # frees the replica's CPU for the runs after this one
                _wait_serve_released(self.settings.http_port)  # the next serve.start

    def _start(self, variant: Variant, seed: int, resumed: int):
        """The resume point to continue from (None: a fresh start in an emptied folder)."""
        run_dir = self.run_dir(variant, seed)
        point = RunCheckpoints(run_dir).latest() if resumed else None
        if resumed and (point is None or point.evaluations != resumed):
            raise ValueError(
                f"{variant.name} seed {seed}: asked to resume after {resumed} evaluations, but "
                f"the run's resume point covers {point.evaluations if point else 'none'}; "
                f"delete {run_dir} and its seed_{seed}.jsonl to run it again from scratch"
            )
        if point is not None:
            log.warning("%s seed %d: resuming after evaluation %d (real step %d) from %s",
                        variant.name, seed, point.evaluations, point.real_steps, run_dir)  # fmt: skip
        elif run_dir.exists():  # an unfinished earlier try: its logs and models must not mix in
            log.warning("%s seed %d: removing the unfinished run's folder %s", variant.name, seed,
                        run_dir)  # fmt: skip
            shutil.rmtree(run_dir)
        return point

    def _prepare(self, quickstart) -> int:
        """Stages 1-4 of the main job for this run; the real env steps they took."""
        from moedream.platform.quickstart import prepare_imagination

        return int(prepare_imagination(quickstart)["collect_env_steps"])


def _wait_serve_released(port: int, timeout_s: float = 120.0) -> None:
    """Wait until the Serve instance just shut down is gone: serve.shutdown() returns before its
    proxy actor has died, and on a loaded machine that proxy can still hold 127.0.0.1:``port``
    (the next serve.start fails to bind it) or its name (the next Serve controller adopts the
    dying proxy by name, ray.get_actor, and its start fails with ActorDiedError)."""
    deadline = time.monotonic() + timeout_s
    for what, released in (("its actors", _serve_actors_gone), ("its port", _port_free)):
        while not released(port):
            if time.monotonic() > deadline:
                log.warning("Serve's %s (port %d) still in use %.0f s after it shut down", what,
                            port, timeout_s)  # fmt: skip
                return
            time.sleep(1.0)


def _serve_actors_gone(port: int) -> bool:
    """No named actor (controller, proxies) left in Serve's namespace."""
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE

    named = ray.util.list_named_actors(all_namespaces=True)
    return not any(actor["namespace"] == SERVE_NAMESPACE for actor in named)


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _check_offset(variant: Variant, offset: int, budget: int, point: ResumePoint | None) -> None:
    """The world model's collection fits the budget and, when resuming, is the one the resume
    point was made with (a collection run again would make other data and another model)."""
    if offset >= budget:
        raise ConfigError(
            f"variant {variant.name!r}: the world model's collection took {offset} real "
            f"steps, the whole budget of {budget}; collect fewer episodes or raise "
            "protocol.budget_real_steps"
        )
    if point is not None and point.offset != offset:
        raise ValueError(
            f"variant {variant.name!r}: the resume point was made after a collection of "
            f"{point.offset} real steps, the world model's preparation now reports {offset} "
            "(its stages ran again); delete the run's folder and its JSONL to start over"
        )


def _built(cls, data: dict[str, Any], where: str):
    try:
        return cls.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None


class _Clock:
    """Seconds of the run so far, without the evaluations' own time; ``already``: the seconds
    of earlier sittings up to the resume point."""

    def __init__(self, already: float = 0.0):
        self.start, self.excluded, self.already = time.perf_counter(), 0.0, already

    def seconds(self) -> float:
        return self.already + time.perf_counter() - self.start - self.excluded


class _Evaluations:
    """``on_iteration`` of agents.train: evaluates at real step 0 and whenever the run's real
    steps (world-model data included) pass the next multiple of protocol.eval_every_real_steps
    or reach the budget."""

    def __init__(self, agents, variant: Variant, eval_seed: int, offset: int, callback, clock,
                 *, checkpoints: RunCheckpoints, point: ResumePoint | None = None):  # fmt: skip
        self.agents, self.protocol, self.name = agents, variant.protocol, variant.name
        self.eval_seed, self.offset, self.callback, self.clock = eval_seed, offset, callback, clock
        self.checkpoints, self.policy, self.seen = checkpoints, None, 0
        self.count = point.evaluations if point else 0
        self.next_mark = point.next_mark if point else 0

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
        self.seen, self.count = len(history), self.count + 1
        self._save(algo, real, seconds)

    def _save(self, algo, real: int, seconds: float) -> None:
        """A resume point right after this evaluation (its row is on record already)."""
        point = {"evaluations": self.count, "real_steps": real, "offset": self.offset,
                 "wallclock_s": seconds, "next_mark": self.next_mark}  # fmt: skip
        before = time.perf_counter()
        self.checkpoints.save(point, lambda folder: algo.save_to_path(str(folder)))
        self.clock.excluded += time.perf_counter() - before  # bookkeeping, not training

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
