"""`moedream sweep`: a Ray Tune sweep over the agent-training (MBMAPPO) config.

The YAML names a base agents config (``agents``, e.g. the model-free baseline) or a pipeline
config (``pipeline``: model-based), a search space over MBMAPPOConfig fields (and
``imagination.<field>`` for the imagination settings, the gate's thresholds among them through
the shared gate actor's config) and the scheduler (ASHA by default, on iterations or on real env
steps). A model-based sweep first runs (or resumes) the pipeline's stages collect, world_model,
serve and gate in the pipeline's run folder: every trial then imagines through that one served
world model and is judged by that one gate actor. Results go to ``storage_path/name``; every trial checkpoints
every ``checkpoint_every`` iterations. An interrupted sweep (Ctrl+C, a killed driver) is
continued with ``--resume``: finished trials are kept as they are, unfinished and errored ones
continue from their latest checkpoint (``Tuner.restore``). The end prints a table of the best
trials with their Tune status; an interrupted run says how to resume and exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

from moedream.config import ConfigBase, ConfigError, check, check_choice, load_yaml, merged
from moedream.policies.imagination_config import ImaginationConfig

HELP = "run a Ray Tune sweep over the agent-training config"
SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")
IMAGINATION_PREFIX = "imagination."
REAL_STEPS_METRIC = "moedream/real_env_steps_lifetime"
# Settings that cannot differ between trials sharing one served model and one gate actor.
SHARED_SERVICE_KEYS = ("imagination.world_model_retrain_every", "imagination.serve_app_name",
                       "imagination.world_model", "imagination.provider")  # fmt: skip


@dataclasses.dataclass
class SweepConfig(ConfigBase):
    """configs/sweeps/*.yaml."""

    name: str = "sweep"
    """Experiment folder name under storage_path."""
    storage_path: str = "runs/sweeps"
    """Where Tune writes trials and checkpoints (never ~/ray_results)."""
    agents: str = ""
    """The base agents config (YAML path), e.g. configs/agents_overcooked.yaml (set this or
    `pipeline`)."""
    pipeline: str = ""
    """A pipeline YAML (e.g. configs/quickstart.yaml), for a model-based sweep: its stages
    collect, world_model, serve and gate run once before the trials (skipped when finished in
    its run folder), and its agents section is every trial's base config, so all trials share
    the one served world model and gate actor (set this or `agents`)."""
    agents_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Fields of the agents config replaced for every trial (e.g. a smaller batch)."""
    search_space: dict[str, Any] = dataclasses.field(default_factory=dict)
    """MBMAPPOConfig field (or imagination.<field>) -> {type: choice|grid|uniform|loguniform|
    randint, ...}."""
    num_samples: int = 4
    metric: str = "env_runners/moedream_team_return"
    mode: Literal["max", "min"] = "max"
    budget: Literal["iterations", "real_env_steps"] = "iterations"
    """What a trial's budget (the stop condition and ASHA's max_t / grace_period) counts."""
    max_iterations: int = 20
    """Training iterations per trial (budget: iterations)."""
    max_real_env_steps: int = 0
    """Real env steps per trial (budget: real_env_steps; a trial stops after the iteration that
    reaches it). A model-based sweep's summary adds the shared world model's collected steps."""
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 2
    """ASHA: no trial is stopped before this much budget (iterations or real env steps)."""
    reduction_factor: int = 2
    max_concurrent_trials: int = 2
    checkpoint_every: int = 5
    """Checkpoint each trial every this many iterations (where --resume continues it from;
    0 = only at the end, so an interrupted trial restarts from scratch)."""
    top_k: int = 5
    """Rows of the summary table."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check(bool(self.name), f"{prefix}name", self.name, "must be a non-empty folder name")
        check(bool(self.storage_path), f"{prefix}storage_path", self.storage_path, "must be a path")
        check_choice(f"{prefix}scheduler", self.scheduler, ("asha", "fifo"))
        check_choice(f"{prefix}mode", self.mode, ("max", "min"))
        check_choice(f"{prefix}budget", self.budget, ("iterations", "real_env_steps"))
        check(
            bool(self.agents) != bool(self.pipeline),
            f"{prefix}agents",
            self.agents,
            "set exactly one of `agents` (an agents YAML) and `pipeline` (a pipeline YAML, for "
            f"a model-based sweep); pipeline = {self.pipeline!r}",
        )
        check(
            self.budget == "iterations" or self.max_real_env_steps > 0,
            f"{prefix}max_real_env_steps",
            self.max_real_env_steps,
            "must be > 0 with budget: real_env_steps",
        )
        for name in (
            "num_samples",
            "max_iterations",
            "grace_period",
            "max_concurrent_trials",
            "top_k",
        ):
            check(
                getattr(self, name) > 0,
                f"{prefix}{name}",
                getattr(self, name),
                "must be an integer > 0",
            )
        check(
            isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0,
            f"{prefix}checkpoint_every",
            self.checkpoint_every,
            "must be an integer >= 0 (0 = checkpoint only at the end)",
        )
        check(
            self.reduction_factor >= 2,
            f"{prefix}reduction_factor",
            self.reduction_factor,
            "must be >= 2",
        )
        for key, spec in self.search_space.items():
            field = f"{prefix}search_space.{key}"
            check(
                isinstance(spec, dict) and spec.get("type") in SAMPLERS,
                field,
                spec,
                f"must be a mapping with `type` in {list(SAMPLERS)}",
            )
            needs = ("values",) if spec["type"] in ("choice", "grid") else ("low", "high")
            missing = [n for n in needs if n not in spec]
            check(not missing, field, spec, f"a {spec['type']} needs keys {list(needs)}")


def sampler(key: str, spec: dict[str, Any]) -> Any:
    """A search-space entry of the YAML -> the Tune sampler."""
    from ray import tune

    kind = spec["type"]
    if kind == "choice":
        return tune.choice(list(spec["values"]))
    if kind == "grid":
        return tune.grid_search(list(spec["values"]))
    if kind == "uniform":
        return tune.uniform(float(spec["low"]), float(spec["high"]))
    if kind == "loguniform":
        return tune.loguniform(float(spec["low"]), float(spec["high"]))
    return tune.randint(int(spec["low"]), int(spec["high"]))


def param_space(cfg: SweepConfig, storage_path: str) -> dict[str, Any]:
    """The base algorithm config as a dict, with the YAML's search space substituted.

    A key ``imagination.<field>`` searches a field of the imagination settings: they go into
    the param space as a dict (Tune resolves samplers inside dicts only), which
    MBMAPPOConfig.update_from_dict turns back into an ImaginationConfig in each trial.
    """
    from moedream.platform.agents import build_algo_config

    algo_config = build_algo_config(base_agents_config(cfg), logdir_root=storage_path)
    space = algo_config.to_dict()
    for key, spec in cfg.search_space.items():
        section, name = _space_slot(space, key)
        section[name] = sampler(key, spec)
    return space


def pipeline_config(cfg: SweepConfig):
    """The model-based sweep's pipeline config (QuickstartConfig), or None."""
    from moedream.platform.quickstart import QuickstartConfig

    return QuickstartConfig.from_yaml(cfg.pipeline) if cfg.pipeline else None


def base_agents_config(cfg: SweepConfig):
    """Every trial's AgentsConfig before the search space: the agents YAML, or the pipeline's
    agents section (wired to its gate actor), with ``agents_overrides`` merged in."""
    from moedream.platform.agents import AgentsConfig

    pipeline = pipeline_config(cfg)
    base = pipeline.agents_config().to_dict() if pipeline else load_yaml(cfg.agents)
    agents = AgentsConfig.from_dict(merged(base, cfg.agents_overrides))
    if pipeline:
        _check_shared_services(cfg, agents)
    return agents


def _check_shared_services(cfg: SweepConfig, agents) -> None:
    """Trials of a model-based sweep share one served model and one gate actor: none may
    retrain (hot-swap) the model under the others, and none may search what is shared."""
    imagination = agents.imagination
    check(
        imagination.enabled and imagination.provider == "world_model",
        "agents_overrides.imagination",
        {"enabled": imagination.enabled, "provider": imagination.provider},
        "a `pipeline` sweep is model-based: imagination.enabled true, provider world_model",
    )
    check(
        imagination.world_model_retrain_every == 0,
        "agents_overrides.imagination.world_model_retrain_every",
        imagination.world_model_retrain_every,
        "must be 0 in a `pipeline` sweep: the trials share one served world model, and a "
        "trial's retrain would hot-swap it under the others",
    )
    for key in cfg.search_space:
        shared = key.startswith("gate") or any(key.startswith(k) for k in SHARED_SERVICE_KEYS)
        check(
            not shared,
            f"search_space.{key}",
            cfg.search_space[key],
            "cannot differ between trials of a `pipeline` sweep: they share one served world "
            "model and one gate actor (set it in the pipeline YAML; imagination.gate, "
            "horizon, updates, imagined_ratio, uncertainty_penalty can be searched)",
        )


def _space_slot(space: dict[str, Any], key: str) -> tuple[dict[str, Any], str]:
    """(the dict, its key) where the search-space entry ``key`` goes in the param space."""
    if key.startswith(IMAGINATION_PREFIX):
        if isinstance(space["imagination"], ImaginationConfig):
            space["imagination"] = space["imagination"].to_dict()
        section, name = space["imagination"], key[len(IMAGINATION_PREFIX) :]
    else:
        section, name = space, _dict_key(key)
    if name not in section:
        raise ConfigError(
            f"config field `search_space.{key}` is invalid: not a field of MBMAPPOConfig; e.g. "
            "lr, entropy_coeff, num_epochs, minibatch_size, clip_param, gamma, lambda_, or "
            f"{IMAGINATION_PREFIX}<field> with a field of ImaginationConfig "
            f"({', '.join(f.name for f in dataclasses.fields(ImaginationConfig))})"
        )
    return section, name


def _dict_key(key: str) -> str:
    """RLlib's config dicts spell the field ``lambda_`` as ``lambda``."""
    return "lambda" if key == "lambda_" else key


def searched_value(config: dict[str, Any] | None, key: str) -> Any:
    """The value of search-space entry ``key`` in a trial's config (None if absent)."""
    if not config:
        return None
    if key.startswith(IMAGINATION_PREFIX):
        imagination, name = config.get("imagination"), key[len(IMAGINATION_PREFIX) :]
        if isinstance(imagination, dict):
            return imagination.get(name)
        return getattr(imagination, name, None)
    return config.get(_dict_key(key))


def experiment_dir(cfg: SweepConfig) -> Path:
    """Where Tune keeps the sweep: storage_path/name (absolute)."""
    return Path(cfg.storage_path).resolve() / cfg.name


def check_experiment_dir(cfg: SweepConfig, *, resume: bool) -> None:
    """--resume needs a sweep in storage_path/name; a new sweep must not mix into one."""
    from ray import tune

    exp_dir = experiment_dir(cfg)
    restorable = tune.Tuner.can_restore(str(exp_dir))
    if resume and not restorable:
        raise ConfigError(
            f"--resume: no sweep to resume in {str(exp_dir)!r} (no Tune experiment state "
            "there); check storage_path and name, or run without --resume to start it"
        )
    if not resume and restorable:
        raise ConfigError(
            f"a sweep already exists in {str(exp_dir)!r}: pass --resume to continue it, or "
            "choose another `name` / --storage-path to start a new one"
        )


def build_tuner(cfg: SweepConfig, *, resume: bool = False):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from moedream.envs import register_rllib_envs
    from moedream.policies.algorithm import MBMAPPO

    storage = str(Path(cfg.storage_path).resolve())
    exp_dir = experiment_dir(cfg)
    if resume:
        check_experiment_dir(cfg, resume=True)
        # Tune's env registry lives per driver: a new sweep registers the envs while building
        # its param space; a resumed one must do it here or the trials fail to build their env
        register_rllib_envs()
        # finished trials stay as they are; unfinished and errored ones continue from their
        # latest checkpoint (restart_errored=False: not from scratch)
        return tune.Tuner.restore(
            str(exp_dir),
            trainable=MBMAPPO,
            resume_unfinished=True,
            resume_errored=True,
            restart_errored=False,
        )
    time_attr, max_t = budget(cfg)
    scheduler = (
        FIFOScheduler()
        if cfg.scheduler == "fifo"
        else ASHAScheduler(
            time_attr=time_attr,
            max_t=max_t,
            grace_period=min(cfg.grace_period, max_t),
            reduction_factor=cfg.reduction_factor,
        )
    )
    return tune.Tuner(
        MBMAPPO,
        param_space=param_space(cfg, storage),
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode=cfg.mode,
            scheduler=scheduler,
            num_samples=cfg.num_samples,
            max_concurrent_trials=cfg.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=storage,
            stop={time_attr: max_t},
            verbose=1,
            checkpoint_config=tune.CheckpointConfig(
                checkpoint_frequency=cfg.checkpoint_every,
                checkpoint_at_end=True,
                num_to_keep=1,
            ),
        ),
    )


def prepare_shared_world_model(cfg: SweepConfig) -> int:
    """A model-based sweep's one world model, its Serve app and its gate actor, before any
    trial (the pipeline's stages collect..gate, resumed from its run folder); returns the real
    env steps its data cost (0 for a sweep of an agents config)."""
    pipeline = pipeline_config(cfg)
    if pipeline is None:
        return 0
    from moedream.platform.quickstart import prepare_imagination

    print(f"sweep {cfg.name}: one served world model for every trial, from {cfg.pipeline}")
    return int(prepare_imagination(pipeline)["collect_env_steps"])


def budget(cfg: SweepConfig) -> tuple[str, int]:
    """(the result key a trial's budget counts, the budget): Tune's stop condition and ASHA's
    time attribute (Tune flattens results, so a nested metric is named by its path)."""
    if cfg.budget == "real_env_steps":
        return REAL_STEPS_METRIC, cfg.max_real_env_steps
    return "training_iteration", cfg.max_iterations


def trial_statuses(cfg: SweepConfig) -> dict[str, str]:
    """trial id -> Tune status (TERMINATED, ERROR, PENDING, ...) from the saved experiment."""
    from ray import tune

    analysis = tune.ExperimentAnalysis(str(experiment_dir(cfg)))
    return {trial.trial_id: trial.status for trial in analysis.trials}


def summary_rows(
    results, cfg: SweepConfig, statuses: dict[str, str] | None = None, shared_real_steps: int = 0
) -> tuple[list[str], list[list[Any]]]:
    """The best ``top_k`` trials: id, status, imagination (model-free, model-based or the
    env_replay stand-in), searched values, metric, iterations, real env steps.

    status: the Tune status from ``statuses`` (trial id -> status) when given, else OK, ERROR
    or NO RESULT (a trial that never reported). ``shared_real_steps``: real env steps spent
    once for every model-based trial (the shared world model's collection), added to theirs.
    """
    keys = [_dict_key(k) for k in cfg.search_space]
    rows = []
    for result in results:
        metrics = result.metrics or {}
        value = _nested(metrics, cfg.metric)
        trial_id = metrics.get("trial_id", "?")
        fallback = "ERROR" if result.error else ("OK" if metrics else "NO RESULT")
        label = trial_imagination(result.config)
        real = _nested(metrics, REAL_STEPS_METRIC)
        rows.append(
            [
                trial_id,
                (statuses or {}).get(trial_id, fallback),
                label,
                *[searched_value(result.config, k) for k in cfg.search_space],
                value,
                metrics.get("training_iteration", 0),
                real + (shared_real_steps if label == "model-based" else 0),
            ]
        )
    sign = -1 if cfg.mode == "max" else 1
    rows.sort(key=lambda r: math.inf if _nan(r[-3]) else sign * r[-3])
    steps = "real env steps" + (" (+ world model's)" if shared_real_steps else "")
    headers = ["trial", "status", "imagination", *keys, cfg.metric, "iterations", steps]
    return headers, rows[: cfg.top_k]


def trial_imagination(config: dict[str, Any] | None) -> str:
    """model-free, model-based or 'env_replay (test stand-in)' for a trial's config."""
    from moedream.platform.agents import imagination_label

    imagination = (config or {}).get("imagination")
    if isinstance(imagination, dict):
        imagination = ImaginationConfig.from_dict(imagination)
    return imagination_label(imagination) if imagination is not None else "?"


def _nested(metrics: dict[str, Any], path: str) -> float:
    value: Any = metrics
    for part in path.split("/"):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        value = metrics.get(path)
    return float(value) if isinstance(value, (int, float)) else math.nan


def _nan(v: Any) -> bool:
    return not isinstance(v, (int, float)) or v != v


def print_summary(headers: list[str], rows: list[list[Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in headers:
        table.add_column(str(h))
    for row in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    Console(width=160).print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="sweep YAML, e.g. configs/sweeps/overcooked_ppo.yaml"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the sweep in storage_path/name"
    )
    parser.add_argument("--storage-path", help="override storage_path of the YAML")
    parser.add_argument("--num-samples", type=int, help="override num_samples")
    parser.add_argument("--max-iterations", type=int, help="override max_iterations")
    parser.add_argument("--max-real-env-steps", type=int, help="override max_real_env_steps")


def load_config(args: argparse.Namespace) -> SweepConfig:
    data = load_yaml(args.config)
    for key in ("storage_path", "num_samples", "max_iterations", "max_real_env_steps"):
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    return SweepConfig.from_dict(data)


def run(args: argparse.Namespace) -> int:
    from moedream.platform.ray_setup import init_ray

    cfg = load_config(args)
    check_experiment_dir(cfg, resume=args.resume)  # before starting Ray: fail fast
    base_agents_config(cfg)  # a bad pipeline / override fails before any stage runs
    init_ray()
    shared_real_steps = prepare_shared_world_model(cfg)
    results = build_tuner(cfg, resume=args.resume).fit()
    statuses = trial_statuses(cfg)
    headers, rows = summary_rows(results, cfg, statuses, shared_real_steps)
    print_summary(headers, rows, f"best trials of {cfg.name} ({cfg.metric}, {cfg.mode})")
    if results.errors:
        return 1
    unfinished = sorted(t for t, status in statuses.items() if status != "TERMINATED")
    if unfinished:
        print(
            f"sweep interrupted with {len(unfinished)} unfinished trial(s) {unfinished}: "
            f"continue it with `moedream sweep --config {args.config} --resume`"
            + (f" --storage-path {args.storage_path}" if args.storage_path else "")
        )
        return 130
    return 0
