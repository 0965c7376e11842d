"""Keeping the served world model current during agent training: fine-tune, version, hot-swap.

:class:`ServedModelRetrainer` is the retrain half of the served-world-model imagination provider
(moedream.platform.model_based): it fine-tunes the SERVED checkpoint in this process on the
original + the stored real windows (moedream.platform.retrain), writes it to
``<checkpoint_dir>/retrain_<iteration>/`` and hot-swaps it into the Serve deployment
(moedream.platform.serve.deploy.push_checkpoint: a user_config-only declarative deploy ->
``reconfigure``). After a restore it serves the run's own checkpoint again.
"""

from __future__ import annotations

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


class ServedModelRetrainer:
    """Which checkpoint this run serves, and the fine-tune that replaces it."""

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

    def retrain(self, iteration: int) -> dict[str, float]:
        """Fine-tune the served checkpoint on original + stored real windows, write a new
        versioned checkpoint and serve it. Returns the wm_retrain_* metrics
        (wm_retrain_skipped = 1 when no stored episode is long enough for a window yet)."""
        start = time.perf_counter()
        s = self.settings
        s.check_retrain(1)
        source = self.source_checkpoint()
        device = s.retrain_device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = WorldModel.load(source, map_location=device)
        window = s.retrain_window or model.config.backbone.max_context
        new = self.store.windows(window)
        if not new:
            logger.info(
                "world model retrain @ iteration %d skipped: no real episode of >= %d steps yet",
                iteration,
                window,
            )
            return {"wm_retrain_skipped": 1.0}
        cfg = self._train_config(window, iteration)
        base = self._base(window)
        result = fine_tune(
            model,
            new,
            cfg,
            base_windows=base,
            new_fraction=s.retrain_new_fraction,
            progress=s.progress,
        )
        info = {
            "iteration": iteration,
            "version": self.version + 1,
            "source_checkpoint": source,
            "new_windows": len(new["obs"]),
            "base_windows": len(base["obs"]) if base else 0,
            "train": cfg.to_dict(),
            **result,
        }
        path = write_versioned_checkpoint(model, s.checkpoint_dir, iteration, info)
        served_id = push_checkpoint(
            str(path),
            app_name=s.app_name,
            deployment_name=s.deployment_name,
            timeout_s=s.swap_timeout_s,
        )
        self.checkpoint, self.checkpoint_id = str(path), served_id
        self.version += 1
        seconds = time.perf_counter() - start
        logger.info(
            "world model retrain @ iteration %d: %d steps on %d new + %d base windows, loss "
            "%.4f -> %.4f, %.1f s; serving v%d %s (%s)",
            iteration, cfg.steps, info["new_windows"], info["base_windows"],
            result["loss_first"], result["loss_last"], seconds, self.version, path, served_id,
        )  # fmt: skip
        return {
            "wm_retrain_loss": result["loss"],
            "wm_retrain_loss_first": result["loss_first"],
            "wm_retrain_seconds": seconds,
            "wm_retrain_new_windows": float(info["new_windows"]),
            "wm_retrain_skipped": 0.0,
        }

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
