"""Imagination from the served world model, gated by the central coherence gate.

``ServedWorldModelImaginer`` is the imagination provider of MBMAPPO
(moedream.policies.imagination.ImaginationProvider) that the main job uses:

- ``imagine``: closed-loop rollouts under the CURRENT planner. Each step sends one batched
  request to the Serve deployment (``imagine`` with horizon 1 and the imagined steps so far as
  context), so the planner acts on imagined observations, and the world model conditions on
  the whole imagined history;
- with ``imagination.memory``, a round branches from the latest real episodes WITH their
  memory: ``imagination.memory_branches`` real prefixes are posted to the deployment's
  episode memory (``remember_episode``: spatial memory + a LoRA adapter per prefix), every row
  starts at its branch's latest real observation and each step's request names the branch's
  episode id, so the served memory experts compose into the rollout (the rows the algorithm
  sampled only set how many rollouts to return). Episode memory is per replica: use one;
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
  fine-tuned on the original + new real windows and hot-swapped into the deployment
  (moedream.platform.served_retrain.ServedModelRetrainer); with ``retrain_in_background`` the
  fine-tune runs in a Ray task and ``swap_retrained`` serves it at the next iteration's start;
- after every swap, the gate's model terms are recalibrated on the new model's view of the
  store's rolling hold-out of real episodes (every ``holdout_every``-th one, never trained
  on), as the gate stage calibrated them for the first model: a retrained model's ensemble
  disagreement and error have their own scale (``gate_recalibrate``).

Every request to the deployment is built by moedream.platform.serve.request.imagine_request.
Every remote call (Serve handle, gate actor) is retried with backoff and a timeout per attempt
(moedream.platform.retry, settings ``retry``); when the retries run out the call raises
moedream.policies.imagination.ProviderFailure and MBMAPPO goes on without it (docs/faults.md).
A failed retrain keeps the served checkpoint (rolled back if the swap got half way).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from moedream.coherence.actor_config import ACTOR_NAME, NAMESPACE
from moedream.config import ConfigBase, ConfigError, check, check_choice, check_positive, is_int
from moedream.data.episodes import episode_windows
from moedream.envs.spec import EnvSpec
from moedream.platform.retrain import (
    RealEpisodeStore,
    concat_windows,
    ensure_log_handler,
    episode_from_rllib,
    logger,
)
from moedream.platform.retry import RemoteCallFailed, RetryConfig, call_with_retries
from moedream.platform.serve.deploy import push_checkpoint, served_checkpoint
from moedream.platform.serve.names import APP_NAME, DEPLOYMENT_NAME
from moedream.platform.serve.request import episode_request, imagine_request
from moedream.platform.serve.runner import Failure, LoadedModel, execute_batch, load_checkpoint
from moedream.platform.serve.schemas import RequestError, ServeConfig, parse_imagine
from moedream.platform.served_retrain import ServedModelRetrainer
from moedream.policies.imagination import ProviderFailure
from moedream.world_model.cached_rollout import CachedContextRollout, supports_cached_context
from moedream.world_model.evaluation import eval_windows, prediction_scores
from moedream.world_model.model import PREDICTIONS, WorldModel
from moedream.world_model.trajectory import OPTIONAL_STEP_FIELDS, Trajectories

T = TypeVar("T")
# Errors that fail the same way on every attempt (bad input, a bug): raised at once, not retried.
NO_RETRY = (ConfigError, RequestError, TypeError, AttributeError, KeyError, IndexError)


@dataclasses.dataclass
class ServedWorldModelImaginerFactory(ConfigBase):
    """Picklable factory (the algorithm builds its provider in setup()), and the provider's
    settings, retraining included. Validated on construction (ConfigError naming the field).

    Retraining (MBMAPPO ``world_model_retrain_every`` > 0) needs ``checkpoint_dir``; with
    ``base_data_path`` the fine-tune mixes the original episodes with the new real ones.
    """

    env_name: str = ""
    app_name: str = APP_NAME
    deployment_name: str = DEPLOYMENT_NAME
    gate_actor_name: str = ACTOR_NAME
    gate_namespace: str = NAMESPACE
    policy_id: str = "team"
    max_rows: int = 256
    """Rows per Serve request (the deployment's max_batch)."""
    imagine_in_process: bool = False
    """Compute the imagine requests' answers in this process on the checkpoint the deployment
    serves (the same rollouts for the same seed; up to float rounding with ``context_cache``)
    instead of sending every imagined step to Serve: per round one Serve call
    (which checkpoint is served) instead of horizon x ceil(rows / max_rows) round trips. For
    runs on one machine; the gate's re-imaginations and the held-out scoring still use Serve.
    Not with episode memory (imagination.memory), which lives in the replica."""
    context_cache: bool = True
    """With imagine_in_process: encode each imagined step once and keep its attention keys and
    values for the later steps (moedream/world_model/cached_rollout.py) instead of re-encoding
    the whole context every step as a stateless request does: the same rollouts up to float
    rounding, for less compute. False runs the replica's own code (bit-identical to Serve).
    Used where the model allows it (``supports_cached_context``), else the replica's code."""
    prediction: str = "sample"
    """How the served model predicts each imagined next observation: "sample" (a draw of its
    diffusion head) or "mean" (its regressed mean alone: the ablation of diffusion). The
    gate's re-imaginations and the held-out scoring use the same."""
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
    retrain_in_background: bool = False
    """Fine-tune in a Ray task while the team samples and learns, and serve the result at the
    start of the next iteration (waiting for it if needed); false = fine-tune in the algorithm
    process and serve it before this iteration imagines."""
    retrain_num_cpus: float = 1.0
    """Ray CPUs the background fine-tune asks for."""
    retrain_timeout_s: float = 1800.0
    """Longest wait for a background fine-tune at the next iteration; past it the fine-tune is
    cancelled and counted as a failed retrain (the old model stays served)."""
    swap_timeout_s: float = 180.0
    """How long to wait for the deployment to serve a new checkpoint."""
    progress: bool = False
    """tqdm bar during the fine-tune (a one-line log is written either way)."""
    gate_refit: bool = True
    """Every iteration, refit the coherence gate's φ on the episode store (the agents' own
    real episodes): φ fitted once on the random collection rejects more and more imagination
    as the team's real motion leaves random play behind. Before each refit the new episodes'
    real H-step windows are judged (uncounted): provider/gate_real_approve_rate."""
    gate_recalibrate: bool = True
    """After every retrain's swap, recalibrate the gate's model terms on the new model's view of
    held-out real windows (the store's rolling hold-out; moedream/coherence/kernel.py,
    section 6). Only where the gate is used; False keeps the first model's calibration."""
    holdout_every: int = 10
    """With gate_recalibrate: every this-many-th real episode (or chunk) goes to the rolling
    hold-out instead of the retrain data."""
    holdout_max_steps: int = 4000
    """Real steps the rolling hold-out keeps (the newest)."""
    gate_calibration_windows: int = 256
    """Most held-out windows (the newest, of the imagination horizon) per recalibration."""
    eval_rows: int = 256
    """Held-out one-step predictions scored on each iteration's new real episodes before they
    are stored (provider/wm_eval_* metrics); 0 = do not score."""
    retry: RetryConfig = dataclasses.field(default_factory=RetryConfig)
    """Attempts, timeout per attempt and backoff of every Serve handle and gate actor call."""

    def __post_init__(self) -> None:
        if isinstance(self.retry, dict):  # keyword construction with a mapping
            self.retry = RetryConfig.from_dict(self.retry, prefix=f"{type(self).__name__}.retry.")
        self.validate(f"{type(self).__name__}.")

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check(bool(self.env_name), f"{prefix}env_name", self.env_name, "must name the env")
        for name in ("app_name", "deployment_name", "gate_actor_name", "gate_namespace"):
            value = getattr(self, name)
            check(isinstance(value, str) and bool(value), f"{prefix}{name}", value,
                  "must be a non-empty string")  # fmt: skip
        for name in ("max_rows", "store_max_steps", "retrain_steps", "retrain_batch_size",
                     "holdout_every", "holdout_max_steps", "gate_calibration_windows"):  # fmt: skip
            value = getattr(self, name)
            check(is_int(value) and value > 0, f"{prefix}{name}", value, "must be an integer > 0")
        for name in ("retrain_warmup", "retrain_window", "eval_rows"):
            value = getattr(self, name)
            check(is_int(value) and value >= 0, f"{prefix}{name}", value,
                  "must be an integer >= 0")  # fmt: skip
        check_choice(f"{prefix}prediction", self.prediction, PREDICTIONS)
        for name in (
            "gate_refit",
            "gate_recalibrate",
            "retrain_in_background",
            "imagine_in_process",
            "context_cache",
        ):
            value = getattr(self, name)
            check(isinstance(value, bool), f"{prefix}{name}", value, "must be true or false")
        check_positive(f"{prefix}retrain_num_cpus", self.retrain_num_cpus)
        check_positive(f"{prefix}retrain_lr", self.retrain_lr)
        check_positive(f"{prefix}swap_timeout_s", self.swap_timeout_s)
        check_positive(f"{prefix}retrain_timeout_s", self.retrain_timeout_s)
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
        """Cross-field check against MBMAPPOConfig.imagination.world_model_retrain_every."""
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
        check(
            not (self.imagine_in_process and config.imagination.memory),
            "imagination.world_model.imagine_in_process",
            self.imagine_in_process,
            "cannot compose episode memory (it lives in the Serve replica): set it to false, "
            "or imagination.memory: false",
        )
        return ServedWorldModelImaginer(
            spec=EnvSpec.from_json(config.env_spec_json),
            horizon=config.imagination.horizon,
            seed=config.seed or 0,
            factory=self,
            refit_gate=self.gate_refit and config.imagination.gate,
            recalibrate_gate=self.gate_recalibrate and config.imagination.gate,
            memory_branches=config.imagination.memory_branches if config.imagination.memory else 0,
        )


@dataclasses.dataclass
class Branches:
    """Where one round's memory-composed rollouts start: one posted real prefix per branch."""

    episode_ids: list[str]  # [n] the ids the prefixes were posted under
    start: np.ndarray  # [B, N, D] each row's start: its branch's latest real observation
    rows: list[np.ndarray]  # n contiguous, ordered arrays of the rows (into B) of each branch


class ServedWorldModelImaginer:
    def __init__(
        self,
        *,
        spec: EnvSpec,
        horizon: int,
        seed: int,
        factory: ServedWorldModelImaginerFactory,
        refit_gate: bool = False,
        recalibrate_gate: bool = False,
        memory_branches: int = 0,
    ):
        self.spec, self.horizon, self.factory = spec, int(horizon), factory
        self.memory_branches = int(memory_branches)  # 0: imagine without episode memory
        self._branch_sources: list[Any] = []  # the latest real episodes (Episode), to branch from
        self.refit_gate = refit_gate  # the factory's gate_refit, when the gate is used at all
        self.recalibrate_gate = recalibrate_gate  # the same for gate_recalibrate
        self._seed = int(seed)
        self._calls = 0
        self._last: dict[str, float] = {}
        self.store = RealEpisodeStore(
            spec,
            factory.store_max_steps,
            factory.episode_dir,
            holdout_every=factory.holdout_every if recalibrate_gate else 0,
            holdout_max_steps=factory.holdout_max_steps,
        )
        self.retrainer = ServedModelRetrainer(
            spec=spec, seed=self._seed, settings=factory, store=self.store
        )
        self._skipped_episodes = 0
        self._eval_window: int | None = None
        self._gate_normalizer: dict[str, Any] | None = None  # our last refit (for checkpoints)
        self._gate_restored = False  # set_state gave a refit the actor may not have
        self._local: LoadedModel | None = None  # the served checkpoint, for imagine_in_process
        ensure_log_handler()

    # -------------------------------------------------------------------------- imagine

    def imagine(self, start_obs: np.ndarray, policy: Any) -> Trajectories:
        """start_obs [B, N, D] -> Trajectories of ``horizon`` steps, actions from ``policy``
        (with episode memory: B rollouts from posted real prefixes instead, see the module
        docstring). Raises ProviderFailure("imagine") when a step's request fails for good."""
        self._calls += 1
        handle = self._remote("imagine", "the world-model handle", lambda _: self._deployment())
        if self.factory.imagine_in_process:
            self._load_served(handle)
        branches = self._post_branches(handle, len(start_obs)) if self.memory_branches else None
        if branches is not None:
            start_obs = branches.start
        h = self.horizon
        obs = [np.asarray(start_obs, dtype=np.float32)]  # list of [B, N, D]
        actions, rewards, terms, loads = [], [], [], []
        model_outputs: dict[str, list[np.ndarray]] = {k: [] for k in OPTIONAL_STEP_FIELDS}
        cached = self._cached_rollout(obs[0]) if branches is None else None
        for t in range(h):
            encoded = self.spec.encode_actions(policy.act(obs[-1]))  # [B, N, A]
            seed = (self._seed * 1_000_003 + self._calls * 1009 + t) % 2**31
            out = (
                cached.step(encoded, seed)
                if cached is not None
                else self._one_step(
                    "imagine",
                    handle,
                    obs[-1],
                    encoded[:, None],  # [B, 1, N, A]: one step
                    # the imagined steps so far are the model's context
                    context_obs=np.stack(obs[:-1], 1) if t else None,  # [B, t, N, D]
                    context_actions=np.stack(actions, 1) if t else None,  # [B, t, N, A]
                    seed=seed,
                    branches=branches,
                )
            )
            obs.append(out["obs"][:, 1])
            actions.append(encoded)
            rewards.append(out["reward"][:, 0])
            terms.append(out["terminated"][:, 0])
            for key, steps in model_outputs.items():  # uncertainty, the ensemble's outputs
                if out.get(key) is not None:
                    steps.append(out[key][:, 0])
            if out.get("expert_load") is not None:
                loads.append(out["expert_load"])
        trajs = Trajectories(
            obs=np.stack(obs, 1),  # [B, H+1, N, D]
            action=np.stack(actions, 1),  # [B, H, N, A]
            reward=np.stack(rewards, 1),  # [B, H, N]
            terminated=np.stack(terms, 1),  # [B, H, N]
            expert_load=np.mean(loads, 0) if loads else None,  # [L, E]
            **{k: np.stack(v, 1) if len(v) == h else None for k, v in model_outputs.items()},
        )
        self._last["uncertainty_mean"] = float(np.mean(trajs.uncertainty))
        self._last["imagined_reward_mean"] = float(np.mean(trajs.reward[..., 0]))
        if trajs.expert_load is not None:
            self._expert_load = trajs.expert_load
        return trajs

    def _cached_rollout(self, start: np.ndarray) -> CachedContextRollout | None:
        """The in-process rollout that encodes each step once (``context_cache``), where the
        loaded model allows it; None: every step runs the replica's code."""
        loaded = self._local
        if not (self.factory.imagine_in_process and self.factory.context_cache):
            return None
        assert loaded is not None  # imagine() loads it first
        if not supports_cached_context(loaded.model, self.horizon):
            return None
        return CachedContextRollout(
            loaded.model, start, chunk_rows=self.factory.max_rows,
            prediction=self.factory.prediction,
        )  # fmt: skip

    def set_branch_sources(self, episodes: list[Any]) -> None:
        """The real episodes (moedream.data.Episode) memory-composed rounds branch from (the
        iteration's new episodes, set by :meth:`observe`)."""
        self._branch_sources = [e for e in episodes if e.length >= 2]

    def _post_branches(self, handle: Any, rows: int) -> Branches | None:
        """Post ``memory_branches`` real prefixes (a random episode of the latest ones, cut
        after a random step) to the deployment's episode memory, under ids unique to this
        call; None (plain imagination) before any real episode was observed."""
        sources = self._branch_sources
        if not sources:
            return None
        rng = np.random.default_rng((self._seed * 15_485_863 + self._calls) % 2**31)
        n = min(self.memory_branches, rows)
        ids, starts, start_time = [], [], time.perf_counter()
        for j in range(n):
            episode = sources[int(rng.integers(len(sources)))]
            t = int(rng.integers(1, episode.length))  # branch after t real steps, 1 <= t < L
            ids.append(f"branch-{self._seed}-{self._calls}-{j}")
            body = episode_request(
                ids[-1], episode.obs[: t + 1], episode.action[:t], seed=self._seed + j
            )
            self._post_episode(handle, body)
            starts.append(episode.obs[t])
        groups = np.array_split(np.arange(rows), n)  # contiguous rows per branch
        start = np.stack([starts[j] for j, group in enumerate(groups) for _ in group])
        self._last["memory_branches"] = float(n)
        self._last["memory_post_seconds"] = time.perf_counter() - start_time
        return Branches(ids, start.astype(np.float32), groups)

    def _post_episode(self, handle: Any, body: dict[str, Any]) -> None:
        def attempt(timeout_s: float) -> Any:
            return handle.remember_episode.remote(body).result(timeout_s=timeout_s)

        self._remote("imagine", f"Serve {self.factory.app_name} episode post", attempt)

    def _deployment(self) -> Any:
        """The deployment's handle; after a restore, it serves this run's checkpoint first."""
        from ray import serve

        self.retrainer.ensure_restored()
        return serve.get_deployment_handle(
            self.factory.deployment_name, app_name=self.factory.app_name
        )

    def _one_step(
        self,
        stage: str,
        handle: Any,
        start: np.ndarray,
        action: np.ndarray,
        *,
        context_obs: np.ndarray | None,
        context_actions: np.ndarray | None,
        seed: int,
        branches: Branches | None = None,
    ) -> dict[str, np.ndarray | None]:
        """The deployment's next step from start [B, N, D] under action [B, 1, N, A], after the
        context [B, T, ...] (or none), in requests of at most ``max_rows`` rows (with
        ``branches``: of one branch each, naming its episode id). Retried as a whole (same
        seed: a retry gives the same answer); ProviderFailure(stage) at the end."""
        groups = [(None, np.arange(len(start)))]
        if branches is not None:
            groups = list(zip(branches.episode_ids, branches.rows, strict=True))
        requests = []  # the groups are contiguous and in order: replies concatenate in row order
        for episode_id, group in groups:
            for chunk in _row_chunks(len(group), self.factory.max_rows):
                rows = group[chunk]
                requests.append(imagine_request(
                    start[rows], action[rows], horizon=1, seed=seed,
                    context_obs=_take(context_obs, rows),
                    context_actions=_take(context_actions, rows), episode_id=episode_id,
                    prediction=self.factory.prediction,
                ))  # fmt: skip

        if self.factory.imagine_in_process and stage == "imagine":
            return self._imagine_here(requests)

        def attempt(timeout_s: float) -> dict[str, np.ndarray | None]:
            replies = [handle.imagine.remote(request) for request in requests]
            try:
                return _concat_replies(_results_by(replies, time.monotonic() + timeout_s))
            finally:
                for reply in replies:  # a failed attempt leaves no request behind
                    reply.cancel()

        return self._remote(stage, f"Serve {self.factory.app_name} imagine request", attempt)

    def _load_served(self, handle: Any) -> None:
        """Load the checkpoint the deployment serves into this process, unless loaded already
        (a retrain's hot swap changes its id)."""
        served = self._remote(
            "imagine",
            f"Serve {self.factory.app_name} info",
            lambda timeout_s: handle.info.remote().result(timeout_s=timeout_s)["checkpoint"],
        )
        if self._local is None or self._local.checkpoint_id != served["id"]:
            # building the module draws its initial weights from torch's global RNG, which the
            # team's action sampling uses too: keep that stream as the Serve path leaves it
            with torch.random.fork_rng(devices=[]):
                self._local = load_checkpoint(served["path"])

    def _imagine_here(self, requests: list[dict[str, Any]]) -> dict[str, np.ndarray | None]:
        """The replica's imagine code (parse_imagine, execute_batch) on ``requests``, run in
        this process on the served checkpoint; ProviderFailure("imagine") if one fails."""
        loaded = self._local
        assert loaded is not None  # imagine() loads it first
        limits = ServeConfig(checkpoint=loaded.path, max_batch=self.factory.max_rows)
        spec, config = loaded.model.spec, loaded.model.config
        jobs = [parse_imagine(request, spec, config, limits) for request in requests]
        results = execute_batch(loaded, jobs)
        failed = [r.error for r in results if isinstance(r, Failure)]
        if failed:
            raise ProviderFailure("imagine", type(failed[0]).__name__, str(failed[0]))
        return _concat_replies(results)

    def _remote(self, stage: str, what: str, call: Callable[[float], T]) -> T:
        """``call(timeout_s)`` with the factory's retries; ProviderFailure(stage) at the end."""
        try:
            return call_with_retries(call, what=what, config=self.factory.retry, no_retry=NO_RETRY)
        except RemoteCallFailed as err:
            raise ProviderFailure(stage, err.cause, str(err)) from err

    def _gate_call(self, stage: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """One gate actor call (``ray.get`` within the attempt's timeout), retried."""
        import ray

        def attempt(timeout_s: float) -> Any:
            return ray.get(getattr(self._gate_actor(), method).remote(*args, **kwargs),
                           timeout=timeout_s)  # fmt: skip

        return self._remote(stage, f"gate actor {self.factory.gate_actor_name}.{method}", attempt)

    # ----------------------------------------------------------------------------- gate

    def calibrate_value_term(self, residuals: np.ndarray) -> None:
        """Calibrate the gate's reflector term on the team critic's TD residuals of the real
        batch (kernel.py, section 6b); ProviderFailure("gate") when the gate cannot answer."""
        self._push_restored_gate("gate")
        info = self._gate_call("gate", "calibrate_value_term", np.asarray(residuals, np.float32))
        self._last.update({f"gate_{k}": float(v) for k, v in info.items()})

    def gate(self, trajectories: Trajectories) -> Any:
        """The gate's verdicts (GateDecision); ProviderFailure("gate") when it cannot answer."""
        from moedream.coherence.kernel import Verdict
        from moedream.policies.imagination import GateDecision

        self._push_restored_gate("gate")
        result = self._gate_call(
            "gate", "judge_and_refine",
            trajectories, self.spec.env_name, self.factory.policy_id, seed=self._calls,
            prediction=self.factory.prediction,
        )  # fmt: skip
        keep = result.verdicts == Verdict.APPROVE
        truncated = result.truncated if result.truncated is not None else np.zeros_like(keep)
        refined = (result.tries > 0) | truncated  # re-imagined or cut to its coherent prefix
        self._last["gate_h7_mean"] = float(np.mean(result.h7))
        self._last.update(gate_cause_rates(result))
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
        t = windows["action"].shape[1]  # context steps + the predicted one
        out = self._one_step(
            "evaluate",
            self._remote("evaluate", "the world-model handle", lambda _: self._deployment()),
            windows["obs"][:, t - 1],
            windows["action"][:, t - 1 : t],  # the real action
            # the real steps before it are the model's context
            context_obs=windows["obs"][:, : t - 1] if t > 1 else None,
            context_actions=windows["action"][:, : t - 1] if t > 1 else None,
            seed=(self._seed * 7_777 + self._calls) % 2**31,
        )
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
        """The iteration's real RLlib MultiAgentEpisodes -> the episode store (and shards);
        then the gate refit, whose failure (ProviderFailure("observe")) leaves them stored."""
        converted = []
        for episode in episodes:
            try:
                converted.append(episode_from_rllib(episode, self.spec))
            except ValueError as err:  # e.g. an agent that did not act every step
                self._skipped_episodes += 1
                logger.debug("episode store: skipped an episode: %s", err)
        self.store.add(converted)
        if self.memory_branches:
            self.set_branch_sources(converted)
        if self.refit_gate:
            self._judge_real(converted)
        if self.refit_gate and (self.store.episodes or self.store.held_out):
            self._refit_gate()

    def _gate_actor(self) -> Any:
        import ray

        return ray.get_actor(self.factory.gate_actor_name, namespace=self.factory.gate_namespace)

    def _judge_real(self, episodes: list[Any]) -> None:
        """How much of the team's NEW real data (H-step windows) the gate would approve."""
        from moedream.coherence.kernel import Verdict

        parts = [episode_windows(ep, self.spec, self.horizon) for ep in episodes]
        windows = concat_windows([p for p in parts if p])
        if not windows:
            return
        real = Trajectories(obs=windows["obs"], action=windows["action"],
                            reward=windows["reward"], terminated=windows["terminated"])  # fmt: skip
        self._push_restored_gate("observe")
        result = self._gate_call("observe", "judge", real, record=False)
        self._last["gate_real_approve_rate"] = float(np.mean(result.verdicts == Verdict.APPROVE))

    def _refit_gate(self) -> None:
        real = [ep.obs for ep in (*self.store.episodes, *self.store.held_out)]
        info = self._gate_call("observe", "refit", real)
        self._gate_normalizer = self._gate_call("observe", "get_normalizer")
        self._last.update({f"gate_{k}": float(v) for k, v in info.items()})

    def _push_restored_gate(self, stage: str = "gate") -> None:
        """After set_state with a refit φ: give it back to the gate (e.g. a fresh actor)."""
        if self._gate_restored and self._gate_normalizer is not None:
            self._gate_call(stage, "set_normalizer", self._gate_normalizer)
        self._gate_restored = False

    def retrain(self, iteration: int) -> dict[str, float]:
        """Fine-tune the served checkpoint on original + stored real windows, write a new
        versioned checkpoint, and hot-swap it into the Serve deployment (reconfigure).
        Returns every provider metric, or {} when there was nothing to train on yet.

        A failure (the fine-tune, the checkpoint write, a checkpoint that fails its sha256
        check, the swap) raises ProviderFailure("retrain") once the deployment serves the last
        good checkpoint again: imagination goes on from the old model."""
        version = self.retrainer.version
        try:
            metrics = self.retrainer.retrain(iteration)
        except Exception as err:  # noqa: BLE001 - any failure: keep serving the old model
            self._roll_back()
            raise ProviderFailure("retrain", type(err).__name__, str(err)[:500]) from err
        self._last.update(metrics)
        if self.retrainer.version != version:  # a new model is served (not a background start)
            self._recalibrate_gate()
        return {} if metrics["wm_retrain_skipped"] else dict(self._last)

    def swap_retrained(self) -> dict[str, float]:
        """Serve the checkpoint of a background fine-tune (MBMAPPO calls it every iteration,
        first): waits for it if it still runs; {} when none was pending. A failed background
        fine-tune or swap raises ProviderFailure("retrain") as :meth:`retrain` does."""
        version = self.retrainer.version
        try:
            metrics = self.retrainer.swap_retrained()
        except Exception as err:  # noqa: BLE001 - any failure: keep serving the old model
            self._roll_back()
            raise ProviderFailure("retrain", type(err).__name__, str(err)[:500]) from err
        self._last.update(metrics)
        if self.retrainer.version != version:
            self._recalibrate_gate()
        return metrics

    def _recalibrate_gate(self) -> None:
        """The served model changed: recalibrate the gate's model terms on its teacher-forced
        view of the newest held-out real windows (coherence.model_calibration.model_view, as
        the gate stage did for the first model). Skipped, and logged, while the hold-out has
        no window; ProviderFailure("gate") when the gate cannot answer (no imagination is
        judged with the old model's scale then)."""
        from moedream.coherence.model_calibration import context_steps, model_view

        if not self.recalibrate_gate:
            return
        start = time.perf_counter()
        model = WorldModel.load(str(self.retrainer.checkpoint), map_location="cpu")
        steps = context_steps(model, self.horizon)
        windows = self.store.held_out_windows(steps, self.factory.gate_calibration_windows)
        if not windows:
            self._last["gate_model_calibration_skipped"] = 1.0
            logger.info("gate model terms not recalibrated: no held-out real window of %d "
                        "steps yet (%d held-out steps)", steps, self.store.held_out_steps)  # fmt: skip
            return
        view = model_view(model, windows)
        info = self._gate_call("gate", "calibrate_model_terms", view, windows["reward"])
        seconds = time.perf_counter() - start
        self._last.update({f"gate_{k}": float(v) for k, v in info.items()})
        self._last.update(gate_model_calibration_seconds=seconds, gate_model_calibration_skipped=0.0,
                          gate_model_calibration_windows=float(view.batch_size))  # fmt: skip
        logger.info(
            "gate model terms recalibrated on %d held-out real windows of model v%d in %.2f s: "
            "%s", view.batch_size, self.retrainer.version, seconds,
            ", ".join(f"{k} {v:.3g}" for k, v in info.items()),
        )  # fmt: skip

    def close(self) -> None:
        """The run ends (MBMAPPO.stop): cancel a background fine-tune still running."""
        self.retrainer.cancel()

    def _roll_back(self) -> None:
        """Serve the last good checkpoint again if a failed swap changed what is served."""
        good, s = self.retrainer.checkpoint, self.factory
        if good is None:
            return
        served = self._remote("retrain", "served checkpoint",
                              lambda _: served_checkpoint(s.app_name, s.deployment_name))  # fmt: skip
        if served["path"] != good:
            logger.warning("retrain failed: serving the last good checkpoint %s again", good)
            push_checkpoint(good, app_name=s.app_name, deployment_name=s.deployment_name,
                            timeout_s=s.swap_timeout_s)  # fmt: skip

    # --------------------------------------------------------------------- bookkeeping

    def metrics(self) -> dict[str, float]:
        out = dict(self._last)
        out["wm_checkpoint_version"] = float(self.retrainer.version)
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
            **self.retrainer.get_state(),
            "gate_normalizer": self._gate_normalizer,
            "store": self.store.get_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore; a retrained checkpoint in ``state`` is served again (before the next
        imagination) if the deployment serves another one, and the episode store holds the
        real episodes it held (the next retrain trains on the same data)."""
        self._calls = int(state.get("calls", 0))
        self.retrainer.set_state(state)
        if state.get("store") is not None:
            self.store.set_state(state["store"])
        if state.get("gate_normalizer"):  # the gate's refit φ at save time
            self._gate_normalizer = state["gate_normalizer"]
            self._gate_restored = True


def gate_cause_rates(result: Any) -> dict[str, float]:
    """Per cause (coherence.kernel.CAUSES), the batch's fraction of trajectories not approved
    for it before refine (``gate_cause_<cause>_rate``), and the fraction truncated."""
    from moedream.coherence.kernel import CAUSES, Verdict

    b = max(len(result.verdicts), 1)
    truncated = result.truncated if result.truncated is not None else np.zeros(b, dtype=bool)
    first_cause = [
        c if (v != Verdict.APPROVE or t) else ""
        for c, v, t in zip(result.cause or [""] * b, result.verdicts, truncated, strict=False)
    ]
    out = {f"gate_cause_{c}_rate": first_cause.count(c) / b for c in CAUSES}
    out["gate_truncated_rate"] = float(np.sum(truncated)) / b
    return out


def _take(array: np.ndarray | None, rows: Any) -> np.ndarray | None:
    return None if array is None else array[rows]


def _row_chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _results_by(replies: list[Any], deadline: float) -> list[dict]:
    """Every DeploymentResponse's result, all of them by ``deadline`` (time.monotonic)."""
    return [r.result(timeout_s=max(0.0, deadline - time.monotonic())) for r in replies]


def _concat_replies(replies: list[dict]) -> dict[str, np.ndarray | None]:
    keys = ("obs", "reward", "terminated", *OPTIONAL_STEP_FIELDS)
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
