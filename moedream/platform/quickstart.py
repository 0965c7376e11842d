"""The pipeline's config and its stages (moedream/platform/pipeline.py runs them, resumably):

1. collect: real episodes (Ray tasks) into Parquet shards;
2. world_model: train the MoE-diffusion world model with Ray Train (expert parallel);
3. serve: deploy it with Ray Serve (127.0.0.1);
4. gate: fit the coherence gate on the real data and start the central gate actor;
5. agents: train the team (MBMAPPO: perceiver/planner/reflector) on real + gated imagined rollouts;
6. report: evaluate the team against the random team on the real env, then write
   runs/<name>/report.md with PNG plots, next to the TensorBoard logs.

`moedream train --config X` runs it on any config of this shape; the main job (`make run` ->
`moedream quickstart`) runs it on the embedded default, configs/quickstart.yaml.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from moedream.config import ConfigBase, ConfigError, check
from moedream.platform.collect import CollectConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "quickstart.yaml"
ENV_CONFIGS = {
    "overcooked": DEFAULT_CONFIG,
    "mamujoco": REPO_ROOT / "configs" / "quickstart_mamujoco.yaml",
}


@dataclasses.dataclass
class QuickstartConfig(ConfigBase):
    name: str = "quickstart"
    """Run name: everything goes to <out>/<name>/."""
    out: str = "runs"
    collect: CollectConfig = dataclasses.field(default_factory=CollectConfig)
    world_model: dict[str, Any] = dataclasses.field(default_factory=dict)
    """DistributedTrainConfig fields (data, storage_path and name are set by the job)."""
    serve: dict[str, Any] = dataclasses.field(default_factory=dict)
    """ServeConfig fields of the deployment (checkpoint is set by the job)."""
    gate: dict[str, Any] = dataclasses.field(default_factory=dict)
    """GateConfig fields: the coherence kernel's maths (bands, calibration, metric weights)."""
    gate_actor: dict[str, Any] = dataclasses.field(default_factory=dict)
    """GateActorConfig fields of the central gate actor (name, CPUs, refine loop); it refines
    through the run's Serve deployment unless reimaginer_app says otherwise."""
    agents: dict[str, Any] = dataclasses.field(default_factory=dict)
    """AgentsConfig fields (env and env options default to the collect section's)."""
    eval_episodes: int = 3
    """Real episodes to evaluate the trained and the random team on."""
    http_port: int = 8000
    """Serve's HTTP port on 127.0.0.1."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check(bool(self.name) and "/" not in self.name, f"{prefix}name", self.name,
              "must be a non-empty folder name without '/'")  # fmt: skip
        check(self.eval_episodes > 0, f"{prefix}eval_episodes", self.eval_episodes, "must be > 0")
        # Build every section's typed config now: a typo fails before Ray starts.
        self.world_model_config()
        self.serve_config()
        self.gate_actor_config()
        self.agents_config()

    @property
    def run_dir(self) -> Path:
        # absolute: Ray Train workers and Serve replicas do not share the driver's cwd
        return Path(self.out).resolve() / self.name

    # Each section's typed config, wired to this run. --------------------------------------
    def world_model_config(self):
        from moedream.platform.train import DistributedTrainConfig

        data = {"name": "world_model", **self.world_model}
        data.update(
            data=str(self.run_dir / "data"),
            storage_path=str(self.run_dir / "ray_results"),
        )
        return _section(DistributedTrainConfig, data, "world_model")

    def serve_config(self):
        from moedream.platform.serve.schemas import ServeConfig

        return _section(ServeConfig, {"checkpoint": "", **self.serve}, "serve")

    def gate_config(self):
        from moedream.coherence.kernel import GateConfig

        return _section(GateConfig, self.gate, "gate")

    def gate_actor_config(self):
        from moedream.coherence.actor_config import GateActorConfig
        from moedream.platform.serve.names import APP_NAME, DEPLOYMENT_NAME

        if "kernel" in self.gate_actor:
            raise ConfigError(
                "quickstart section `gate_actor`: `kernel` is not set here; write the kernel's "
                "settings in the `gate` section"
            )
        data = {"reimaginer_app": APP_NAME, "reimaginer_deployment": DEPLOYMENT_NAME,
                **self.gate_actor, "kernel": self.gate_config()}  # fmt: skip
        return _section(GateActorConfig, data, "gate_actor")

    def agents_config(self):
        from moedream.platform.agents import AgentsConfig

        data = {
            "env": self.collect.env,
            "env_options": dict(self.collect.env_options),
            **self.agents,
        }
        imagination = dict(data.get("imagination") or {})
        world_model = {**self._gate_lookup(), **(imagination.get("world_model") or {})}
        if imagination.get("world_model_retrain_every"):
            # the run's own folders: retrained checkpoints next to the first, base data = stage 1
            world_model = {
                "checkpoint_dir": str(self.run_dir / "world_model_retrain"),
                "base_data_path": str(self.run_dir / "data"),
                **world_model,
            }
        if imagination.get("provider") == "world_model":
            imagination["world_model"] = world_model
            data["imagination"] = imagination
        return _section(AgentsConfig, data, "agents")

    def _gate_lookup(self) -> dict[str, str]:
        """Where the provider finds the gate actor: the one section `gate_actor` names it in,
        so a renamed actor is still found (a different name under agents.imagination is an
        error, not a second truth)."""
        actor = self.gate_actor_config()
        lookup = {"gate_actor_name": actor.actor_name, "gate_namespace": actor.namespace}
        given = (self.agents.get("imagination") or {}).get("world_model") or {}
        for key, value in lookup.items():
            if key in given and given[key] != value:
                raise ConfigError(
                    f"quickstart section `agents`: imagination.world_model.{key} = "
                    f"{given[key]!r} differs from the gate actor's {value!r}; set it once, in "
                    "the `gate_actor` section"
                )
        return lookup


def _section(cls, data: dict[str, Any], name: str):
    try:
        cfg = cls.from_dict(data, prefix=f"{name}.")
        cfg.validate(prefix=f"{name}.")
    except ConfigError as err:
        raise ConfigError(f"quickstart section `{name}`: {err}") from None
    return cfg


def prepare_imagination(cfg: QuickstartConfig) -> dict[str, Any]:
    """Stages collect, world_model, serve and gate of the pipeline (resumed from the run
    folder like any pipeline run): everything a `provider: world_model` agent run needs.
    Also used by benchmarks/sample_efficiency.py and model-based Tune sweeps."""
    from moedream.platform.pipeline import IMAGINATION_STAGES, run_pipeline

    records = run_pipeline(cfg, IMAGINATION_STAGES)
    return {"summary": records["collect"]["summary"],
            "collect_env_steps": records["collect"]["env_steps"],
            "world_model": records["world_model"], "gate": records["gate"],
            "timings_s": {name: records[name]["seconds"] for name in IMAGINATION_STAGES}}  # fmt: skip


def run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    """Run the main job (every pipeline stage); returns the figures the report shows."""
    from moedream.platform.pipeline import run_pipeline

    records = run_pipeline(cfg)
    return {"run_dir": str(cfg.run_dir), **records["report"]["figures"],
            "report": records["report"]["report"]}  # fmt: skip


# ------------------------------------------------------------------------------------ stages
# Each stage takes the config and the records of the stages before it (their returned dicts,
# read back from the run folder's stages.json on a resumed run) and returns its own record: a
# JSON-able dict of what it made.


def collect_stage(cfg: QuickstartConfig, records: dict[str, Any]) -> dict[str, Any]:
    from moedream.data import read_episodes
    from moedream.platform.collect import collect_parallel
    from moedream.platform.commands.collect import summarize

    data_dir = cfg.run_dir / "data"
    for old in data_dir.glob("*.parquet"):  # a re-run replaces the data, never mixes it
        old.unlink()
    paths = collect_parallel(cfg.collect.replace(out=str(data_dir)))
    spec, episodes = read_episodes(paths)
    summary = summarize(spec, episodes)
    print(summary)
    (cfg.run_dir / "summary.txt").write_text(summary + "\n")
    return {"summary": summary, "env_steps": sum(ep.length for ep in episodes)}


def world_model_stage(cfg: QuickstartConfig, records: dict[str, Any]) -> dict[str, Any]:
    from moedream.platform.train import run_distributed

    result = run_distributed(cfg.world_model_config())
    checkpoint = Path(result.checkpoint.path) / "world_model.safetensors"
    frame = result.metrics_dataframe
    history = frame.to_dict(orient="list") if frame is not None else {}
    final = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    print(f"world model checkpoint: {checkpoint}")
    return {"checkpoint": str(checkpoint), "final": final, "history": history}


def serve_stage(cfg: QuickstartConfig, records: dict[str, Any]) -> dict[str, Any]:
    from ray import serve

    from moedream.platform.serve import APP_NAME, build_app

    checkpoint = records["world_model"]["checkpoint"]
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.http_port})
    args = {**cfg.serve_config().to_dict(), "checkpoint": checkpoint}
    if cfg.agents_config().imagination.memory and not args["memory_checkpoint"]:
        args["memory_checkpoint"] = str(_fitted_memory(cfg, checkpoint))
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    return {"checkpoint": checkpoint, "url": f"http://127.0.0.1:{cfg.http_port}",
            "memory_checkpoint": args["memory_checkpoint"]}  # fmt: skip


def _fitted_memory(cfg: QuickstartConfig, checkpoint: str) -> Path:
    """The served memory of imagination.memory: its spatial expert's error measured on the
    collected real episodes (else the retrieval expert would abstain in every rollout)."""
    from moedream.platform.serve.episodes import fit_served_memory

    out = cfg.run_dir / "serve_memory" / "memory.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    return fit_served_memory(checkpoint, str(cfg.run_dir / "data"), cfg.serve_config().memory, out)


def serve_is_running(cfg: QuickstartConfig, record: dict[str, Any]) -> bool:
    """Whether the Serve app of this run is up and serving the recorded checkpoint (then a
    resumed run reuses it; a retrained checkpoint pushed by an earlier agents stage, or no
    app at all, means it is deployed again)."""
    from moedream.platform.serve.deploy import served_checkpoint
    from moedream.platform.serve.names import APP_NAME, DEPLOYMENT_NAME
    from moedream.platform.serve.runner import checkpoint_fingerprint

    try:
        served = served_checkpoint(APP_NAME, DEPLOYMENT_NAME)
    except Exception:  # no Serve, no app, or a replica that does not answer: deploy anew
        return False
    return served.get("id") == checkpoint_fingerprint(record["checkpoint"])[0]


def gate_stage(cfg: QuickstartConfig, records: dict[str, Any]) -> dict[str, Any]:
    import ray

    from moedream.coherence.gate import get_or_create_gate
    from moedream.coherence.kernel import Normalizer, judge
    from moedream.data import load_windows

    gate_cfg = cfg.gate_actor_config()
    horizon = cfg.agents_config().imagination.horizon
    _, train, hold = load_windows(cfg.run_dir / "data", horizon, holdout=0.25, seed=0)
    normalizer = Normalizer.fit(train["obs"], gate_cfg.kernel)
    view = None
    if hold:  # the model terms: the served model's one-step view of held-out real windows
        view = _calibrate_model_terms(
            normalizer, records["world_model"]["checkpoint"], hold, gate_cfg.kernel
        )
    normalizer.save(_gate_normalizer_path(cfg))
    state_dir = _gate_state_dir(cfg)
    for old in (*state_dir.glob("*.json"), *state_dir.glob("*.npz")):  # this run's state only
        old.unlink()
    _kill_existing_gate(gate_cfg)
    gate = get_or_create_gate(gate_cfg, normalizer, state_dir)
    if view is not None:  # the gate keeps the view: a refit of φ recalibrates in its units
        ray.get(gate.calibrate_model_terms.remote(*view))
    approval = float("nan")
    if hold:
        from moedream.world_model.trajectory import Trajectories

        real = Trajectories(obs=hold["obs"], action=hold["action"], reward=hold["reward"],
                            terminated=hold["terminated"])  # fmt: skip
        verdicts = judge(real, normalizer, gate_cfg.kernel).verdict_names()
        approval = float(np.mean([v == "APPROVE" for v in verdicts]))
        print(f"gate: held-out real trajectories approved: {approval:.1%}")
    else:  # e.g. one collected episode: all of it fits φ, none is left to judge
        print(
            f"gate: no held-out real window of {horizon} steps to judge (one episode, or "
            "held-out episodes too short); collect more episodes to measure the approval "
            "of real trajectories"
        )
    return {"holdout_real_approval": approval}


def _calibrate_model_terms(normalizer, checkpoint: str, hold: dict, kernel_cfg):
    """Calibrate ``normalizer``'s model terms; returns (the model's view, the real rewards)."""
    from moedream.coherence.model_calibration import model_view, within_context
    from moedream.world_model.model import WorldModel

    model = WorldModel.load(checkpoint, map_location="cpu")
    windows = within_context(model, hold)
    view = model_view(model, windows)
    fitted = normalizer.calibrate_model_terms(view, windows["reward"], kernel_cfg)
    print("gate: model terms calibrated on held-out real windows: "
          + ", ".join(f"{k} {v:.3g}" for k, v in fitted.items()))  # fmt: skip
    return view, windows["reward"]


def gate_is_running(cfg: QuickstartConfig, record: dict[str, Any]) -> bool:
    import ray

    gate_cfg = cfg.gate_actor_config()
    try:
        ray.get_actor(gate_cfg.actor_name, namespace=gate_cfg.namespace)
    except ValueError:
        return False
    return True


def restart_gate(cfg: QuickstartConfig, records: dict[str, Any]) -> None:
    """Start the gate actor again from the run folder: the normaliser the gate stage fitted
    and the counters it persisted (they survive restarts)."""
    from moedream.coherence.gate import get_or_create_gate
    from moedream.coherence.kernel import Normalizer

    normalizer = Normalizer.load(_gate_normalizer_path(cfg))
    get_or_create_gate(cfg.gate_actor_config(), normalizer, _gate_state_dir(cfg))


def _gate_normalizer_path(cfg: QuickstartConfig) -> Path:
    return cfg.run_dir / "gate_normalizer.json"


def _gate_state_dir(cfg: QuickstartConfig) -> Path:
    state_dir = cfg.run_dir / "gate_state"
    state_dir.mkdir(parents=True, exist_ok=True)
    return state_dir


def _kill_existing_gate(gate_cfg) -> None:
    import ray

    try:
        ray.kill(ray.get_actor(gate_cfg.actor_name, namespace=gate_cfg.namespace), no_restart=True)
    except ValueError:
        pass  # none yet


def agents_stage(cfg: QuickstartConfig, records: dict[str, Any]) -> dict[str, Any]:
    from moedream.platform.agents import train

    agents_cfg = cfg.agents_config()
    result = train(agents_cfg, cfg.run_dir / "agents", run_name="team")
    return {"history": result.history, "checkpoint": result.checkpoint, "run_dir": result.run_dir}


def report_stage(cfg: QuickstartConfig, records: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the team against the random team, then write report.md with its plots."""
    from moedream.platform.report import write_report

    print(f"evaluate the team against the random team ({cfg.eval_episodes} episodes)")
    evaluation = _evaluate(cfg, records["agents"]["checkpoint"])
    timings = {name: record["seconds"] for name, record in records.items()}
    figures = {"summary": records["collect"]["summary"], "world_model": records["world_model"],
               "gate": {**records["gate"], **_gate_stats(cfg)}, "agents": records["agents"],
               "evaluation": evaluation, "timings_s": timings}  # fmt: skip
    report = write_report(cfg.run_dir, cfg, figures)
    _shutdown_serve()
    print(f"\nreport: {report}\nTensorBoard: tensorboard --logdir {cfg.run_dir}")
    return {"report": str(report), "figures": figures}


def _evaluate(cfg: QuickstartConfig, checkpoint: str) -> dict[str, Any]:
    from moedream.envs import env_spec
    from moedream.platform.agents import load_team_module
    from moedream.policies.imagination import TeamPolicy
    from moedream.policies.metrics import evaluate_team

    agents_cfg = cfg.agents_config()
    options = dict(agents_cfg.env_options)
    eval_spec = env_spec(agents_cfg.env, **options)
    policy = TeamPolicy(load_team_module(checkpoint), eval_spec, agents_cfg.team.shared_planner)
    trained = evaluate_team(
        policy, agents_cfg.env, options, eval_spec, episodes=cfg.eval_episodes, seed=10_000
    )
    random = evaluate_team(
        None, agents_cfg.env, options, eval_spec, episodes=cfg.eval_episodes, seed=10_000
    )
    out = {"trained": trained.as_dict(), "random": random.as_dict()}
    print(json.dumps(out, indent=1))
    return out


def _gate_stats(cfg: QuickstartConfig) -> dict[str, Any]:
    import ray

    gate_cfg = cfg.gate_actor_config()
    actor = ray.get_actor(gate_cfg.actor_name, namespace=gate_cfg.namespace)
    return {"stats": ray.get(actor.stats.remote())}


def _shutdown_serve() -> None:
    from ray import serve

    serve.shutdown()
