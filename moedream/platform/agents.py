"""Agent training on RLlib: the typed config, the MBMAPPO config it builds, and the train loop.

>>> cfg = AgentsConfig.from_yaml("configs/agents_overcooked.yaml")
>>> result = train(cfg, storage_path="runs/agents", iterations=5)

Resources: the local cluster has 8 logical CPUs on 2 physical cores (tests/conftest.py), shared
with Train workers, Serve replicas and the gate. Env runners ask for ``num_cpus_per_env_runner``
(0.5 by default): two runners step the envs in parallel with the learner (the driver process)
without reserving CPUs that would starve the other actors; more runners than cores would only
add contention.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moedream.config import (
    ConfigBase,
    ConfigError,
    check,
    check_choice,
    check_positive,
    check_positive_ints,
    is_int,
)
from moedream.envs import env_names, env_spec
from moedream.policies.episode_ends import BOOTSTRAP_TRUNCATED_EPISODES
from moedream.policies.imagination_config import PROVIDERS, ImaginationConfig


@dataclasses.dataclass
class TeamConfig(ConfigBase):
    """Sizes of perceiver, planner and reflector."""

    embedding_dim: int = 128
    """Perceiver output size (E)."""
    perceiver_hidden: list[int] = dataclasses.field(default_factory=lambda: [128])
    planner_hidden: list[int] = dataclasses.field(default_factory=lambda: [128])
    reflector_hidden: list[int] = dataclasses.field(default_factory=lambda: [128])
    agent_embedding_dim: int = 8
    """Size of the agent-id embedding of the shared planner and the reflector."""
    shared_planner: bool = True
    """One planner for all agents (with agent-id embedding) or one planner per agent."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, prefix: str = "") -> TeamConfig:
        if isinstance(data, dict) and "mode" in data:
            # Teams act with their planner's policy everywhere (training, evaluation, reports):
            # no entry point plans at decision time, so an `mpc` setting would do nothing.
            raise ConfigError(
                f"config field `{prefix}mode` = {data['mode']!r} was removed: teams always "
                "act with their planner's policy (decision-time planning, "
                "moedream.policies.mpc.MPCPlanner, is not wired into evaluation or serving); "
                "delete the field"
            )
        return super().from_dict(data, prefix=prefix)

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        for name in ("embedding_dim", "agent_embedding_dim"):
            check(
                is_int(getattr(self, name)) and getattr(self, name) >= 0,
                f"{prefix}{name}",
                getattr(self, name),
                "must be an integer >= 0",
            )
        check(self.embedding_dim > 0, f"{prefix}embedding_dim", self.embedding_dim, "must be > 0")
        for name in ("perceiver_hidden", "planner_hidden", "reflector_hidden"):
            sizes = getattr(self, name)
            check(
                all(is_int(s) and s > 0 for s in sizes),
                f"{prefix}{name}",
                sizes,
                "must be a list of positive layer sizes, e.g. [128, 128]",
            )


@dataclasses.dataclass
class AgentsConfig(ConfigBase):
    """Everything `moedream train-agents` needs (configs/agents_*.yaml)."""

    env: str = "overcooked"
    """Env name: overcooked or mamujoco."""
    env_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Options of the env, e.g. {layout: cramped_room, shaped_reward_weight: 1.0}."""
    seed: int = 0
    num_env_runners: int = 2
    num_cpus_per_env_runner: float = 0.5
    """Fractional CPUs per env runner (8 logical CPUs on 2 cores: see the module docstring)."""
    num_envs_per_env_runner: int = 1
    train_batch_size: int = 8000
    """Real env steps per iteration."""
    minibatch_size: int = 1000
    num_epochs: int = 6
    lr: float = 5e-4
    gamma: float = 0.99
    lambda_: float = 0.95
    entropy_coeff: float = 0.01
    clip_param: float = 0.2
    kl_coeff: float = 0.2
    """Initial weight of PPO's adaptive KL penalty (RLlib's default; 0 = no KL penalty, the
    clipped ratio alone bounds each update, as in CleanRL and MAPPO). RLlib multiplies it by
    1.5 after every update whose KL exceeds 2 x kl_target and halves it below 0.5 x: with K
    imagination updates per iteration it compounds K times per iteration."""
    kl_target: float = 0.01
    vf_loss_coeff: float = 0.5
    grad_clip: float = 0.5
    """Global L2 norm the team's gradients are clipped to before each Adam step (one norm over
    perceiver, planners and reflector: they share one optimizer); 0 = no clipping. The largest
    norm before clipping in each iteration is logged as losses/grad_global_norm."""
    torch_num_threads: int = 1
    """torch threads of the learner process (1: no OpenMP spin-waiting on shared cores)."""
    shared_team_reward: bool = True
    """Every agent receives the team reward (true for Overcooked and MaMuJoCo)."""
    bootstrap_truncated_episodes: bool = BOOTSTRAP_TRUNCATED_EPISODES
    """Real episodes the env truncated (Overcooked's horizon, MuJoCo's max_episode_steps) reach
    PPO truncated, so GAE bootstraps from the critic's value of their last state; false: as
    RLlib leaves them, terminated (no bootstrap; moedream.policies.episode_ends)."""
    obs_norm: bool = False
    """Standardise observations inside the perceiver with a running mean/std updated on the
    learner from real observations (on for MaMuJoCo, whose velocities and angles differ in
    scale); real and imagined observations go through the same normaliser."""
    obs_norm_clip: float = 10.0
    """Normalised observations are clipped to [-obs_norm_clip, obs_norm_clip]."""
    iterations: int = 10
    """Training iterations (ignored when env_steps > 0)."""
    env_steps: int = 0
    """Real env step budget (0 = use iterations)."""
    team: TeamConfig = dataclasses.field(default_factory=TeamConfig)
    imagination: ImaginationConfig = dataclasses.field(default_factory=ImaginationConfig)
    """The imagination settings (moedream.policies.imagination_config), handed whole to
    MBMAPPOConfig."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check_choice(f"{prefix}env", self.env, [n for n in env_names() if n != "memory"])
        check(
            self.num_env_runners >= 0,
            f"{prefix}num_env_runners",
            self.num_env_runners,
            "must be >= 0",
        )
        check_positive(f"{prefix}num_cpus_per_env_runner", self.num_cpus_per_env_runner)
        check_positive_ints(
            self,
            prefix,
            (
                "num_envs_per_env_runner",
                "train_batch_size",
                "minibatch_size",
                "num_epochs",
                "iterations",
            ),
        )
        check(
            self.minibatch_size <= self.train_batch_size,
            f"{prefix}minibatch_size",
            self.minibatch_size,
            f"must be <= train_batch_size ({self.train_batch_size})",
        )
        for name in ("lr", "clip_param", "vf_loss_coeff"):
            check_positive(f"{prefix}{name}", getattr(self, name))
        check_positive(f"{prefix}grad_clip", self.grad_clip, allow_zero=True)
        check_positive(f"{prefix}entropy_coeff", self.entropy_coeff, allow_zero=True)
        check_positive(f"{prefix}kl_coeff", self.kl_coeff, allow_zero=True)
        check_positive(f"{prefix}kl_target", self.kl_target)
        for name in ("gamma", "lambda_"):
            check(
                0.0 <= getattr(self, name) <= 1.0,
                f"{prefix}{name}",
                getattr(self, name),
                "must be in [0, 1]",
            )
        check(
            isinstance(self.obs_norm, bool),
            f"{prefix}obs_norm",
            self.obs_norm,
            "must be true or false",
        )
        check_positive(f"{prefix}obs_norm_clip", self.obs_norm_clip)
        check(
            self.env_steps >= 0,
            f"{prefix}env_steps",
            self.env_steps,
            "must be >= 0 (0 = use iterations)",
        )


ENV_REPLAY_LABEL = (
    "imagination provider env_replay is a TEST STAND-IN: its 'imagined' steps are real env "
    "steps of env copies, not a world model's (provider: world_model is the model-based path)"
)


def imagination_label(imagination: ImaginationConfig) -> str:
    """How logs and summaries name a run's imagination: model-free, model-based, or the test
    stand-in (never reported as imagination)."""
    if not imagination.enabled:
        return "model-free"
    if imagination.provider == "env_replay":
        return "env_replay (test stand-in)"
    return "model-based"


def provider_factory(cfg: AgentsConfig):
    """The imagination provider factory named by ``cfg.imagination.provider``."""
    from moedream.policies.imagination import EnvReplayImaginerFactory

    if cfg.imagination.provider == "env_replay":
        print(f"moedream: {ENV_REPLAY_LABEL}", flush=True)
        return EnvReplayImaginerFactory(cfg.env, dict(cfg.env_options))
    if cfg.imagination.provider == "world_model":
        from moedream.platform.model_based import ServedWorldModelImaginerFactory

        options = {"app_name": cfg.imagination.serve_app_name, **cfg.imagination.world_model}
        factory = ServedWorldModelImaginerFactory.from_dict(
            {"env_name": cfg.env, **options}, prefix="imagination.world_model."
        )
        factory.check_retrain(cfg.imagination.world_model_retrain_every)  # fail before Ray work
        return factory
    raise ConfigError(
        f"config field `imagination.provider` = {cfg.imagination.provider!r} is invalid: "
        f"must be one of {list(PROVIDERS)}"
    )


def build_algo_config(cfg: AgentsConfig, *, logdir_root: str | None = None):
    """AgentsConfig -> MBMAPPOConfig (new API stack, team MultiRLModule, MAPPO connectors)."""
    from moedream.envs import register_rllib_envs
    from moedream.policies.algorithm import MBMAPPOConfig, TeamMetricsCallback, TeamPPOTorchLearner
    from moedream.policies.connectors import env_to_module_pieces, learner_pieces
    from moedream.policies.names import map_agent_to_planner
    from moedream.policies.rl_modules import team_module_spec

    register_rllib_envs()
    spec = env_spec(cfg.env, **cfg.env_options)
    if cfg.team.shared_planner and len(set(spec.obs_dims)) > 1:
        raise ConfigError(
            f"config field `team.shared_planner` = True is invalid: agents of {cfg.env} have "
            f"different observation sizes {spec.obs_dims}; set team.shared_planner: false"
        )
    agent_ids = list(spec.agent_ids)
    t = cfg.team
    config = (
        MBMAPPOConfig()
        .environment(f"moedream/{cfg.env}", env_config=dict(cfg.env_options))
        .env_runners(
            num_env_runners=cfg.num_env_runners,
            num_cpus_per_env_runner=cfg.num_cpus_per_env_runner,
            num_envs_per_env_runner=cfg.num_envs_per_env_runner,
            sample_timeout_s=SAMPLE_TIMEOUT_S,
            env_to_module_connector=functools.partial(env_to_module_pieces, agent_ids=agent_ids),
        )
        .learners(
            num_learners=0,
            learner_class=TeamPPOTorchLearner,
            learner_connector=functools.partial(
                learner_pieces, agent_ids=agent_ids, obs_dim=spec.obs_dim, obs_norm=cfg.obs_norm
            ),
        )
        .training(
            train_batch_size_per_learner=cfg.train_batch_size,
            minibatch_size=cfg.minibatch_size,
            num_epochs=cfg.num_epochs,
            lr=cfg.lr,
            gamma=cfg.gamma,
            lambda_=cfg.lambda_,
            entropy_coeff=cfg.entropy_coeff,
            clip_param=cfg.clip_param,
            use_kl_loss=cfg.kl_coeff > 0,
            kl_coeff=cfg.kl_coeff,
            kl_target=cfg.kl_target,
            vf_loss_coeff=cfg.vf_loss_coeff,
            grad_clip=cfg.grad_clip or None,  # None: RLlib's 'no clipping'
            vf_clip_param=float("inf"),
        )
        .multi_agent(
            policies=set(map_agent_to_planner(a, shared=t.shared_planner) for a in agent_ids),
            policy_mapping_fn=functools.partial(map_agent_to_planner, shared=t.shared_planner),
            policies_to_train=None,
        )
        .rl_module(
            rl_module_spec=team_module_spec(
                spec,
                embedding_dim=t.embedding_dim,
                perceiver_hidden=t.perceiver_hidden,
                planner_hidden=t.planner_hidden,
                reflector_hidden=t.reflector_hidden,
                agent_embedding_dim=t.agent_embedding_dim,
                shared_planner=t.shared_planner,
                obs_norm=cfg.obs_norm,
                obs_norm_clip=cfg.obs_norm_clip,
            )
        )
        .callbacks(TeamMetricsCallback)
        .debugging(seed=cfg.seed, log_level="ERROR")
        .model_based(
            imagination=copy.deepcopy(cfg.imagination),  # the algorithm config owns its copy
            imagination_provider=provider_factory(cfg) if cfg.imagination.enabled else None,
            env_spec_json=spec.to_json(),
            shared_planner=t.shared_planner,
            shared_team_reward=cfg.shared_team_reward,
            bootstrap_truncated_episodes=cfg.bootstrap_truncated_episodes,
            logdir_root=logdir_root,
            torch_num_threads=cfg.torch_num_threads,
        )
    )
    config.validate_model_based()
    return config


SAMPLE_TIMEOUT_S = 600.0
"""How long an iteration waits for the env runners' samples (RLlib's default, 60 s, passed with
nothing sampled on a 2-core machine under load, and the runners' work was thrown away)."""
MAX_EMPTY_ITERATIONS = 5
"""train() fails after this many iterations in a row that sampled no real step."""


@dataclasses.dataclass
class TrainResult:
    history: list[dict[str, float]]
    """One dict of metrics per iteration (see moedream.policies.metrics.iteration_metrics)."""
    run_dir: str
    checkpoint: str | None


def train(
    cfg: AgentsConfig,
    storage_path: str | Path,
    *,
    iterations: int | None = None,
    env_steps: int | None = None,
    run_name: str | None = None,
    progress: bool = True,
    checkpoint: bool = True,
    on_iteration: Callable[[Any, list[dict[str, float]]], None] | None = None,
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Train a team; TensorBoard scalars and the final checkpoint go under storage_path/run_name.

    Stops after ``iterations`` (default cfg.iterations) or, if ``env_steps`` (default
    cfg.env_steps) > 0, once that many real env steps were sampled. ``on_iteration(algo,
    history)``, if given, is called before the first iteration (empty history) and after each
    one, e.g. to evaluate the team on separate episodes.

    ``resume_from``: an ``algo.save_to_path`` folder of this run to continue from (team, optimizer,
    RLlib's lifetime counters, so the real-step budget counts the steps before it; the
    imagination provider's state). Then ``on_iteration`` is not called before the first
    iteration, ``history`` holds only the iterations after the restore, and TensorBoard hides
    the events an interrupted try logged past the restored real step.
    """
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    from moedream.policies.metrics import iteration_metrics

    if storage_path is None:
        raise ConfigError("train(): storage_path is required (RLlib would write to ~/ray_results)")
    run_dir = Path(storage_path) / (
        run_name
        or f"{cfg.env}_{'mb' if cfg.imagination.enabled else 'mf'}_{time.strftime('%Y%m%d-%H%M%S')}"
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    iterations = cfg.iterations if iterations is None else iterations
    env_steps = cfg.env_steps if env_steps is None else env_steps
    algo = build_algo_config(cfg, logdir_root=str(run_dir / "rllib")).build_algo()
    restored_steps, restored_iterations = _restore(algo, resume_from)
    # purge_step: events of an interrupted try past the restored step are hidden
    writer = SummaryWriter(
        str(run_dir / "tensorboard"), purge_step=restored_steps + 1 if resume_from else None
    )
    history: list[dict[str, float]] = []
    bar = tqdm(
        total=env_steps or iterations,
        initial=restored_steps if env_steps else restored_iterations,
        disable=not progress,
        unit="steps" if env_steps else "it",
        desc=f"train-agents {cfg.env}",
    )
    try:
        if on_iteration is not None and resume_from is None:
            on_iteration(algo, history)
        start, empty = time.perf_counter(), 0
        while True:
            before = time.perf_counter()
            metrics = iteration_metrics(algo.train())
            if metrics["charts/real_env_steps"] != metrics["charts/real_env_steps"]:
                # NaN: RLlib's sample_timeout_s passed before any episode came back (a loaded
                # machine), so nothing was learnt; the next iteration samples again.
                empty += 1
                if empty > MAX_EMPTY_ITERATIONS:
                    raise RuntimeError(
                        f"train-agents: {empty} iterations in a row sampled no real step "
                        "(RLlib's sample_timeout_s passed each time); are the env runners alive?"
                    )
                print("train-agents: an iteration sampled no real step; sampling again")
                continue
            empty = 0
            metrics["time/iteration_s"] = time.perf_counter() - before  # with RLlib's bookkeeping
            metrics["charts/wall_time_s"] = time.perf_counter() - start
            metrics["iteration"] = float(restored_iterations + len(history) + 1)
            history.append(metrics)
            _write_scalars(writer, metrics)
            real = metrics["charts/real_env_steps"]
            bar.update(metrics["charts/real_env_steps_iter"] if env_steps else 1)
            bar.set_postfix(team_return=f"{metrics['charts/team_return']:.1f}", real=int(real))
            if on_iteration is not None:
                on_iteration(algo, history)
            done = restored_iterations + len(history)
            if (env_steps and real >= env_steps) or (not env_steps and done >= iterations):
                break
        ckpt = str(algo.save_to_path(str(run_dir / "checkpoint"))) if checkpoint else None
    finally:
        bar.close()
        writer.close()
        algo.stop()
    return TrainResult(history=history, run_dir=str(run_dir), checkpoint=ckpt)


def _restore(algo, resume_from: str | Path | None) -> tuple[int, int]:
    """Restore ``algo`` from ``resume_from`` (if given); (real env steps, iterations) it had
    (RLlib's iteration count, which includes iterations that sampled nothing)."""
    if resume_from is None:
        return 0, 0
    from moedream.policies.algorithm import METRICS

    if not Path(resume_from).is_dir():
        raise FileNotFoundError(f"train(): resume_from = {str(resume_from)!r} is not a folder")
    algo.restore_from_path(str(resume_from))
    steps = algo.metrics.peek((METRICS, "real_env_steps_lifetime"), default=0)
    return int(steps), int(algo.iteration)


def _write_scalars(writer, metrics: dict[str, float]) -> None:
    step = int(metrics["charts/real_env_steps"])
    for key, value in metrics.items():
        if key != "iteration" and value == value:  # skip NaN
            writer.add_scalar(key, value, step)
    writer.flush()


def load_team_module(checkpoint: str | Path):
    """The trained team MultiRLModule (perceiver, reflector, planners) of an algorithm checkpoint."""
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP, COMPONENT_RL_MODULE
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModule

    path = Path(checkpoint) / COMPONENT_LEARNER_GROUP / COMPONENT_LEARNER / COMPONENT_RL_MODULE
    if not path.is_dir():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: pass the folder train() returned as `checkpoint`"
        )
    return MultiRLModule.from_checkpoint(str(path))
