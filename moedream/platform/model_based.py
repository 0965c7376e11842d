"""Imagination from the served world model, gated by the central coherence gate.

``ServedWorldModelImaginer`` is the imagination provider of MBMAPPO
(moedream.policies.imagination.ImaginationProvider) that the main job uses:

- ``imagine``: closed-loop rollouts under the CURRENT planner. Each step sends one batched
  request to the Serve deployment (``imagine`` with horizon 1 and the imagined steps so far as
  context), so the planner acts on imagined observations, and the world model conditions on
  the whole imagined history;
- ``gate``: the trajectories go to the central gate actor (``judge_and_refine``); REFINE rows
  are re-imagined by the gate through the same deployment with shrunk noise, and the final
  (possibly re-imagined) rows come back with the verdicts;
- ``evaluate``: before they are stored, every iteration's NEW real episodes (held out: the
  served model has never seen them) score the model's one-step predictions with real context
  and real actions: reward MAE (beside a constant predictor's), reward correlation, and the
  next-observation error relative to a "nothing changes" predictor (``provider/wm_eval_*``);
- ``observe``: every iteration's real episodes go to a bounded in-memory store
  (moedream.platform.retrain.RealEpisodeStore; optionally also Parquet shards);
- ``retrain``: on MBMAPPO's ``world_model_retrain_every`` schedule, the served checkpoint is
  fine-tuned in this process on the original + new real windows, written to
  ``<checkpoint_dir>/retrain_<iteration>/`` and hot-swapped into the deployment
  (:func:`push_checkpoint`: a user_config-only declarative deploy -> ``reconfigure``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moedream.config import ConfigBase, ConfigError, check, check_positive
from moedream.data.episodes import episode_windows
from moedream.envs.spec import EnvSpec
from moedream.platform.retrain import (
    RealEpisodeStore,
    concat_windows,
    ensure_log_handler,
    episode_from_rllib,
    fine_tune,
    write_versioned_checkpoint,
)
from moedream.platform.serve.runner import checkpoint_fingerprint
from moedream.world_model.model import WorldModel
from moedream.world_model.train_local import TrainConfig
from moedream.world_model.trajectory import Trajectories

logger = logging.getLogger("moedream.retrain")  # the same logger as moedream.platform.retrain


@dataclasses.dataclass
class ServedWorldModelImaginerFactory(ConfigBase):
    """Picklable factory (the algorithm builds its provider in setup()), and the provider's
    settings, retraining included. Validated on construction (ConfigError naming the field).

    Retraining (MBMAPPO ``world_model_retrain_every`` > 0) needs ``checkpoint_dir``; with
    ``base_data_path`` the fine-tune mixes the original episodes with the new real ones.
    """

    env_name: str = ""
    app_name: str = "world_model"
    deployment_name: str = "WorldModelDeployment"
    gate_actor_name: str = "moedream_coherence_gate"
    gate_namespace: str = "moedream"
    policy_id: str = "team"
    max_rows: int = 256
    """Rows per Serve request (the deployment's max_batch)."""
    # ----------------------------------------------------------- episode store and retraining
    store_max_steps: int = 50_000
    """Real env steps kept in memory for retraining (oldest episodes dropped first)."""
    episode_dir: str | None = None
    """If set, every iteration's real episodes are also written there as a Parquet shard."""
    checkpoint_dir: str | None = None
    """Where retrained checkpoints go: <checkpoint_dir>/retrain_<iteration>/world_model.safetensors
    (e.g. <run>/world_model). Required when world_model_retrain_every > 0."""
    base_data_path: str | None = None
    """Episode shards the served model was trained on (mixed into every retrain batch)."""
    retrain_steps: int = 200
    retrain_batch_size: int = 32
    retrain_lr: float = 3e-4
    retrain_warmup: int = 10
    retrain_window: int = 0
    """Transitions per training window; 0 = the model's backbone.max_context."""
    retrain_new_fraction: float = 0.5
    """Fraction of each batch drawn from the new real windows when base data is set."""
    retrain_device: str | None = None
    """Torch device of the fine-tune (None: cuda if visible, else cpu)."""
    swap_timeout_s: float = 180.0
    """How long to wait for the deployment to serve a new checkpoint."""
    progress: bool = False
    """tqdm bar during the fine-tune (a one-line log is written either way)."""
    gate_refit: bool = True
    """Every iteration, refit the coherence gate's φ on the episode store (the agents' own
    real episodes): φ fitted once on the random collection rejects more and more imagination
    as the team's real motion leaves random play behind. Before each refit the new episodes'
    real H-step windows are judged (uncounted): provider/gate_real_approve_rate."""
    eval_rows: int = 256
    """Held-out one-step predictions scored on each iteration's new real episodes before they
    are stored (provider/wm_eval_* metrics); 0 = do not score."""

    def __post_init__(self) -> None:
        self.validate(f"{type(self).__name__}.")

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check(bool(self.env_name), f"{prefix}env_name", self.env_name, "must name the env")
        for name in ("app_name", "deployment_name", "gate_actor_name", "gate_namespace"):
            value = getattr(self, name)
            check(isinstance(value, str) and bool(value), f"{prefix}{name}", value,
                  "must be a non-empty string")  # fmt: skip
        for name in ("max_rows", "store_max_steps", "retrain_steps", "retrain_batch_size"):
            value = getattr(self, name)
            check(_is_int(value) and value > 0, f"{prefix}{name}", value, "must be an integer > 0")
        for name in ("retrain_warmup", "retrain_window", "eval_rows"):
            value = getattr(self, name)
            check(_is_int(value) and value >= 0, f"{prefix}{name}", value,
                  "must be an integer >= 0")  # fmt: skip
        check(isinstance(self.gate_refit, bool), f"{prefix}gate_refit", self.gate_refit,
              "must be true or false")  # fmt: skip
        check_positive(f"{prefix}retrain_lr", self.retrain_lr)
        check_positive(f"{prefix}swap_timeout_s", self.swap_timeout_s)
        check(
            isinstance(self.retrain_new_fraction, (int, float))
            and 0 < self.retrain_new_fraction <= 1,
            f"{prefix}retrain_new_fraction",
            self.retrain_new_fraction,
            "must be a number in (0, 1] (the share of each batch from new real episodes)",
        )
        if self.base_data_path is not None:
            check(
                Path(self.base_data_path).exists(),
                f"{prefix}base_data_path",
                self.base_data_path,
                "does not exist: point it at the episode shards the world model was trained "
                "on (the quickstart's <run>/data), or leave it unset",
            )

    def check_retrain(self, retrain_every: int) -> None:
        """Cross-field check against MBMAPPOConfig.world_model_retrain_every."""
        if retrain_every:
            check(
                bool(self.checkpoint_dir),
                "ServedWorldModelImaginerFactory.checkpoint_dir",
                self.checkpoint_dir,
                f"must be set when world_model_retrain_every = {retrain_every} (a folder for "
                "the retrained checkpoints, e.g. <run>/world_model), or set "
                "world_model_retrain_every = 0",
            )

    def __call__(self, config: Any) -> ServedWorldModelImaginer:
        self.check_retrain(config.imagination.world_model_retrain_every)
        return ServedWorldModelImaginer(
            spec=EnvSpec.from_json(config.env_spec_json),
            horizon=config.imagination.horizon,
            seed=config.seed or 0,
            factory=self,
            refit_gate=self.gate_refit and config.imagination.gate,
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ServedWorldModelImaginer:
    def __init__(
        self,
        *,
        spec: EnvSpec,
        horizon: int,
        seed: int,
        factory: ServedWorldModelImaginerFactory,
        refit_gate: bool = False,
    ):
        self.spec, self.horizon, self.factory = spec, int(horizon), factory
        self.refit_gate = refit_gate  # the factory's gate_refit, when the gate is used at all
        self._seed = int(seed)
        self._calls = 0
        self._last: dict[str, float] = {}
        self.store = RealEpisodeStore(spec, factory.store_max_steps, factory.episode_dir)
        self._checkpoint: str | None = None  # the served checkpoint (None: not asked yet)
        self._checkpoint_id: str | None = None
        self._version = 0  # retrained checkpoints pushed so far
        self._restored = False  # set_state gave a checkpoint that may not be served yet
        self._base_windows: dict[str, np.ndarray] | None = None
        self._skipped_episodes = 0
        self._eval_window: int | None = None
        self._gate_normalizer: dict[str, Any] | None = None  # our last refit (for checkpoints)
        self._gate_restored = False  # set_state gave a refit the actor may not have
        ensure_log_handler()

    # -------------------------------------------------------------------------- imagine

    def imagine(self, start_obs: np.ndarray, policy: Any) -> Trajectories:
        """start_obs [B, N, D] -> Trajectories of ``horizon`` steps, actions from ``policy``."""
        from ray import serve

        self._ensure_restored()
        handle = serve.get_deployment_handle(
            self.factory.deployment_name, app_name=self.factory.app_name
        )
        self._calls += 1
        b, h = start_obs.shape[0], self.horizon
        obs = [np.asarray(start_obs, dtype=np.float32)]  # list of [B, N, D]
        actions, rewards, terms, uncert, obs_std, loads = [], [], [], [], [], []
        for t in range(h):
            encoded = self.spec.encode_actions(policy.act(obs[-1]))  # [B, N, A]
            replies = [
                handle.imagine.remote(self._request(obs, actions, encoded, rows, t))
                for rows in _row_chunks(b, self.factory.max_rows)
            ]
            out = _concat_replies([r.result() for r in replies])
            obs.append(out["obs"][:, 1])
            actions.append(encoded)
            rewards.append(out["reward"][:, 0])
            terms.append(out["terminated"][:, 0])
            uncert.append(out["uncertainty"][:, 0])
            if out.get("obs_std") is not None:
                obs_std.append(out["obs_std"][:, 0])
            if out.get("expert_load") is not None:
                loads.append(out["expert_load"])
        trajs = Trajectories(
            obs=np.stack(obs, 1),  # [B, H+1, N, D]
            action=np.stack(actions, 1),  # [B, H, N, A]
            reward=np.stack(rewards, 1),  # [B, H, N]
            terminated=np.stack(terms, 1),  # [B, H, N]
            uncertainty=np.stack(uncert, 1),  # [B, H]
            obs_std=np.stack(obs_std, 1) if len(obs_std) == h else None,
            expert_load=np.mean(loads, 0) if loads else None,  # [L, E]
        )
        self._last["uncertainty_mean"] = float(np.mean(trajs.uncertainty))
        self._last["imagined_reward_mean"] = float(np.mean(trajs.reward[..., 0]))
        if trajs.expert_load is not None:
            self._expert_load = trajs.expert_load
        return trajs

    def _request(self, obs: list, actions: list, encoded: np.ndarray, rows: slice, t: int) -> dict:
        request = {
            "start_obs": obs[-1][rows],
            "actions": encoded[rows, None],  # [b, 1, N, A]: one step
            "horizon": 1,
            "seed": (self._seed * 1_000_003 + self._calls * 1009 + t) % 2**31,
        }
        if t > 0:  # the imagined steps so far are the model's context
            request["context"] = {
                "obs": np.stack(obs[:-1], 1)[rows],  # [b, t, N, D]
                "actions": np.stack(actions, 1)[rows],  # [b, t, N, A]
            }
        return request

    # ----------------------------------------------------------------------------- gate

    def gate(self, trajectories: Trajectories) -> Any:
        import ray

        from moedream.coherence.kernel import Verdict
        from moedream.policies.imagination import GateDecision

        self._push_restored_gate()
        actor = self._gate_actor()
        result = ray.get(
            actor.judge_and_refine.remote(
                trajectories, self.spec.env_name, self.factory.policy_id, seed=self._calls
            )
        )
        keep = result.verdicts == Verdict.APPROVE
        refined = result.tries > 0  # went through the refine loop
        self._last["gate_h7_mean"] = float(np.mean(result.h7))
        return GateDecision(  # approved + refined (then approved) + rejected = B
            keep=keep,
            approved=int(np.sum(keep & ~refined)),
            refined=int(np.sum(keep & refined)),
            rejected=int(np.sum(~keep)),
            trajectories=result.trajectories,
        )

    # ------------------------------------------------------------------------ evaluate

    def evaluate(self, episodes: list[Any]) -> dict[str, float]:
        """Score the served model's one-step predictions on the NEW real episodes (call before
        ``observe``): teacher-forced, with up to ``context`` real steps before each predicted
        step and the real action. Returns (and logs as provider metrics) wm_eval_*."""
        rows = self.factory.eval_rows
        if not rows:
            return {}
        converted = []
        for episode in episodes:
            try:
                converted.append(episode_from_rllib(episode, self.spec))
            except ValueError:
                continue
        windows = eval_windows(converted, self.spec, self._eval_context(), rows, self._eval_rng())
        if windows is None:
            return {}
        from ray import serve

        self._ensure_restored()
        handle = serve.get_deployment_handle(
            self.factory.deployment_name, app_name=self.factory.app_name
        )
        t = windows["action"].shape[1]  # context steps + the predicted one
        seed = (self._seed * 7_777 + self._calls) % 2**31
        replies = []
        for rows in _row_chunks(len(windows["obs"]), self.factory.max_rows):
            request = {
                "start_obs": windows["obs"][rows, t - 1],
                "actions": windows["action"][rows, t - 1 : t],  # the real action
                "horizon": 1,
                "seed": seed,
            }
            if t > 1:  # the real steps before it are the model's context
                request["context"] = {
                    "obs": windows["obs"][rows, : t - 1],
                    "actions": windows["action"][rows, : t - 1],
                }
            replies.append(handle.imagine.remote(request))
        out = _concat_replies([r.result() for r in replies])
        scores = prediction_scores(
            pred_obs=out["obs"][:, 1],
            pred_reward=out["reward"][:, 0, 0],
            obs=windows["obs"][:, t - 1],
            next_obs=windows["obs"][:, t],
            reward=windows["reward"][:, t - 1, 0],
        )
        self._last.update(scores)
        return scores

    def _eval_context(self) -> int:
        if self.factory.retrain_window:
            return self.factory.retrain_window
        if self._eval_window is None:
            try:
                info = served_checkpoint(self.factory.app_name, self.factory.deployment_name)
                model = WorldModel.load(info["path"], map_location="cpu")
                self._eval_window = int(model.config.backbone.max_context)
            except Exception:  # noqa: BLE001 - no path to read: a short context is still fair
                self._eval_window = 8
        return self._eval_window

    def _eval_rng(self) -> np.random.Generator:
        return np.random.default_rng((self._seed * 104_729 + self._calls) % 2**31)

    # ------------------------------------------------------------------ observe / retrain

    def observe(self, episodes: list[Any]) -> None:
        """The iteration's real RLlib MultiAgentEpisodes -> the episode store (and shards)."""
        converted = []
        for episode in episodes:
            try:
                converted.append(episode_from_rllib(episode, self.spec))
            except ValueError as err:  # e.g. an agent that did not act every step
                self._skipped_episodes += 1
                logger.debug("episode store: skipped an episode: %s", err)
        if self.refit_gate:
            self._judge_real(converted)
        self.store.add(converted)
        if self.refit_gate and self.store.episodes:
            self._refit_gate()

    def _gate_actor(self) -> Any:
        import ray

        return ray.get_actor(self.factory.gate_actor_name, namespace=self.factory.gate_namespace)

    def _judge_real(self, episodes: list[Any]) -> None:
        """How much of the team's NEW real data (H-step windows) the gate would approve."""
        import ray

        from moedream.coherence.kernel import Verdict

        parts = [episode_windows(ep, self.spec, self.horizon) for ep in episodes]
        windows = concat_windows([p for p in parts if p])
        if not windows:
            return
        real = Trajectories(obs=windows["obs"], action=windows["action"],
                            reward=windows["reward"], terminated=windows["terminated"])  # fmt: skip
        self._push_restored_gate()
        result = ray.get(self._gate_actor().judge.remote(real, record=False))
        self._last["gate_real_approve_rate"] = float(np.mean(result.verdicts == Verdict.APPROVE))

    def _refit_gate(self) -> None:
        import ray

        actor = self._gate_actor()  # an actor runs its calls in order: one wait for both
        info, self._gate_normalizer = ray.get(
            [actor.refit.remote([ep.obs for ep in self.store.episodes]),
             actor.get_normalizer.remote()]
        )  # fmt: skip
        self._last.update({f"gate_{k}": float(v) for k, v in info.items()})

    def _push_restored_gate(self) -> None:
        """After set_state with a refit φ: give it back to the gate (e.g. a fresh actor)."""
        if self._gate_restored and self._gate_normalizer is not None:
            import ray

            ray.get(self._gate_actor().set_normalizer.remote(self._gate_normalizer))
        self._gate_restored = False

    def retrain(self, iteration: int) -> dict[str, float]:
        """Fine-tune the served checkpoint on original + stored real windows, write a new
        versioned checkpoint, and hot-swap it into the Serve deployment (reconfigure)."""
        start = time.perf_counter()
        self.factory.check_retrain(1)
        source = self._served_checkpoint()
        device = self.factory.retrain_device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = WorldModel.load(source, map_location=device)
        window = self.factory.retrain_window or model.config.backbone.max_context
        new = self.store.windows(window)
        if not new:
            logger.info(
                "world model retrain @ iteration %d skipped: no real episode of >= %d steps yet",
                iteration,
                window,
            )
            self._last["wm_retrain_skipped"] = 1.0
            return {}
        cfg = self._train_config(window, iteration)
        result = fine_tune(
            model,
            new,
            cfg,
            base_windows=self._base(window),
            new_fraction=self.factory.retrain_new_fraction,
            progress=self.factory.progress,
        )
        info = {
            "iteration": iteration,
            "version": self._version + 1,
            "source_checkpoint": source,
            "new_windows": len(new["obs"]),
            "base_windows": len(self._base_windows["obs"]) if self._base_windows else 0,
            "train": cfg.to_dict(),
            **result,
        }
        path = write_versioned_checkpoint(model, self.factory.checkpoint_dir, iteration, info)
        served_id = push_checkpoint(
            str(path),
            app_name=self.factory.app_name,
            deployment_name=self.factory.deployment_name,
            timeout_s=self.factory.swap_timeout_s,
        )
        self._checkpoint, self._checkpoint_id = str(path), served_id
        self._version += 1
        seconds = time.perf_counter() - start
        self._last.update(
            wm_retrain_loss=result["loss"],
            wm_retrain_loss_first=result["loss_first"],
            wm_retrain_seconds=seconds,
            wm_retrain_new_windows=float(info["new_windows"]),
            wm_retrain_skipped=0.0,
        )
        logger.info(
            "world model retrain @ iteration %d: %d steps on %d new + %d base windows, loss "
            "%.4f -> %.4f, %.1f s; serving v%d %s (%s)",
            iteration, cfg.steps, info["new_windows"], info["base_windows"],
            result["loss_first"], result["loss_last"], seconds, self._version, path, served_id,
        )  # fmt: skip
        return dict(self._last)

    def _train_config(self, window: int, iteration: int) -> TrainConfig:
        f = self.factory
        return TrainConfig(
            steps=f.retrain_steps,
            batch_size=f.retrain_batch_size,
            window=window,
            lr=f.retrain_lr,
            warmup=f.retrain_warmup,
            lr_schedule="constant",
            holdout=0.0,
            seed=(self._seed * 7919 + iteration) % 2**31,
        )

    def _base(self, window: int) -> dict[str, np.ndarray] | None:
        """The original training windows (read once, then cached), or None."""
        if self.factory.base_data_path is None:
            return None
        if self._base_windows is None:
            from moedream.data import load_windows

            spec, train, _ = load_windows(self.factory.base_data_path, window, holdout=0.0)
            if spec.obs_dim != self.spec.obs_dim or spec.agent_ids != self.spec.agent_ids:
                raise ConfigError(
                    f"ServedWorldModelImaginerFactory.base_data_path = "
                    f"{self.factory.base_data_path!r} holds {spec.env_name} agents "
                    f"{spec.agent_ids} (obs {spec.obs_dim}), but the agents train on "
                    f"{self.spec.env_name} {self.spec.agent_ids} (obs {self.spec.obs_dim})"
                )
            self._base_windows = train
        return self._base_windows

    def _ensure_restored(self) -> None:
        """After set_state with a retrained checkpoint: serve it again if the deployment serves
        another one (e.g. the run was restored on a fresh deployment of the base model)."""
        if self._checkpoint is None or not self._restored:
            return
        self._restored = False
        f = self.factory
        if (
            served_checkpoint(f.app_name, f.deployment_name)["id"]
            != checkpoint_fingerprint(self._checkpoint)[0]
        ):
            logger.info("serving the restored world-model checkpoint %s again", self._checkpoint)
            self._checkpoint_id = push_checkpoint(
                self._checkpoint,
                app_name=f.app_name,
                deployment_name=f.deployment_name,
                timeout_s=f.swap_timeout_s,
            )

    def _served_checkpoint(self) -> str:
        """The checkpoint to fine-tune from: ours (after a restore, served again first), else
        the one the deployment reports."""
        self._ensure_restored()
        if self._checkpoint is None:
            info = served_checkpoint(self.factory.app_name, self.factory.deployment_name)
            self._checkpoint, self._checkpoint_id = info["path"], info["id"]
        return self._checkpoint

    # --------------------------------------------------------------------- bookkeeping

    def metrics(self) -> dict[str, float]:
        out = dict(self._last)
        out["wm_checkpoint_version"] = float(self._version)
        out["wm_store_steps"] = float(self.store.steps)
        load = getattr(self, "_expert_load", None)
        if load is not None:  # [L, E] fraction of tokens per expert
            for layer, row in enumerate(np.asarray(load)):
                for expert, value in enumerate(row):
                    out[f"expert_load_l{layer}_e{expert}"] = float(value)
        return out

    def get_state(self) -> dict[str, Any]:
        return {
            "calls": self._calls,
            "seed": self._seed,
            "checkpoint": self._checkpoint,
            "checkpoint_id": self._checkpoint_id,
            "checkpoint_version": self._version,
            "gate_normalizer": self._gate_normalizer,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore; a retrained checkpoint in ``state`` is served again (before the next
        imagination) if the deployment serves another one."""
        self._calls = int(state.get("calls", 0))
        self._version = int(state.get("checkpoint_version", 0))
        if state.get("gate_normalizer"):  # the gate's refit φ at save time
            self._gate_normalizer = state["gate_normalizer"]
            self._gate_restored = True
        if state.get("checkpoint"):
            self._checkpoint = str(state["checkpoint"])
            self._checkpoint_id = state.get("checkpoint_id")
            self._restored = self._version > 0


# ---------------------------------------------------------------------------------------------
# Serve: which checkpoint is served, and hot-swapping a new one in
# ---------------------------------------------------------------------------------------------

BUILD_APP_IMPORT_PATH = "moedream.platform.serve:build_app"


def served_checkpoint(app_name: str, deployment_name: str) -> dict[str, Any]:
    """``{"id", "path", ...}`` of the checkpoint the deployment serves (its ``info``)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment_name, app_name=app_name)
    return handle.info.remote().result(timeout_s=60)["checkpoint"]


def push_checkpoint(
    checkpoint: str, *, app_name: str, deployment_name: str, timeout_s: float = 180.0
) -> str:
    """Make the deployment serve ``checkpoint``; returns its checkpoint id once served.

    Only the deployment's ``user_config.checkpoint`` changes, through Serve's declarative
    deploy (what ``serve deploy`` sends): with the application's code version (import path,
    args, runtime env) unchanged, Serve calls ``reconfigure`` on the live replicas, which swap
    the model in place without dropping requests. ``serve.run`` cannot do that: it gives every
    run a new code version and so replaces the replicas. An application first deployed with
    ``serve.run`` is converted once (``build_app`` with its current user_config as args: one
    replacement of the replicas), after which every push is an in-place reconfigure. Other
    applications deployed from a config are kept as they are.
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    expected = checkpoint_fingerprint(checkpoint)[0]
    client = _get_global_client()
    details = client.get_serve_details()
    apps = details.get("applications", {})
    if app_name not in apps:
        raise RuntimeError(
            f"Serve application {app_name!r} is not running (running: {sorted(apps)}); deploy "
            "the world model first (moedream serve / the quickstart)"
        )
    configs = [
        dict(app["deployed_app_config"])
        for name, app in apps.items()
        if name != app_name and app.get("deployed_app_config")
    ]
    configs.append(_app_config(apps[app_name], deployment_name, checkpoint))
    http = details.get("http_options") or {}
    schema = ServeDeploySchema.model_validate(
        {
            "applications": configs,
            "http_options": {k: http[k] for k in ("host", "port") if k in http},
        }
    )
    client.deploy_apps(schema, _blocking=False)
    return _wait_served(app_name, deployment_name, expected, timeout_s)


def _app_config(app: dict[str, Any], deployment_name: str, checkpoint: str) -> dict[str, Any]:
    """The application's declarative config with the deployment's checkpoint replaced."""
    current = app["deployments"][deployment_name]["deployment_config"]
    user_config = {**(current.get("user_config") or {}), "checkpoint": checkpoint}
    deployed = app.get("deployed_app_config")
    if deployed:  # already declarative: change only the user_config (same code version)
        config = dict(deployed)
        entries = [dict(d) for d in config.get("deployments", [])]
        mine = [d for d in entries if d.get("name") == deployment_name]
        if mine:
            mine[0]["user_config"] = user_config
        else:
            entries.append({"name": deployment_name, "user_config": user_config})
        config["deployments"] = entries
        return config
    options = {
        "name": deployment_name,
        "user_config": user_config,
        "max_ongoing_requests": current.get("max_ongoing_requests"),
        "ray_actor_options": {
            k: v
            for k, v in (current.get("ray_actor_options") or {}).items()
            if k in ("num_cpus", "num_gpus", "memory", "resources") and v is not None
        },
    }
    if current.get("autoscaling_config") is None and current.get("num_replicas") is not None:
        options["num_replicas"] = current["num_replicas"]
    config = {
        "name": app["name"],
        "route_prefix": app.get("route_prefix") or "/",
        "import_path": BUILD_APP_IMPORT_PATH,
        # The args stay fixed from now on (their change would rebuild the app).
        "args": {**(current.get("user_config") or {})},
        "deployments": [{k: v for k, v in options.items() if v is not None}],
    }
    runtime_env = _job_runtime_env()
    if runtime_env:
        config["runtime_env"] = runtime_env
    return config


def _job_runtime_env() -> dict[str, Any]:
    """The code-shipping parts of this job's runtime env (a `ray job submit --working-dir`
    job's moedream must reach the app's build task and replicas too)."""
    import ray

    env = dict(ray.get_runtime_context().runtime_env or {})
    return {k: env[k] for k in ("working_dir", "py_modules", "env_vars") if env.get(k)}


def _wait_served(app_name: str, deployment_name: str, expected: str, timeout_s: float) -> str:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(
                f"Serve application {app_name!r} failed to deploy the new checkpoint: "
                f"{status.message}"
            )
        if status is not None and status.status == "RUNNING":
            try:
                last = served_checkpoint(app_name, deployment_name)["id"]
            except Exception as err:  # noqa: BLE001 - replicas restarting: poll again
                last = repr(err)[:200]
            if last == expected:
                return expected
        time.sleep(0.5)
    raise TimeoutError(
        f"the Serve deployment {app_name}/{deployment_name} did not serve checkpoint "
        f"{expected} within swap_timeout_s = {timeout_s} s (last seen: {last}); raise "
        "ServedWorldModelImaginerFactory.swap_timeout_s or check `serve status`"
    )


def eval_windows(
    episodes: list[Any], spec: EnvSpec, window: int, rows: int, rng: np.random.Generator
) -> dict[str, np.ndarray] | None:
    """Up to ``rows`` random windows of ``window`` steps (shorter where the episodes are
    shorter, at least 1) from ``episodes`` (moedream.data Episodes): the last step of each is
    the one to predict, the earlier ones its context. None if no episode has a step."""
    lengths = np.array([ep.length for ep in episodes], dtype=np.int64)
    if not lengths.size or lengths.max() < 1:
        return None
    window = int(max(1, min(window, lengths.max())))
    usable = [ep for ep in episodes if ep.length >= window]
    starts = [(k, s) for k, ep in enumerate(usable) for s in range(ep.length - window + 1)]
    picks = rng.choice(len(starts), size=min(rows, len(starts)), replace=False)
    obs, action, reward = [], [], []
    for i in picks:
        k, s = starts[int(i)]
        ep = usable[k]
        obs.append(ep.obs[s : s + window + 1])
        action.append(spec.encode_actions(ep.action[s : s + window]))
        reward.append(ep.reward[s : s + window])
    return {
        "obs": np.asarray(obs, dtype=np.float32),  # [M, T+1, N, D]
        "action": np.asarray(action, dtype=np.float32),  # [M, T, N, A]
        "reward": np.asarray(reward, dtype=np.float32),  # [M, T, N]
    }


def prediction_scores(
    *,
    pred_obs: np.ndarray,
    pred_reward: np.ndarray,
    obs: np.ndarray,
    next_obs: np.ndarray,
    reward: np.ndarray,
) -> dict[str, float]:
    """One-step prediction quality against real outcomes (rows M; obs [M, N, D], rewards [M]).

    wm_eval_reward_mae vs wm_eval_reward_mae_const (predicting the batch's mean reward: a model
    that does not beat it has learnt nothing about reward), wm_eval_reward_corr (Pearson; NaN
    when either side is constant), wm_eval_obs_rel_err = RMS(pred - next) / RMS(next - obs)
    (< 1: better than predicting no change), wm_eval_rows.
    """
    pred_reward = np.asarray(pred_reward, dtype=np.float64).reshape(-1)
    reward = np.asarray(reward, dtype=np.float64).reshape(-1)
    mae = float(np.mean(np.abs(pred_reward - reward)))
    const = float(np.mean(np.abs(reward - reward.mean())))
    corr = (
        float(np.corrcoef(pred_reward, reward)[0, 1])
        if pred_reward.std() > 1e-9 and reward.std() > 1e-9
        else float("nan")
    )
    change = float(np.sqrt(np.mean((np.asarray(next_obs) - np.asarray(obs)) ** 2)))
    err = float(np.sqrt(np.mean((np.asarray(pred_obs) - np.asarray(next_obs)) ** 2)))
    return {
        "wm_eval_reward_mae": mae,
        "wm_eval_reward_mae_const": const,
        "wm_eval_reward_corr": corr,
        "wm_eval_obs_rel_err": err / change if change > 0 else float("nan"),
        "wm_eval_rows": float(reward.size),
    }


def _row_chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _concat_replies(replies: list[dict]) -> dict[str, np.ndarray | None]:
    keys = ("obs", "reward", "terminated", "uncertainty", "obs_std")
    out: dict[str, Any] = {}
    for key in keys:
        parts = [r.get(key) for r in replies]
        out[key] = (
            None
            if any(p is None for p in parts)
            else np.concatenate([np.asarray(p) for p in parts])
        )
    out["expert_load"] = replies[0].get("expert_load")
    return out
