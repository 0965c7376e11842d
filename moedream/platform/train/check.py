"""Check that expert-parallel training computes what the single-process model computes.

``parallel_check_loop`` runs inside Ray Train workers (or any torch.distributed ranks): every
rank takes its slice of one fixed global batch, runs the sharded model (forward, backward,
gradient reduction, one optimizer step) and writes, per rank, its outputs and loss, and on
rank 0 the full (gathered) gradients and updated parameters to ``out_dir``. A single-process
model built with ``reference_model`` must reproduce them (tests/integration/
test_train_distributed.py does the comparison).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from moedream.platform.train.config import DistributedTrainConfig
from moedream.platform.train.parallel import (
    ParallelLayout,
    build_layout,
    build_models,
    gather_state,
    init_deepspeed_comm,
    make_engine,
)
from moedream.world_model.model import WorldModel
from moedream.world_model.trajectory import WINDOW_KEYS

NOISE_SEED = 1000
"""Rank r seeds torch's RNG with train.seed + NOISE_SEED + r before its forward pass."""


def fixed_batch(cfg: DistributedTrainConfig) -> tuple[Any, dict[str, np.ndarray]]:
    """(spec, the first train.batch_size windows of the data): the same on every rank."""
    from moedream.data import load_windows

    spec, windows, _ = load_windows(cfg.data, cfg.train.window, holdout=0.0, seed=cfg.train.seed)
    if len(windows["obs"]) < cfg.train.batch_size:
        raise ValueError(
            f"{cfg.data} has {len(windows['obs'])} windows, fewer than train.batch_size"
        )
    return spec, {k: windows[k][: cfg.train.batch_size] for k in WINDOW_KEYS}


def rank_slice(batch: dict[str, np.ndarray], rank: int, world_size: int) -> dict[str, np.ndarray]:
    per_rank = len(batch["obs"]) // world_size
    return {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}


def reference_model(
    cfg: DistributedTrainConfig, spec: Any, batch: dict[str, np.ndarray]
) -> WorldModel:
    """The single-process model every rank starts from (shared seed, normalisation fitted on
    the fixed batch)."""
    layout = ParallelLayout(0, 1, 1, None, None, None)
    full, _ = build_models(cfg.model, spec, layout, seed=cfg.train.seed, device=torch.device("cpu"))
    full.fit_normalization(batch)
    return full


@torch.no_grad()
def backbone_features(model: WorldModel, batch: dict[str, np.ndarray]) -> torch.Tensor:
    """The MoE backbone's output [B, T, N, d] (eval mode: the all-to-alls, no training noise)."""
    tensors = model._batch_tensors(batch)
    t = tensors["action"].shape[1]
    with model._eval_mode():
        features, _ = model.backbone(
            obs=model.normalize_obs(tensors["obs"][:, :t]), action=tensors["action"]
        )
    return features


def parallel_check_loop(config: dict[str, Any]) -> None:
    """Worker function: config = {"checks": [{"train_config": DistributedTrainConfig dict,
    "out_dir": str}, ...]}; the checks run one after the other in the same workers (one
    worker-group start for several engines)."""
    for check in config["checks"]:
        _check_one(DistributedTrainConfig.from_dict(check["train_config"]), Path(check["out_dir"]))
    _report_done()


def _check_one(cfg: DistributedTrainConfig, out_dir: Path) -> None:
    import torch.distributed as dist

    if cfg.engine == "deepspeed" and dist.is_initialized():
        init_deepspeed_comm()
    layout = build_layout(cfg.expert_parallel_size)
    spec, batch = fixed_batch(cfg)
    _, model = build_models(
        cfg.model, spec, layout, seed=cfg.train.seed, device=torch.device("cpu")
    )
    model.fit_normalization(batch)
    mine = rank_slice(batch, layout.rank, layout.world_size)
    engine = make_engine(
        model,
        layout,
        cfg.train,
        engine=cfg.engine,
        zero_stage=cfg.zero_stage,
        micro_batch=cfg.per_worker_batch,
    )

    features = backbone_features(model, mine)
    torch.manual_seed(cfg.train.seed + NOISE_SEED + layout.rank)
    loss = engine.forward_backward(mine)
    local_grads = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
        for name, p in model.named_parameters()
    }
    has_grads = all(p.grad is not None for p in model.parameters())
    grads = gather_state(local_grads, layout, cfg.model.moe.num_experts)
    engine.optimizer_step()
    params = gather_state(dict(model.named_parameters()), layout, cfg.model.moe.num_experts)
    record = {"rank": layout.rank, "loss": float(loss), "features": features}
    if layout.is_chief:
        record.update(
            grads=grads if has_grads else None, params={k: v.detach() for k, v in params.items()}
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(record, out_dir / f"rank{layout.rank}.pt")


def _report_done() -> None:
    try:
        import ray.train

        ray.train.report({"done": 1})
    except (ImportError, RuntimeError):  # outside Ray Train (torch.multiprocessing)
        pass
