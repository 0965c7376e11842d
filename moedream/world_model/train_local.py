"""Single-process world-model training: the step function (reused by the Ray Train trainer),
evaluation against naive baselines, and a local loop with tqdm, TensorBoard and checkpoints.

TensorBoard keys: ``wm/*`` and ``moe/*`` (losses, expert loads), ``train/lr``,
``train/grad_norm``, ``perf/tokens_per_s``, ``eval/*`` (one-step errors vs baselines).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from moedream.config import (
    ConfigBase,
    check,
    check_fraction,
    check_positive,
    check_positive_ints,
)
from moedream.world_model.model import WorldModel, WorldModelConfig
from moedream.world_model.specialisation import specialisation_logs
from moedream.world_model.trajectory import WINDOW_KEYS


@dataclasses.dataclass
class TrainConfig(ConfigBase):
    steps: int = 2000
    batch_size: int = 32
    """Windows per step."""
    window: int = 8
    """Transitions per window (T); must be <= model.backbone.max_context."""
    lr: float = 1e-3
    warmup: int = 100
    """Linear learning-rate warm-up steps."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """After warm-up: keep lr, or decay it along a cosine to lr * min_lr_ratio at `steps`."""
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    """Max global gradient norm (0 disables clipping)."""
    eval_every: int = 500
    checkpoint_every: int = 1000
    log_every: int = 25
    holdout: float = 0.1
    """Fraction of episodes held out for evaluation."""
    eval_windows: int = 256
    """Held-out windows evaluated each time (a fixed subset)."""
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast; "auto" = bf16 where the CPU has AMX (or on CUDA with bf16), else fp32."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check_positive_ints(
            self,
            prefix,
            ("steps", "batch_size", "window", "eval_every", "checkpoint_every", "log_every",
             "eval_windows"),
        )  # fmt: skip
        check(
            isinstance(self.warmup, int) and self.warmup >= 0,
            f"{prefix}warmup",
            self.warmup,
            "must be an integer >= 0",
        )
        check_positive(f"{prefix}lr", self.lr)
        check(self.lr_schedule in ("constant", "cosine"), f"{prefix}lr_schedule", self.lr_schedule,
              "must be one of ['constant', 'cosine']")  # fmt: skip
        check(
            isinstance(self.min_lr_ratio, (int, float)) and 0 <= self.min_lr_ratio <= 1,
            f"{prefix}min_lr_ratio",
            self.min_lr_ratio,
            "must be a number in [0, 1]",
        )
        check_positive(f"{prefix}weight_decay", self.weight_decay, allow_zero=True)
        check_positive(f"{prefix}grad_clip", self.grad_clip, allow_zero=True)
        check_fraction(f"{prefix}holdout", self.holdout)
        check(self.precision in ("auto", "fp32", "bf16"), f"{prefix}precision", self.precision,
              "must be one of ['auto', 'fp32', 'bf16']")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------


@functools.cache
def cpu_has_amx() -> bool:
    """AMX-BF16 tiles: where bf16 matmuls are several times faster than fp32 on a CPU."""
    if "AMX" in torch.backends.cpu.get_cpu_capability().upper():
        return True
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_amx() else None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Step and evaluation (no single-process assumptions: the distributed trainer reuses them)
# ---------------------------------------------------------------------------------------------


def make_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``params`` (tensors or param groups), fused into one multi-tensor kernel
    where every parameter is a float tensor on CPU/CUDA: the per-parameter update loop was
    ~17% of a wide model's CPU training step."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def lr_schedule(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``cfg.warmup`` steps, then constant or cosine decay to
    ``cfg.min_lr_ratio`` at ``cfg.steps`` (late small steps sharpen the regressed mean)."""

    def factor(step: int) -> float:
        if step < cfg.warmup or cfg.lr_schedule == "constant":
            return min(1.0, (step + 1) / max(1, cfg.warmup))
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    *,
    scheduler: Any | None = None,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 0.0,
) -> dict[str, float]:
    """One optimisation step on a batch of windows -> logs.

    ``model`` is a WorldModel or a wrapper whose ``forward(batch)`` returns (loss, logs) (e.g.
    DistributedDataParallel); ``autocast`` the autocast dtype (None = fp32); ``scaler`` a
    GradScaler for fp16 on GPUs (None otherwise).
    """
    device = next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, autocast):
        loss, logs = model(batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"world-model loss is {float(loss.detach())}; logs: {logs}")
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    logs["train/grad_norm"] = float(grad_norm)
    logs["train/lr"] = float(optimizer.param_groups[0]["lr"])
    return logs


@torch.no_grad()
def evaluate(
    model: WorldModel, batch: dict[str, Any], *, generator: torch.Generator | None = None
) -> dict[str, float]:
    """One-step errors on real windows against naive baselines.

    eval/obs_mse        the model's expected o_{t+1} (the regressed mean the diffusion head's
                        residual is centred on) vs the real one
    eval/obs_sample_mse a sample of the diffusion head (sampler defaults); for a perfect model
                        of a stochastic env this is 2x the env's own variance
    eval/copy_mse       the copy baseline o_{t+1} = o_t
    eval/obs_mse_ratio  obs_mse / copy_mse (< 0.5 is the learning goal), and
    eval/obs_sample_mse_ratio
    eval/reward_mse     vs eval/reward_mean_mse: predicting the batch's own mean reward
    eval/uncertainty    mean ensemble spread
    moe/nmi_modality_l{i}, moe/nmi_agent_l{i}  expert specialisation per MoE layer (native
                        backend): I(expert; label) / H(label)
    """
    model = getattr(model, "module", model)
    pred = model.predict_windows(batch, generator=generator)
    device = pred["next_obs"].device
    obs = torch.as_tensor(np.asarray(batch["obs"]), dtype=torch.float32, device=device)
    reward = torch.as_tensor(np.asarray(batch["reward"]), dtype=torch.float32, device=device)
    target, current = obs[:, 1:], obs[:, :-1]  # [B, T, N, D]
    mask = model.obs_mask.bool()  # [N, D]
    mse = lambda a, b: float((a - b).pow(2)[..., mask].mean())  # noqa: E731
    metrics = {
        "eval/obs_mse": mse(pred["next_obs_mean"], target),
        "eval/obs_sample_mse": mse(pred["next_obs"], target),
        "eval/copy_mse": mse(current, target),
        "eval/reward_mse": float((pred["reward"] - reward).pow(2).mean()),
        "eval/reward_mean_mse": float((reward - reward.mean()).pow(2).mean()),
        "eval/uncertainty": float(pred["uncertainty"].mean()),
    }
    metrics["eval/obs_sample_mse_ratio"] = metrics["eval/obs_sample_mse"] / max(
        metrics["eval/copy_mse"], 1e-12
    )
    metrics["eval/obs_mse_ratio"] = metrics["eval/obs_mse"] / max(metrics["eval/copy_mse"], 1e-12)
    if model.config.moe.backend == "native":
        metrics.update(specialisation_logs(model, batch["obs"][:, :-1], batch["action"]))
    return metrics


# ---------------------------------------------------------------------------------------------
# The local loop
# ---------------------------------------------------------------------------------------------


def sample_batch(
    windows: dict[str, np.ndarray], batch_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    index = rng.integers(0, len(windows["obs"]), size=batch_size)
    return {k: windows[k][index] for k in WINDOW_KEYS}


def warn_untrained_context(max_context: int, window: int) -> None:
    """Imagination keeps up to ``max_context`` steps of context, but the time embeddings of
    positions >= ``window`` are never trained: warn (it still trains) and say the fix."""
    if window < max_context:
        warnings.warn(
            f"train.window ({window}) < model.backbone.max_context ({max_context}): time "
            f"embeddings {window}..{max_context - 1} get no training, and imagination uses up to "
            f"{max_context} steps of context; set backbone.max_context = {window} (or train on "
            f"windows of {max_context})",
            stacklevel=3,
        )


def fit(
    model: WorldModel,
    train_windows: dict[str, np.ndarray],
    cfg: TrainConfig,
    *,
    eval_windows: dict[str, np.ndarray] | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` on windows for ``cfg.steps`` steps; returns the final logs and eval
    metrics. With ``out_dir``: TensorBoard scalars in out_dir/tb, checkpoints in
    out_dir/checkpoints/step_<n>, the final model in out_dir/world_model.safetensors."""
    from tqdm.auto import tqdm

    cfg.validate()
    _check_windows(train_windows, cfg, "training")
    warn_untrained_context(model.config.backbone.max_context, cfg.window)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = model.obs_mean.device
    model.fit_normalization(train_windows)
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = lr_schedule(optimizer, cfg)
    dtype = autocast_dtype(cfg.precision, device)
    eval_batch = _eval_subset(eval_windows, cfg)
    writer = _writer(out_dir)
    logs: dict[str, float] = {}
    tokens = cfg.batch_size * cfg.window * model.spec.n_agents
    bar = tqdm(range(1, cfg.steps + 1), desc="world model", disable=not progress, mininterval=2.0)
    for step in bar:
        start = time.perf_counter()
        batch = sample_batch(train_windows, cfg.batch_size, rng)
        logs = train_step(
            model, optimizer, batch, scheduler=scheduler, autocast=dtype, grad_clip=cfg.grad_clip
        )
        logs["perf/tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
        if step % cfg.log_every == 0 or step == cfg.steps:
            _write(writer, logs, step)
            bar.set_postfix(loss=f"{logs['wm/loss']:.3f}", tok_s=f"{logs['perf/tokens_per_s']:.0f}")
        if eval_batch is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            logs.update(evaluate(model, eval_batch))
            _write(writer, {k: v for k, v in logs.items() if k.startswith("eval/")}, step)
        if out_dir is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save_training_checkpoint(
                Path(out_dir) / "checkpoints" / f"step_{step}", model, optimizer, scheduler, step
            )
    if writer is not None:
        writer.close()
    if out_dir is not None:
        model.save(Path(out_dir) / "world_model.safetensors")
    return logs


def save_training_checkpoint(
    folder: Path, model: WorldModel, optimizer: torch.optim.Optimizer, scheduler: Any, step: int
) -> Path:
    """The model (safetensors) plus optimizer/scheduler/step (torch.save of plain state)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "world_model.safetensors")
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step}
    torch.save(state, folder / "trainer_state.pt")
    return folder


def load_trainer_state(folder: str | Path) -> dict[str, Any]:
    """Optimizer/scheduler/step saved next to a checkpoint (weights_only: no pickled code)."""
    return torch.load(Path(folder) / "trainer_state.pt", weights_only=True)


def train_local(
    cfg: TrainConfig,
    data_path: str | Path,
    out_dir: str | Path,
    *,
    model_config: WorldModelConfig | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train a world model on the Parquet episodes at ``data_path``; write everything to
    ``out_dir``; return the final metrics (also written to out_dir/metrics.json)."""
    from moedream.data import load_windows

    model_config = model_config or WorldModelConfig()
    check(
        cfg.window <= model_config.backbone.max_context,
        "train.window",
        cfg.window,
        f"must be <= model.backbone.max_context ({model_config.backbone.max_context})",
    )
    spec, train, holdout = load_windows(data_path, cfg.window, holdout=cfg.holdout, seed=cfg.seed)
    model = WorldModel(model_config, spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(
        json.dumps(
            {
                "model": model_config.to_dict(),
                "train": cfg.to_dict(),
                "env_spec": json.loads(spec.to_json()),
            },
            indent=2,
        )
    )
    metrics = fit(model, train, cfg, eval_windows=holdout or None, out_dir=out, progress=progress)
    metrics["data/train_windows"] = float(len(train["obs"]))
    metrics["data/holdout_windows"] = float(len(holdout["obs"])) if holdout else 0.0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def _check_windows(windows: dict[str, np.ndarray], cfg: TrainConfig, name: str) -> None:
    missing = [k for k in WINDOW_KEYS if k not in windows]
    if missing:
        raise ValueError(f"{name} windows lack {missing}; expected keys {list(WINDOW_KEYS)}")
    if len(windows["obs"]) == 0:
        raise ValueError(f"no {name} windows; collect more episodes or lower train.window")


def _eval_subset(
    windows: dict[str, np.ndarray] | None, cfg: TrainConfig
) -> dict[str, np.ndarray] | None:
    if not windows:
        return None
    count = len(windows["obs"])
    index = np.random.default_rng(cfg.seed + 1).permutation(count)[: cfg.eval_windows]
    return {k: windows[k][np.sort(index)] for k in WINDOW_KEYS}


def _writer(out_dir: str | Path | None):
    if out_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(Path(out_dir) / "tb"))


def _write(writer, logs: dict[str, float], step: int) -> None:
    if writer is None:
        return
    for key, value in logs.items():
        writer.add_scalar(key, value, step)
