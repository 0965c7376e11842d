"""Expert-parallel process groups, the sharded world model, and the two training engines.

Layout (as DeepSpeed's ``_create_expert_and_data_parallel``): with W ranks and P = expert-
parallel size, ranks [kP, (k+1)P) form expert-parallel (EP) group k, and rank r holds experts
[(r mod P) E/P, (r mod P + 1) E/P) of every MoE layer. Ranks with the same r mod P hold the
same experts: they form that shard's expert-data-parallel group. Every other parameter is
replicated on all W ranks (data parallel).

Gradients (``ParallelOptimizer``), after every rank's ``loss.backward()`` on its own batch:
- replicated parameters: all-reduce mean over all W ranks (one flat buffer);
- expert parameters: the backward all-to-all already summed the P ranks' contributions on the
  expert's owner, so divide by P, then all-reduce mean over the expert-data-parallel group.
The result is the gradient of the mean of the W per-rank losses: the single-process gradient.

Why not DistributedDataParallel: DDP all-reduces every parameter, expert shards included
(which differ per rank), and excluding them needs DDP's private ignore list. One manual flat
all-reduce after backward is simple and exact; on a few CPU workers overlap with backward
(DDP's gain) is small next to the expert all-to-alls, which sit inside backward anyway.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moedream.envs.spec import EnvSpec
from moedream.world_model import expert_parallel as ep
from moedream.world_model.model import WorldModel, WorldModelConfig
from moedream.world_model.train_local import (
    TrainConfig,
    autocast_dtype,
    lr_schedule,
    make_optimizer,
    train_step,
)

_DS_EXPERT = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..*)$")

# ---------------------------------------------------------------------------------- layout


@dataclasses.dataclass
class ParallelLayout:
    rank: int
    world_size: int
    ep_size: int
    ep_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    expert_dp_group: dist.ProcessGroup | None

    @property
    def ep_rank(self) -> int:
        """Which expert shard this rank holds."""
        return self.rank % self.ep_size

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def build_layout(ep_size: int) -> ParallelLayout:
    """Create the EP and expert-data-parallel groups (every rank creates every group, in the
    same order, as torch.distributed requires). Without torch.distributed: one rank."""
    if not dist.is_available() or not dist.is_initialized():
        if ep_size != 1:
            raise RuntimeError(
                f"expert_parallel_size={ep_size} needs torch.distributed initialised"
            )
        return ParallelLayout(0, 1, 1, None, None, None)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(f"world size {world} is not a multiple of expert_parallel_size {ep_size}")
    ep_group = expert_dp_group = None
    for start in range(0, world, ep_size):
        group = dist.new_group(list(range(start, start + ep_size)))
        if start <= rank < start + ep_size:
            ep_group = group
    for shard in range(ep_size):
        group = dist.new_group(list(range(shard, world, ep_size)))
        if rank % ep_size == shard:
            expert_dp_group = group
    return ParallelLayout(
        rank=rank,
        world_size=world,
        ep_size=ep_size,
        ep_group=ep_group if ep_size > 1 else None,
        dp_group=dist.group.WORLD if world > 1 else None,
        expert_dp_group=expert_dp_group if world // ep_size > 1 else None,
    )


# ------------------------------------------------------------------- sharding the state dict


def shard_state(
    full: Mapping[str, Tensor], ep_rank: int, ep_size: int, num_experts: int
) -> dict[str, Tensor]:
    """Rank ``ep_rank``'s state dict of a full (unsharded) model state.

    Native experts are stacked tensors [E, ...] (``ep.shard_expert_state`` slices them);
    DeepSpeed experts are modules ``...deepspeed_experts.<i>...`` with local indices i, so
    global expert g = ep_rank * E/P + i is renamed to local index i.
    """
    local = num_experts // ep_size
    lo = ep_rank * local
    deepspeed, native = {}, {}
    for name, tensor in full.items():
        match = _DS_EXPERT.match(name)
        if match is None:
            native[name] = tensor
        elif lo <= int(match[2]) < lo + local:
            deepspeed[f"{match[1]}{int(match[2]) - lo}{match[3]}"] = tensor.clone()
    out = ep.shard_expert_state(native, ep_rank, ep_size, num_experts)
    out.update(deepspeed)
    return out


def gather_state(
    local: Mapping[str, Tensor], layout: ParallelLayout, num_experts: int
) -> dict[str, Tensor]:
    """Collective over the EP group: the full state dict (every rank of the group gets it)."""
    if layout.ep_group is None:
        return {k: v.detach().clone() for k, v in local.items()}
    native = {k: v for k, v in local.items() if _DS_EXPERT.match(k) is None}
    full = ep.all_gather_expert_state(native, num_experts, layout.ep_group)
    per_rank = num_experts // layout.ep_size
    for name, tensor in local.items():
        match = _DS_EXPERT.match(name)
        if match is None:
            continue
        parts = [torch.empty_like(tensor) for _ in range(layout.ep_size)]
        dist.all_gather(parts, tensor.contiguous(), group=layout.ep_group)
        for q, part in enumerate(parts):
            full[f"{match[1]}{q * per_rank + int(match[2])}{match[3]}"] = part
    return full


def build_models(
    config: WorldModelConfig,
    spec: EnvSpec,
    layout: ParallelLayout,
    *,
    seed: int,
    device: torch.device,
) -> tuple[WorldModel, WorldModel]:
    """(full model, this rank's sharded model). Every rank builds the same full model from the
    shared seed and keeps its expert shard of it, so all ranks start consistent without a
    broadcast. The full model stays on the CPU (it receives gathered weights for checkpoints)."""
    torch.manual_seed(seed)
    full = WorldModel(config, spec)
    model = WorldModel(config, spec, ep_group=layout.ep_group)
    shard = shard_state(full.state_dict(), layout.ep_rank, layout.ep_size, config.moe.num_experts)
    model.load_state_dict(shard, strict=True)
    return full, model.to(device)


def broadcast_buffers(module: nn.Module, layout: ParallelLayout) -> None:
    """Rank 0's buffers (normalisation statistics) on every rank."""
    if layout.world_size == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def mean_over_ranks(
    values: Mapping[str, float], layout: ParallelLayout, device: torch.device
) -> dict[str, float]:
    """Average scalar logs over all ranks (every rank must pass the same keys)."""
    keys = sorted(values)
    if layout.world_size == 1 or not keys:
        return dict(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / layout.world_size).tolist(), strict=True))


def max_over_ranks(value: float, layout: ParallelLayout, device: torch.device) -> float:
    if layout.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# ------------------------------------------------------------------------------ native engine


class ParallelOptimizer:
    """Wraps a torch optimizer so that ``step()`` first makes the gradients those of the global
    mean loss (see the module docstring), clips by the global norm, then steps.

    ``train_local.train_step`` calls it like any optimizer; give train_step grad_clip=0 (its own
    clipping would use this rank's partial norm) and read ``last_grad_norm``.
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        model: nn.Module,
        layout: ParallelLayout,
        grad_clip: float,
    ) -> None:
        self.inner, self.layout, self.grad_clip = inner, layout, grad_clip
        self.expert_params, self.replicated_params = ep.split_named_parameters(
            model.named_parameters()
        )
        self.last_grad_norm = 0.0
        self.sync_seconds = 0.0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def synchronize(self) -> float:
        """All-reduce the gradients; returns the global gradient norm (before clipping)."""
        start = time.perf_counter()
        layout = self.layout
        for p in self.replicated_params + self.expert_params:
            if p.grad is None:  # unused this step: a zero grad keeps the flat buffers equal
                p.grad = torch.zeros_like(p)
        if layout.world_size > 1:
            _all_reduce_mean(
                [p.grad for p in self.replicated_params], layout.dp_group, layout.world_size
            )
        expert_grads = [p.grad for p in self.expert_params]
        if layout.ep_size > 1:
            torch._foreach_div_(expert_grads, float(layout.ep_size))
        if layout.expert_dp_group is not None:
            _all_reduce_mean(
                expert_grads, layout.expert_dp_group, layout.world_size // layout.ep_size
            )
        norm = self._global_norm()
        self.sync_seconds = time.perf_counter() - start
        return norm

    def _global_norm(self) -> float:
        """sqrt(|replicated grads|^2 + sum over the EP group of |expert shard grads|^2)."""
        device = self.replicated_params[0].device
        replicated = _sum_squares([p.grad for p in self.replicated_params], device)
        experts = _sum_squares([p.grad for p in self.expert_params], device)
        if self.layout.ep_group is not None:
            dist.all_reduce(experts, group=self.layout.ep_group)
        return float((replicated + experts).sqrt())

    def step(self) -> None:
        norm = self.synchronize()
        self.last_grad_norm = norm
        if self.grad_clip > 0:
            coef = min(1.0, self.grad_clip / (norm + 1e-6))  # as torch.nn.utils.clip_grad_norm_
            if coef < 1.0:
                torch._foreach_mul_(
                    [p.grad for p in self.replicated_params + self.expert_params], coef
                )
        self.inner.step()


def _all_reduce_mean(grads: list[Tensor], group: dist.ProcessGroup | None, size: int) -> None:
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.div_(size)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _sum_squares(grads: list[Tensor], device: torch.device) -> Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack([g.double().pow(2).sum() for g in grads]).sum()


class NativeEngine:
    """Our expert-parallel MoE + ParallelOptimizer around train_local.train_step."""

    name = "native"

    def __init__(self, model: WorldModel, layout: ParallelLayout, train: TrainConfig) -> None:
        self.model, self.layout, self.train = model, layout, train
        inner = make_optimizer(model.parameters(), train)
        self.optimizer = ParallelOptimizer(inner, model, layout, train.grad_clip)
        self.scheduler = lr_schedule(inner, train)
        self.autocast = autocast_dtype(train.precision, next(model.parameters()).device)

    def step(self, batch: dict[str, Any]) -> dict[str, float]:
        logs = train_step(
            self.model,
            self.optimizer,
            batch,
            scheduler=self.scheduler,
            autocast=self.autocast,
            grad_clip=0.0,
        )
        logs["train/grad_norm"] = self.optimizer.last_grad_norm
        logs["perf/grad_sync_s"] = self.optimizer.sync_seconds
        return logs

    def forward_backward(self, batch: dict[str, Any]) -> Tensor:
        """Loss on ``batch`` and synchronised gradients, without a step (for checks)."""
        self.model.train()
        self.optimizer.zero_grad()
        loss, _ = self.model(batch)
        loss.backward()
        self.optimizer.synchronize()
        return loss.detach()

    def optimizer_step(self) -> None:
        self.optimizer.inner.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


# --------------------------------------------------------------------------- DeepSpeed engine


class DeepSpeedEngine:
    """``deepspeed.initialize`` around the world model with DeepSpeed MoE layers.

    DeepSpeed creates the same consecutive-rank EP / expert-data-parallel groups
    (``set_deepspeed_parallelism``), reduces non-expert gradients over all ranks and expert
    gradients over their expert-data-parallel group (both divided by the world size), clips by
    the global norm and steps a plain ``torch.optim.AdamW`` (no compiled fused ops), with ZeRO
    stage 0-2 partitioning the optimizer state (and gradients at stage 2).
    """

    name = "deepspeed"

    def __init__(
        self,
        model: WorldModel,
        layout: ParallelLayout,
        train: TrainConfig,
        *,
        zero_stage: int,
        micro_batch: int,
    ) -> None:
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        install_deepspeed_all_to_all_timer()
        _release_deepspeed_ep_groups(model)
        groups = split_params_into_different_moe_groups_for_optimizer(
            {"params": list(model.parameters()), "name": "world_model"}
        )
        optimizer = torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)
        scheduler = lr_schedule(optimizer, train)
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": float(train.grad_clip),
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
            dist_init_required=False,
        )  # fmt: skip
        self.model, self.layout = model, layout
        self.zero_stage = zero_stage

    def step(self, batch: dict[str, Any]) -> dict[str, float]:
        """The DeepSpeed mirror of ``train_local.train_step``: forward, engine.backward (which
        all-reduces), engine.step (clip, optimizer, scheduler)."""
        self.engine.train()
        loss, logs = self.engine(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"world-model loss is {float(loss.detach())}; logs: {logs}")
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        logs["train/grad_norm"] = float(norm) if norm is not None else 0.0
        logs["train/lr"] = float(self.optimizer.param_groups[0]["lr"])
        return logs

    def forward_backward(self, batch: dict[str, Any]) -> Tensor:
        self.engine.train()
        loss, _ = self.engine(batch)
        self.engine.backward(loss)
        return loss.detach()

    def optimizer_step(self) -> None:
        self.engine.step()

    def save(self, folder: str) -> None:
        """Collective: DeepSpeed's own checkpoint (model, expert shards, ZeRO optimizer state,
        scheduler) under ``folder``; each rank writes its own files."""
        self.engine.save_checkpoint(folder, tag="state")

    def load(self, folder: str) -> None:
        path, _ = self.engine.load_checkpoint(folder, tag="state")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint state under {folder!r}")


def _release_deepspeed_ep_groups(model: nn.Module) -> None:
    """The MoE layers were built with our EP group; ``deepspeed.initialize`` asserts that no
    group is set and installs its own (same consecutive-rank topology, plus the registry its
    gradient reduction needs), so hand the layers over without one."""
    from deepspeed.moe.sharded_moe import MOELayer, TopKGate

    for module in model.modules():
        if isinstance(module, (MOELayer, TopKGate)):
            module.ep_group = None


_DS_TIMER_INSTALLED = False
_DS_COMM = {"seconds": 0.0, "calls": 0}


def install_deepspeed_all_to_all_timer() -> None:
    """Time DeepSpeed MoE's all-to-alls (forward and backward: its backward re-enters the same
    autograd Function), like ``expert_parallel``'s timer times ours."""
    global _DS_TIMER_INSTALLED
    if _DS_TIMER_INSTALLED:
        return
    from deepspeed.moe import sharded_moe

    original = sharded_moe._AllToAll.forward

    def timed_forward(ctx: Any, group: Any, input: Tensor) -> Tensor:
        start = time.perf_counter()
        out = original(ctx, group, input)
        _DS_COMM["seconds"] += time.perf_counter() - start
        _DS_COMM["calls"] += 1
        return out

    sharded_moe._AllToAll.forward = staticmethod(timed_forward)
    _DS_TIMER_INSTALLED = True


def comm_seconds() -> float:
    """All-to-all seconds of either MoE implementation since the last reset."""
    return ep.comm_seconds() + _DS_COMM["seconds"]


def reset_comm_timers() -> None:
    ep.reset_comm_timer()
    _DS_COMM["seconds"], _DS_COMM["calls"] = 0.0, 0


def make_engine(
    model: WorldModel,
    layout: ParallelLayout,
    train: TrainConfig,
    *,
    engine: str,
    zero_stage: int,
    micro_batch: int,
):
    if engine == "deepspeed":
        return DeepSpeedEngine(model, layout, train, zero_stage=zero_stage, micro_batch=micro_batch)
    return NativeEngine(model, layout, train)


def init_deepspeed_comm() -> None:
    """Let deepspeed.comm wrap the process group Ray Train already created."""
    import deepspeed

    from moedream.torch_extensions import load_deepspeed_comm_ops

    load_deepspeed_comm_ops()
    deepspeed.init_distributed(
        dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False
    )
