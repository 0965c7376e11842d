"""MBMAPPO: multi-agent PPO (centralised reflector) that also learns from gated imagination.

``MBMAPPO.training_step`` (RLlib new API stack, after ``algorithms/ppo/ppo.py``):
1. sample real episodes from the env runners;
2. if ``imagination.enabled``: hand the real episodes to the provider (``observe``), retrain the
   world model on schedule (``retrain``), branch imagined rollouts from real states with the
   current planner (``imagine``), keep what the gate approves (``gate``), and turn the kept
   trajectories into episodes (:func:`build_imagined_episodes`);
3. one PPO update on real + kept imagined episodes (``learner_group.update(episodes=...)``);
3b. with ``imagination.updates`` = K > 1: K - 1 more rounds of (imagine under the UPDATED
   planner from real start states -> gate -> PPO update of ``imagination.later_epochs`` epochs
   on the kept imagined episodes, plus the real batch if ``imagination.real_every_update``),
   the Dyna/ME-TRPO lever: many policy updates per real step, each on fresh on-policy
   imagined data;
4. sync ALL modules (perceiver and reflector have no loss of their own, so PPO's
   "modules in the learner results" would miss them) to the env runners.

A provider call that fails for good (ProviderFailure: its remote retries ran out) never stops
training: a failed ``imagine`` or ``gate`` skips the iteration's remaining imagination rounds
(the real batch is still learnt), a failed ``evaluate``/``observe``/``retrain`` skips only
itself; each is logged with its cause and counted (``provider_failures_<stage>_total``,
``imagination_skipped_total``, ``imagined_rows_dropped_total``). See docs/faults.md.

With ``imagination.enabled`` false it is the model-free MAPPO baseline. The settings are one
:class:`moedream.policies.imagination_config.ImaginationConfig` (``MBMAPPOConfig.imagination``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.algorithm_config import NotProvided
from ray.rllib.algorithms.ppo.ppo import PPO, PPOConfig
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import (
    ALL_MODULES,
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    NUM_MODULE_STEPS_TRAINED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
    WEIGHTS_SEQ_NO,
)
from ray.rllib.utils.torch_utils import compute_global_norm

from moedream.config import ConfigError, fail, is_int
from moedream.envs.overcooked import SOUP_REWARD
from moedream.envs.spec import EnvSpec
from moedream.policies.episode_ends import BOOTSTRAP_TRUNCATED_EPISODES, restore_truncation
from moedream.policies.imagination import (
    GateDecision,
    ProviderFailure,
    TeamPolicy,
    build_imagined_episodes,
    penalise_uncertainty,
    real_td_residuals,
    sample_start_obs,
    td_residuals,
)
from moedream.policies.imagination_config import ImaginationConfig
from moedream.world_model.trajectory import Trajectories

logger = logging.getLogger("moedream.mbmappo")
METRICS = "moedream"  # results[METRICS][...] holds the per-iteration moedream metrics
STATE_KEY = "moedream_imagination"
# Where a training_step's wall-clock goes, logged per iteration as results[METRICS]["time_<stage>_s"]
# (+ "other": the rest of training_step). wm_* are the world-model provider's evaluation on the
# new real episodes, storing them, and fine-tuning; "episodes" builds imagined episodes with the
# local inference copy of the team (and refreshes its weights); "copy" deep-copies the real batch.
STAGES = ("sample", "wm_evaluate", "wm_observe", "wm_retrain", "imagine", "gate", "episodes",
          "learn", "copy", "sync")  # fmt: skip


class TeamPPOTorchLearner(PPOTorchLearner):
    """PPO learner with ONE optimizer over perceiver, reflector and planners.

    As in RLlib's shared-encoder example (``VPGTorchLearnerSharedOptimizer``): separate
    optimizers stepping the shared perceiver in turn would destabilise it.
    """

    @override(TorchLearner)
    def configure_optimizers(self) -> None:
        params = [p for module in self.module.values() for p in module.parameters()]
        self.register_optimizer(
            optimizer_name="team",
            optimizer=torch.optim.Adam(params=params),
            params=params,
            lr_or_lr_schedule=self.config.lr,
        )

    @override(TorchLearner)
    def postprocess_gradients(self, gradients_dict: dict) -> dict:
        """Clip the team optimizer's gradients as ``grad_clip`` / ``grad_clip_by`` say.

        RLlib post-processes gradients module by module, looking each module's optimizers
        up by its module id; the team optimizer is registered under ALL_MODULES, so RLlib's
        default returned no gradients and clipped nothing (``grad_clip`` was silently
        ignored). One optimizer over all modules: one global norm over all of them.
        """
        out = dict(gradients_dict)
        for name, optimizer in self.get_optimizers_for_module(ALL_MODULES):
            grads = self.filter_param_dict_for_optimizer(out, optimizer)
            if self.config.grad_clip is None:  # grad_clip 0 in AgentsConfig: off, norm logged
                norm = compute_global_norm(list(grads.values()))
            else:
                norm = self._get_clip_function()(
                    grads, grad_clip=self.config.grad_clip, grad_clip_by=self.config.grad_clip_by
                )
            out.update(grads)  # clipping by value replaces the tensors
            if norm is not None:  # the norm before clipping: spikes show here
                self.metrics.log_value(
                    (ALL_MODULES, f"gradients_{name}_global_norm"), norm, reduce="max"
                )
        return out


class TeamMetricsCallback(RLlibCallback):
    """Per real episode: team return and (Overcooked) soups delivered, on the env runners.

    Team return is one agent's return when the reward is shared by the team (Overcooked,
    MaMuJoCo; RLlib's ``episode_return_mean`` would sum it over agents), else the sum.
    Soups = sparse reward / 20 from the env's ``sparse_reward`` info.
    """

    def on_episode_step(self, *, episode, env_runner=None, **kwargs) -> None:
        data = episode.custom_data
        rewards = episode.get_rewards(-1)
        if not rewards:
            return
        shared = getattr(env_runner.config, "shared_team_reward", True) if env_runner else True
        values = [float(r) for r in rewards.values()]
        data["team_return"] = data.get("team_return", 0.0) + (values[0] if shared else sum(values))
        infos = episode.get_infos(-1)
        first = next(iter(infos.values()), {}) if infos else {}
        if isinstance(first, dict) and "sparse_reward" in first:
            data["sparse_return"] = data.get("sparse_return", 0.0) + float(first["sparse_reward"])

    def on_episode_end(self, *, episode, metrics_logger=None, **kwargs) -> None:
        if metrics_logger is None:
            return
        data = episode.custom_data
        metrics_logger.log_value("moedream_team_return", data.get("team_return", 0.0), window=20)
        if "sparse_return" in data:
            metrics_logger.log_value(
                "moedream_soups", data["sparse_return"] / SOUP_REWARD, window=20
            )


class MBMAPPOConfig(PPOConfig):
    """PPOConfig + model-based settings (set with :meth:`model_based`)."""

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or MBMAPPO)
        self.imagination = ImaginationConfig()
        self.imagination_provider: Callable[[Any], Any] | None = None
        self.env_spec_json: str | None = None
        self.shared_planner = True
        self.shared_team_reward = True
        self.bootstrap_truncated_episodes = BOOTSTRAP_TRUNCATED_EPISODES
        self.logdir_root: str | None = None
        self.torch_num_threads: int | None = 1

    def model_based(
        self,
        *,
        imagination: ImaginationConfig | None = NotProvided,
        imagination_provider: Callable[[Any], Any] | None = NotProvided,
        env_spec_json: str | None = NotProvided,
        shared_planner: bool | None = NotProvided,
        shared_team_reward: bool | None = NotProvided,
        bootstrap_truncated_episodes: bool | None = NotProvided,
        logdir_root: str | None = NotProvided,
        torch_num_threads: int | None = NotProvided,
    ) -> MBMAPPOConfig:
        """Model-based settings.

        Args:
            imagination: the imagination settings, whole
                (:class:`moedream.policies.imagination_config.ImaginationConfig`: enabled,
                horizon, imagined_ratio, updates, gate, ...; ``enabled=False`` = model-free
                MAPPO). Change one field with ``config.imagination.replace(horizon=5)``.
            imagination_provider: ``factory(config) -> provider`` with ``imagine`` and ``gate``
                (see moedream.policies.imagination.ImaginationProvider), built in setup().
            env_spec_json: the EnvSpec (``EnvSpec.to_json()``) of the env.
            shared_planner: one planner for all agents (agent-id embedding) or one per agent.
            shared_team_reward: every agent receives the team reward (team return = one
                agent's return).
            bootstrap_truncated_episodes: real episodes the env truncated (a time limit, e.g.
                Overcooked's horizon) reach PPO truncated, so GAE bootstraps from the critic's
                value of their last state; False: as RLlib leaves them, terminated
                (moedream.policies.episode_ends).
            logdir_root: where the algorithm's own logs go when it runs outside Tune (RLlib
                would use ~/ray_results); Tune trials use the trial directory.
            torch_num_threads: torch intra-op threads of the algorithm process (learner and
                local sampling); 1 avoids OpenMP spin-waiting, which slows the tiny matmuls of
                these modules down several times over on a shared 2-core machine. None =
                torch's default.
        """
        if imagination is not NotProvided:
            _check_imagination_type(imagination)
        for name, value in list(locals().items()):
            if name != "self" and value is not NotProvided:
                setattr(self, name, value)
        return self

    @override(PPOConfig)
    def update_from_dict(self, config_dict: dict) -> MBMAPPOConfig:
        """Also accept the imagination settings as a mapping of ImaginationConfig fields: a
        Tune sweep over ``imagination.<field>`` puts them in the param space as a dict (Tune
        resolves search spaces inside dicts only)."""
        imagination = config_dict.get("imagination")
        if isinstance(imagination, dict):
            config_dict = {
                **config_dict,
                "imagination": ImaginationConfig.from_dict(imagination, prefix="imagination."),
            }
        return super().update_from_dict(config_dict)

    @override(PPOConfig)
    def validate(self) -> None:
        super().validate()
        self.validate_model_based()

    def validate_model_based(self) -> None:
        """Model-based fields; errors name the field and the fix (ConfigError)."""
        _check_imagination_type(self.imagination)
        self.imagination.validate(prefix="imagination.")
        if self.env_spec_json is None:
            fail(
                "env_spec_json",
                None,
                "must be set: .model_based(env_spec_json=env_spec(name, **options).to_json())",
            )
        threads = self.torch_num_threads
        if threads is not None and not (is_int(threads) and threads >= 1):
            fail(
                "torch_num_threads",
                threads,
                "must be an integer >= 1 (torch intra-op threads of the algorithm process) or "
                "None (torch's default)",
            )
        if self.imagination.enabled and not callable(self.imagination_provider):
            fail(
                "imagination_provider",
                self.imagination_provider,
                "must be a factory(config) -> provider when imagination.enabled is true",
            )

    @property
    def env_spec(self) -> EnvSpec:
        return EnvSpec.from_json(self.env_spec_json)


def _check_imagination_type(value: Any) -> None:
    if not isinstance(value, ImaginationConfig):
        fail(
            "imagination",
            value,
            "must be an ImaginationConfig (moedream.policies.imagination_config), e.g. "
            ".model_based(imagination=ImaginationConfig(enabled=True, horizon=5))",
        )


class MBMAPPO(PPO):
    """Model-based multi-agent PPO (see the module docstring)."""

    @classmethod
    @override(PPO)
    def get_default_config(cls) -> MBMAPPOConfig:
        return MBMAPPOConfig()

    def _setup_logdir(self) -> None:
        """Outside Tune, log under ``config.logdir_root`` instead of ~/ray_results."""
        root = getattr(self.config, "logdir_root", None)
        if self._storage is not None:
            return super()._setup_logdir()
        if not root:
            raise ConfigError(
                "MBMAPPOConfig field `logdir_root` = None is invalid outside Tune: set "
                ".model_based(logdir_root=<storage path>) (RLlib would write to ~/ray_results)"
            )
        os.makedirs(root, exist_ok=True)
        self._logdir = tempfile.mkdtemp(prefix=f"{type(self).__name__}_", dir=root)

    @override(PPO)
    def setup(self, config) -> None:
        if getattr(config, "torch_num_threads", None):
            torch.set_num_threads(int(config.torch_num_threads))
        super().setup(config)
        self.provider = None
        self._imagination_module = None
        self._rng = np.random.default_rng(self.config.seed)
        self._gate_counts = {"approve": 0, "refine": 0, "reject": 0}
        if self.config.imagination.enabled:
            self.provider = self.config.imagination_provider(self.config)
            spec = self.config.get_multi_rl_module_spec(
                spaces=self.env_runner_group.get_spaces(), inference_only=True
            )
            self._imagination_module = spec.build()

    @override(PPO)
    def training_step(self) -> None:
        self._stage_seconds: dict[str, float] = {}
        start = time.perf_counter()
        with self._stage("sample"):
            episodes = self._sample_real()
        if not episodes:
            return
        im = self.config.imagination
        imagined, rounds = [], 0
        self._gate_counts = {"approve": 0, "refine": 0, "reject": 0}
        self._imagination_down: ProviderFailure | None = None  # no more rounds this iteration
        if im.enabled:
            self._prepare_imagination(episodes)
            if self.iteration >= im.start_iteration:
                rounds = im.updates
                imagined = self._imagine(episodes)
        # A local learner's connectors append a bootstrap step to the episodes IN PLACE, so the
        # later rounds branch from (and re-learn) an untouched copy of the real batch.
        with self._stage("copy"):
            pristine = copy.deepcopy(episodes) if rounds > 1 else episodes
        self._update(episodes + imagined, self.config.num_epochs)
        later_epochs = im.epochs_of_later_updates(self.config.num_epochs)
        for _ in range(1, rounds):  # more updates, each on fresh imagination under the new policy
            imagined = self._imagine(pristine)
            with self._stage("copy"):
                anchor = copy.deepcopy(pristine) if im.real_every_update else []
            if imagined:
                self._update(anchor + imagined, later_epochs)
        self.metrics.log_value((METRICS, "imagination_rounds"), rounds, window=1)
        with self._stage("sync"), self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            self.env_runner_group.sync_weights(
                from_worker_or_learner_group=self.learner_group, policies=None, inference_only=True
            )
        self._log_stage_seconds(time.perf_counter() - start)

    @contextlib.contextmanager
    def _stage(self, name: str):
        """Add the block's wall-clock seconds to this iteration's ``name`` stage."""
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self._stage_seconds[name] = self._stage_seconds.get(name, 0.0) + seconds

    def _log_stage_seconds(self, total: float) -> None:
        """Where this training_step's wall-clock went, one metric per stage (every stage is
        logged, 0 when it did not run, so runs with and without imagination compare alike)."""
        seconds = {name: self._stage_seconds.get(name, 0.0) for name in STAGES}
        seconds["other"] = max(0.0, total - sum(seconds.values()))
        for name, value in seconds.items():
            self.metrics.log_value((METRICS, f"time_{name}_s"), value, window=1)
        self.metrics.log_value((METRICS, "time_training_step_s"), total, window=1)

    def _update(self, episodes: list, num_epochs: int) -> None:
        """One PPO update (num_epochs x minibatches) on ``episodes``."""
        with self._stage("learn"), self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            learner_results = self.learner_group.update(
                episodes=episodes,
                timesteps={
                    NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                        (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME)
                    ),
                    NUM_MODULE_STEPS_TRAINED_LIFETIME: self.metrics.peek(
                        (LEARNER_RESULTS, ALL_MODULES, NUM_MODULE_STEPS_TRAINED_LIFETIME), default=0
                    ),
                },
                num_epochs=num_epochs,
                minibatch_size=self.config.minibatch_size,
                shuffle_batch_per_epoch=self.config.shuffle_batch_per_epoch,
            )
            self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)

    def _sample_real(self) -> list:
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            budget = {
                "max_agent_steps"
                if self.config.count_steps_by == "agent_steps"
                else "max_env_steps": self.config.total_train_batch_size
            }
            episodes, env_runner_results = synchronous_parallel_sample(
                worker_set=self.env_runner_group,
                sample_timeout_s=self.config.sample_timeout_s,
                _uses_new_env_runners=True,
                _return_metrics=True,
                **budget,
            )
            if not episodes:
                return []
            self.metrics.aggregate(env_runner_results, key=ENV_RUNNER_RESULTS)
        if self.config.bootstrap_truncated_episodes:
            for episode in episodes:  # before anyone reads them: the learner, the world model
                restore_truncation(episode)
        real_steps = sum(e.env_steps() for e in episodes)
        self._log_counts(real_env_steps=real_steps)
        return episodes

    def _prepare_imagination(self, episodes: list) -> None:
        """Once per iteration, before any imagination: the provider serves the model a
        background retrain made last iteration, scores its model on the NEW real episodes
        (held out: it has not seen them), stores them, and retrains on schedule."""
        if hasattr(self.provider, "swap_retrained"):
            with self._stage("wm_retrain"):
                self._provider_call(self.provider.swap_retrained)
        if hasattr(self.provider, "evaluate"):
            with self._stage("wm_evaluate"):
                self._provider_call(self.provider.evaluate, episodes)
        if hasattr(self.provider, "observe"):
            with self._stage("wm_observe"):
                self._provider_call(self.provider.observe, episodes)
        every = self.config.imagination.world_model_retrain_every
        if every and (self.iteration + 1) % every == 0:  # after `every` iterations of new data
            if hasattr(self.provider, "retrain"):
                with self._stage("wm_retrain"):
                    self._provider_call(self.provider.retrain, self.iteration)

    def _provider_call(self, method: Callable, *args: Any) -> Any:
        """``method(*args)``, or None after a ProviderFailure, which is logged with its cause and
        counted; a failed imagine/gate also ends the iteration's imagination."""
        try:
            return method(*args)
        except ProviderFailure as err:
            if err.stage in ("imagine", "gate"):
                self._imagination_down = err
            logger.warning(
                "iteration %d: provider %s failed (%s), going on without it: %s",
                self.iteration, err.stage, err.cause, err,
            )  # fmt: skip
            self.metrics.log_value(
                (METRICS, f"provider_failures_{err.stage}_total"), 1, reduce="lifetime_sum"
            )
            return None

    def _count_skipped_round(self, skipped: bool, dropped_rows: int = 0) -> None:
        """Every imagination round adds 0 or 1 here, so the totals exist from the first one
        (a skipped round also logs its 0 imagined steps: a sum never logged would read NaN)."""
        if skipped:
            self._log_counts(imagined_env_steps=0)
        self.metrics.log_value((METRICS, "imagination_skipped_total"), int(skipped),
                               reduce="lifetime_sum")  # fmt: skip
        self.metrics.log_value((METRICS, "imagined_rows_dropped_total"), dropped_rows,
                               reduce="lifetime_sum")  # fmt: skip

    def _imagine(self, episodes: list) -> list:
        """One imagination round: real episodes -> kept imagined episodes under the CURRENT
        planner (and the imagination metrics; counts are summed over the iteration's rounds)."""
        cfg, spec = self.config, self.config.env_spec
        if self._imagination_down is not None:  # imagine/gate failed earlier this iteration
            self._count_skipped_round(True)
            return []
        with self._stage("episodes"):
            self._refresh_imagination_module()
        real_steps = sum(e.env_steps() for e in episodes)
        im = cfg.imagination
        n = max(1, math.ceil(im.imagined_ratio * real_steps / im.horizon))
        start_obs = sample_start_obs(episodes, spec, n, self._rng)  # [n, N, D]
        policy = TeamPolicy(self._imagination_module, spec, cfg.shared_planner)
        with self._stage("imagine"):
            trajs = self._provider_call(self.provider.imagine, start_obs, policy)
        if trajs is None:
            self._count_skipped_round(True)
            return []
        with self._stage("gate"):
            scored = self._score_with_reflector(trajs, episodes, policy) if im.gate else trajs
            verdicts = (
                None
                if scored is None
                else self._provider_call(self.provider.gate, scored)
                if im.gate
                else np.ones(trajs.batch_size, dtype=bool)
            )
        if verdicts is None:  # imagined but never judged: dropped, and counted as such
            self._count_skipped_round(True, trajs.batch_size)
            return []
        trajs = scored
        self._count_skipped_round(False)
        decision = GateDecision.from_result(verdicts)
        if decision.trajectories is not None:  # the gate re-imagined its REFINE rows
            trajs = decision.trajectories
        kept = trajs.select(np.flatnonzero(decision.keep))
        if kept.batch_size:  # what the model predicts on the kept steps, before any pessimism
            valid = np.arange(kept.horizon) < kept.lengths()[:, None]  # [B, H]: not truncated
            self.metrics.log_value(
                (METRICS, "imagined_reward_per_step"),
                float(np.mean(kept.reward[..., 0][valid])),
                window=1,
            )
        kept = self._penalise_uncertainty(kept)
        with self._stage("episodes"):
            imagined = (
                build_imagined_episodes(
                    kept,
                    self._imagination_module,
                    spec,
                    shared_planner=cfg.shared_planner,
                    weights_seq_no=_weights_seq_no(episodes),
                    bootstrap_truncated=im.bootstrap_truncated,
                )
                if kept.batch_size
                else []
            )
        self._log_counts(imagined_env_steps=sum(e.env_steps() for e in imagined))
        counts = self._gate_counts  # reset by training_step every iteration
        for name, count in (
            ("approve", decision.approved),
            ("refine", decision.refined),
            ("reject", decision.rejected),
        ):
            counts[name] += count
            self.metrics.log_value((METRICS, f"gate_{name}_total"), count, reduce="lifetime_sum")
        total = max(1, counts["approve"] + counts["refine"] + counts["reject"])
        for name in ("approve", "refine", "reject"):  # over the iteration's rounds so far
            self.metrics.log_value((METRICS, f"gate_{name}_rate"), counts[name] / total, window=1)
        self.metrics.log_value(
            (METRICS, "real_reward_per_step"), _team_reward_per_step(episodes, spec), window=1
        )
        if hasattr(self.provider, "metrics"):  # e.g. world-model loss, refine tries
            for key, value in self.provider.metrics().items():
                self.metrics.log_value((METRICS, f"provider_{key}"), float(value), window=1)
        if hasattr(self.provider, "env_steps_taken"):
            self.metrics.log_value(
                (METRICS, "provider_env_steps_lifetime"),
                int(self.provider.env_steps_taken),
                window=1,
            )
        return imagined

    def _score_with_reflector(
        self, trajs: Trajectories, episodes: list, policy: TeamPolicy
    ) -> Trajectories | None:
        """The reflector's gate term (coherence/kernel.py, section 6b) with the current critic:
        the gate is calibrated on the real batch's TD residuals, and every imagined step gets
        its own (``td_residual``). None when the provider failed to calibrate."""
        if not hasattr(self.provider, "calibrate_value_term"):
            return trajs
        spec, gamma = self.config.env_spec, float(self.config.gamma)
        real = real_td_residuals(policy, episodes, spec, gamma)
        if real.size:
            self._provider_call(self.provider.calibrate_value_term, real)
            if self._imagination_down is not None:
                return None
        residual = td_residuals(policy, trajs.obs, trajs.reward, trajs.terminated, gamma)
        return dataclasses.replace(trajs, td_residual=residual.astype(np.float32))

    def _penalise_uncertainty(self, kept: Trajectories) -> Trajectories:
        kept, penalty = penalise_uncertainty(kept, self.config.imagination.uncertainty_penalty)
        if penalty:
            self.metrics.log_value((METRICS, "imagined_penalty_per_step"), penalty, window=1)
        return kept

    def _log_counts(self, **counts: int) -> None:
        for name, value in counts.items():
            self.metrics.log_value((METRICS, name), value, reduce="sum")
            self.metrics.log_value((METRICS, f"{name}_lifetime"), value, reduce="lifetime_sum")

    def _refresh_imagination_module(self) -> None:
        """Copy the learner's current module weights into the local inference copy."""
        state = self.learner_group.get_state(
            components=f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}", inference_only=True
        )
        self._imagination_module.set_state(state[COMPONENT_LEARNER][COMPONENT_RL_MODULE])

    @override(PPO)
    def stop(self) -> None:
        provider = getattr(self, "provider", None)  # None: setup did not get that far
        if provider is not None and hasattr(provider, "close"):
            provider.close()  # e.g. a background world-model fine-tune nobody will serve
        super().stop()

    @override(PPO)
    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict:
        state = super().get_state(components, not_components=not_components, **kwargs)
        if components is None and self.provider is not None and hasattr(self.provider, "get_state"):
            state[STATE_KEY] = self.provider.get_state()
        return state

    @override(PPO)
    def set_state(self, state: dict) -> None:
        super().set_state(state)
        if STATE_KEY in state and self.provider is not None and hasattr(self.provider, "set_state"):
            self.provider.set_state(state[STATE_KEY])


def _team_reward_per_step(episodes: list, spec: EnvSpec) -> float:
    """Mean per-step reward of the first agent (the team reward when it is shared)."""
    first = spec.agent_ids[0]
    rewards = [
        np.asarray(e.agent_episodes[first].get_rewards(), dtype=np.float64)
        for e in episodes
        if first in e.agent_episodes and len(e.agent_episodes[first])
    ]
    return float(np.concatenate(rewards).mean()) if rewards else float("nan")


def _weights_seq_no(episodes: list) -> int:
    """The weights version the real episodes were sampled with (imagined ones use the same)."""
    for episode in reversed(episodes):
        for sa in episode.agent_episodes.values():
            if len(sa) and WEIGHTS_SEQ_NO in sa.extra_model_outputs:
                return int(np.asarray(sa.get_extra_model_outputs(WEIGHTS_SEQ_NO, -1)))
    return 0
