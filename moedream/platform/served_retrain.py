"""Keeping the served world model current during agent training: fine-tune, version, hot-swap.

:class:`ServedModelRetrainer` is the retrain half of the served-world-model imagination provider
(moedream.platform.model_based): it fine-tunes the SERVED checkpoint on the original + the
stored real windows (moedream.platform.retrain; :func:`run_fine_tune`, in this process or, with
``retrain_in_background``, in a Ray task while the team samples and learns), writes it to
``<checkpoint_dir>/retrain_<iteration>/`` and hot-swaps it into the Serve deployment
(moedream.platform.serve.deploy.push_checkpoint: a user_config-only declarative deploy ->
``reconfigure``). After a restore it serves the run's own checkpoint again.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moedream.config import ConfigError
from moedream.envs.spec import EnvSpec
from moedream.platform.retrain import (
    RealEpisodeStore,
    fine_tune,
    logger,
    write_versioned_checkpoint,
)
from moedream.platform.serve.deploy import push_checkpoint, served_checkpoint
from moedream.platform.serve.runner import checkpoint_fingerprint
from moedream.world_model.model import WorldModel
from moedream.world_model.train_local import TrainConfig

if TYPE_CHECKING:
    from moedream.platform.model_based import ServedWorldModelImaginerFactory


@dataclasses.dataclass
class FineTuneJob:
    """Everything one fine-tune needs, so it can run in this process or in a Ray task."""

    source: str
    """The checkpoint to fine-tune from."""
    new_windows: dict[str, np.ndarray]
    """Training windows of the stored real episodes (moedream.platform.retrain format)."""
    base_windows: dict[str, np.ndarray] | None
    """The original training windows mixed into every batch (None: new windows only)."""
    train: TrainConfig
    new_fraction: float
    device: str
    progress: bool
    checkpoint_dir: str
    iteration: int
    version: int
    """The version the new checkpoint will be served as."""
    num_threads: int | None = None
    """torch intra-op threads while fine-tuning (None: leave the process's setting)."""


def run_fine_tune(job: FineTuneJob) -> tuple[str, dict[str, Any]]:
    """Load ``job.source``, fine-tune it, write the versioned checkpoint; returns (its weights
    file, the retrain info). Plain PyTorch: the same call runs in the driver or a Ray task."""
    if job.num_threads:
        torch.set_num_threads(job.num_threads)
    model = WorldModel.load(job.source, map_location=job.device)
    result = fine_tune(
        model,
        job.new_windows,
        job.train,
        base_windows=job.base_windows,
        new_fraction=job.new_fraction,
        progress=job.progress,
    )
    info = {
        "iteration": job.iteration,
        "version": job.version,
        "source_checkpoint": job.source,
        "new_windows": len(job.new_windows["obs"]),
        "base_windows": len(job.base_windows["obs"]) if job.base_windows else 0,
        "train": job.train.to_dict(),
        **result,
    }
    path = write_versioned_checkpoint(model, job.checkpoint_dir, job.iteration, info)
    return str(path), info


@dataclasses.dataclass
class PendingFineTune:
    """A fine-tune running in a background Ray task."""

    ref: Any  # ObjectRef of run_fine_tune's (path, info)
    iteration: int


class ServedModelRetrainer:
    """Which checkpoint this run serves, and the fine-tune that replaces it.

    With ``settings.retrain_in_background`` the fine-tune runs in a Ray task while the team
    samples and learns; :meth:`swap_retrained` serves its checkpoint at the start of the next
    iteration, waiting for it if it is still running (so the swap point, and the run, never
    depend on how fast the machine is). The chain of checkpoints is the one of the in-process
    fine-tune (same source, data and seed); imagination uses each one an iteration later.
    """

    def __init__(
        self,
        *,
        spec: EnvSpec,
        seed: int,
        settings: ServedWorldModelImaginerFactory,
        store: RealEpisodeStore,
    ):
        self.spec, self.settings, self.store = spec, settings, store
        self._seed = int(seed)
        self.checkpoint: str | None = None  # the served checkpoint (None: not asked yet)
        self.checkpoint_id: str | None = None
        self.version = 0  # retrained checkpoints pushed so far
        self._restored = False  # set_state gave a checkpoint that may not be served yet
        self._base_windows: dict[str, np.ndarray] | None = None
        self._base_ref: Any = None  # the base windows in the object store (background mode)
        self._window: int | None = None
        self._pending: PendingFineTune | None = None

    def retrain(self, iteration: int) -> dict[str, float]:
        """Fine-tune the served checkpoint on original + stored real windows, write a new
        versioned checkpoint and serve it, or (in the background) start that fine-tune.
        Returns the wm_retrain_* metrics (wm_retrain_skipped = 1 when no stored episode is long
        enough for a window yet)."""
        metrics = self.swap_retrained()  # a fine-tune still running is the source: wait for it
        start = time.perf_counter()
        job = self._job(iteration)
        if job is None:
            return {**metrics, "wm_retrain_skipped": 1.0}
        if self.settings.retrain_in_background:
            self._pending = PendingFineTune(self._submit(job), iteration)
            return {**metrics, "wm_retrain_skipped": 0.0}
        path, info = run_fine_tune(job)
        return self._serve(path, info, time.perf_counter() - start, wait=0.0)

    def swap_retrained(self) -> dict[str, float]:
        """Serve the background fine-tune's checkpoint, waiting for it if it still runs;
        returns its metrics ({} when none was pending)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return {}
        waited = time.perf_counter()
        path, info = wait_for_fine_tune(pending, self.settings.retrain_timeout_s)
        waited = time.perf_counter() - waited
        # its own fine-tune seconds (the time since its start includes a whole iteration)
        return self._serve(path, info, info["seconds"], wait=waited)

    def cancel(self) -> None:
        """Stop a background fine-tune that will never be served (the run ends)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            import ray

            ray.cancel(pending.ref, force=True)
            logger.info("world model retrain @ iteration %d cancelled", pending.iteration)

    def _job(self, iteration: int) -> FineTuneJob | None:
        """The next fine-tune of the served checkpoint, or None while no window is stored."""
        s = self.settings
        s.check_retrain(1)
        source = self.source_checkpoint()
        window = self._retrain_window(source)
        new = self.store.windows(window)
        if not new:
            logger.info(
                "world model retrain @ iteration %d skipped: no real episode of >= %d steps yet",
                iteration,
                window,
            )
            return None
        return FineTuneJob(
            source=source,
            new_windows=new,
            base_windows=None if s.retrain_in_background else self._base(window),
            train=self._train_config(window, iteration),
            new_fraction=s.retrain_new_fraction,
            device=s.retrain_device or ("cuda" if torch.cuda.is_available() else "cpu"),
            progress=s.progress and not s.retrain_in_background,
            checkpoint_dir=str(s.checkpoint_dir),
            iteration=iteration,
            version=self.version + 1,
            num_threads=torch.get_num_threads(),  # as the in-process fine-tune: same numbers
        )

    def _submit(self, job: FineTuneJob) -> Any:
        """Start ``job`` in a Ray task (the base windows go to the object store once)."""
        import ray

        base = self._base(job.train.window)
        if base is not None and self._base_ref is None:
            self._base_ref = ray.put(base)
        task = ray.remote(_fine_tune_with_base).options(
            num_cpus=self.settings.retrain_num_cpus, max_retries=0
        )
        return task.remote(job, self._base_ref)

    def _serve(self, path: str, info: dict[str, Any], seconds: float, wait: float) -> dict:
        """Hot-swap the fine-tuned checkpoint into the deployment; the wm_retrain_* metrics."""
        s = self.settings
        served_id = push_checkpoint(
            path,
            app_name=s.app_name,
            deployment_name=s.deployment_name,
            timeout_s=s.swap_timeout_s,
        )
        self.checkpoint, self.checkpoint_id = path, served_id
        self.version += 1
        logger.info(
            "world model retrain @ iteration %d: %d steps on %d new + %d base windows, loss "
            "%.4f -> %.4f, %.1f s%s; serving v%d %s (%s)",
            info["iteration"], info["steps"], info["new_windows"], info["base_windows"],
            info["loss_first"], info["loss_last"], seconds,
            f" in the background (waited {wait:.1f} s)" if s.retrain_in_background else "",
            self.version, path, served_id,
        )  # fmt: skip
        return {
            "wm_retrain_loss": info["loss"],
            "wm_retrain_loss_first": info["loss_first"],
            "wm_retrain_seconds": seconds,
            "wm_retrain_wait_seconds": wait,
            "wm_retrain_new_windows": float(info["new_windows"]),
            "wm_retrain_skipped": 0.0,
        }

    def _retrain_window(self, source: str) -> int:
        """Transitions per training window (the model's context unless set; read once)."""
        if self.settings.retrain_window:
            return self.settings.retrain_window
        if self._window is None:
            model = WorldModel.load(source, map_location="cpu")
            self._window = int(model.config.backbone.max_context)
        return self._window

    def _train_config(self, window: int, iteration: int) -> TrainConfig:
        s = self.settings
        return TrainConfig(
            steps=s.retrain_steps,
            batch_size=s.retrain_batch_size,
            window=window,
            lr=s.retrain_lr,
            warmup=s.retrain_warmup,
            lr_schedule="constant",
            holdout=0.0,
            seed=(self._seed * 7919 + iteration) % 2**31,
        )

    def _base(self, window: int) -> dict[str, np.ndarray] | None:
        """The original training windows (read once, then cached), or None."""
        path = self.settings.base_data_path
        if path is None:
            return None
        if self._base_windows is None:
            from moedream.data import load_windows

            spec, train, _ = load_windows(path, window, holdout=0.0)
            if spec.obs_dim != self.spec.obs_dim or spec.agent_ids != self.spec.agent_ids:
                raise ConfigError(
                    f"ServedWorldModelImaginerFactory.base_data_path = {path!r} holds "
                    f"{spec.env_name} agents {spec.agent_ids} (obs {spec.obs_dim}), but the "
                    f"agents train on {self.spec.env_name} {self.spec.agent_ids} "
                    f"(obs {self.spec.obs_dim})"
                )
            self._base_windows = train
        return self._base_windows

    def ensure_restored(self) -> None:
        """After set_state with a retrained checkpoint: serve it again if the deployment serves
        another one (e.g. the run was restored on a fresh deployment of the base model)."""
        if self.checkpoint is None or not self._restored:
            return
        self._restored = False
        s = self.settings
        if (
            served_checkpoint(s.app_name, s.deployment_name)["id"]
            != checkpoint_fingerprint(self.checkpoint)[0]
        ):
            logger.info("serving the restored world-model checkpoint %s again", self.checkpoint)
            self.checkpoint_id = push_checkpoint(
                self.checkpoint,
                app_name=s.app_name,
                deployment_name=s.deployment_name,
                timeout_s=s.swap_timeout_s,
            )

    def source_checkpoint(self) -> str:
        """The checkpoint to fine-tune from: ours (after a restore, served again first), else
        the one the deployment reports."""
        self.ensure_restored()
        if self.checkpoint is None:
            info = served_checkpoint(self.settings.app_name, self.settings.deployment_name)
            self.checkpoint, self.checkpoint_id = info["path"], info["id"]
        return self.checkpoint

    def get_state(self) -> dict[str, Any]:
        """The served checkpoint. A background fine-tune still running is not in it: a run
        restored from this state fine-tunes again from the served checkpoint."""
        return {
            "checkpoint": self.checkpoint,
            "checkpoint_id": self.checkpoint_id,
            "checkpoint_version": self.version,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore; a retrained checkpoint in ``state`` is served again (on the next
        ``ensure_restored``) if the deployment serves another one."""
        self.version = int(state.get("checkpoint_version", 0))
        if state.get("checkpoint"):
            self.checkpoint = str(state["checkpoint"])
            self.checkpoint_id = state.get("checkpoint_id")
            self._restored = self.version > 0


def _fine_tune_with_base(job: FineTuneJob, base_windows: Any) -> tuple[str, dict[str, Any]]:
    """The Ray task body: ``run_fine_tune`` with the base windows from the object store (Ray
    resolves the top-level ObjectRef argument; None when there are none)."""
    return run_fine_tune(dataclasses.replace(job, base_windows=base_windows))


def wait_for_fine_tune(pending: PendingFineTune, timeout_s: float) -> tuple[str, dict]:
    """A background fine-tune's (checkpoint path, info), within ``timeout_s``: a hung fine-tune
    is cancelled and raised rather than stalling the run (the provider then keeps the old model
    served and counts a failed retrain)."""
    import ray

    try:
        return ray.get(pending.ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(pending.ref, force=True)
        raise TimeoutError(
            f"the background world-model fine-tune started at iteration {pending.iteration} did "
            f"not finish within imagination.world_model.retrain_timeout_s = {timeout_s} s and "
            "was cancelled; raise retrain_timeout_s for a larger model or more retrain_steps"
        ) from None
