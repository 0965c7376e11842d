"""Expert parallelism: the experts of an MoE layer sharded over a process group.

As in DeepSpeed's ``sharded_moe`` (GShard, https://arxiv.org/abs/2006.16668, Algorithm 2):
with an expert-parallel (EP) group of P ranks, rank r holds experts
[r * E/P, (r + 1) * E/P) of every MoE layer. Each rank routes its own tokens into a
capacity-shaped buffer [E, C, d]; one all-to-all sends expert block j to rank j, which then
holds [P, E/P, C, d] (its local experts' slots from every rank), runs its experts, and a
second all-to-all sends the results back. Router and every other parameter are replicated
(data parallel).

Gradients, for a trainer (``sync_gradients`` does both):
- non-expert parameters: all-reduce mean over the data-parallel group, as in DDP;
- expert parameters: the backward all-to-all already *sums* the contributions of the tokens of
  all P ranks into the owner's gradient, so dividing by P turns that sum into the mean of the
  per-rank losses, the same objective the non-expert parameters see. (If several EP groups
  replicate the same experts, also all-reduce mean over that expert-data-parallel group.)

All communication goes through one autograd Function, ``_AllToAll``, whose backward is the
mirror all-to-all; ``all_to_all`` is the identity without a group or at world size 1.
Plain torch.distributed (gloo on CPU, nccl on GPU); no ray.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

EXPERT_MODULE_NAME = "experts"
"""Name of the submodule holding the batched expert weights; ``is_expert_param`` keys on it."""

# ---------------------------------------------------------------------------------------------
# Communication timer
# ---------------------------------------------------------------------------------------------


class _CommTimer:
    """Cumulative wall-clock seconds spent inside all-to-all calls (forward and backward).

    On CUDA the time is that of enqueueing the collective unless the caller synchronises.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.calls += 1


_TIMER = _CommTimer()


def comm_seconds() -> float:
    """Seconds spent in expert-parallel all-to-all (forward + backward) since the last reset."""
    return _TIMER.seconds


def comm_calls() -> int:
    """Number of all-to-all calls since the last reset."""
    return _TIMER.calls


def reset_comm_timer() -> None:
    _TIMER.seconds = 0.0
    _TIMER.calls = 0


# ---------------------------------------------------------------------------------------------
# The all-to-all
# ---------------------------------------------------------------------------------------------


def group_size(group: dist.ProcessGroup | None) -> int:
    """World size of ``group``; 1 without a group or without an initialised process group."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    if group_size(group) == 1:
        return 0
    return dist.get_rank(group)


def _timed_all_to_all(group: dist.ProcessGroup, x: Tensor) -> Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    start = time.perf_counter()
    dist.all_to_all_single(out, x, group=group)
    _TIMER.add(time.perf_counter() - start)
    return out


class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0; its gradient is the same all-to-all, mirrored.

    Chunk j of dim 0 goes to rank j; the output concatenates, in rank order, the chunks every
    rank sent here. Applying it twice restores the original layout, so backward = forward.
    """

    @staticmethod
    def forward(ctx: Any, group: dist.ProcessGroup, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _timed_all_to_all(group, x)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        return None, _AllToAll.apply(ctx.group, grad_output)


def all_to_all(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """All-to-all of ``x`` [P * n, ...] over ``group``; the identity without a group or at P = 1."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[0] % size:
        raise ValueError(
            f"all_to_all: dim 0 of the input ({x.shape[0]}) must be divisible by the group size "
            f"({size}); the expert count must be a multiple of the expert-parallel world size"
        )
    return _AllToAll.apply(group, x)


def all_reduce_max_int(value: int, group: dist.ProcessGroup | None, device: torch.device) -> int:
    """Maximum of a Python int over ``group`` (used so every rank agrees on the capacity)."""
    if group_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


# ---------------------------------------------------------------------------------------------
# Expert vs replicated parameters, state-dict sharding
# ---------------------------------------------------------------------------------------------


def is_expert_param(name: str) -> bool:
    """True for a parameter (or state-dict key) that belongs to an expert shard.

    Expert weights live in a submodule called ``experts`` (ours: ``...experts.w_in``; DeepSpeed:
    ``...deepspeed_moe.experts.deepspeed_experts.0.0.weight``). Their gradients must NOT be
    all-reduced over the expert-parallel group; every other parameter is replicated.
    """
    return EXPERT_MODULE_NAME in name.split(".")


def _local_range(rank: int, world_size: int, num_experts: int) -> tuple[int, int]:
    if world_size < 1 or num_experts % world_size:
        raise ValueError(
            f"num_experts ({num_experts}) must be divisible by the expert-parallel world size "
            f"({world_size}); change moe.num_experts or the number of workers"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank ({rank}) must be in [0, {world_size})")
    per_rank = num_experts // world_size
    return rank * per_rank, (rank + 1) * per_rank


def _check_expert_tensor(name: str, tensor: Tensor, num_experts: int) -> None:
    if tensor.dim() == 0 or tensor.shape[0] != num_experts:
        raise ValueError(
            f"expert tensor {name!r} has shape {tuple(tensor.shape)}; expected a leading dim of "
            f"num_experts={num_experts} (is this a full, unsharded state dict of the native "
            "backend? DeepSpeed-backend state dicts hold one module per expert)"
        )


def shard_expert_state(
    full_state: Mapping[str, Tensor], rank: int, world_size: int, num_experts: int
) -> dict[str, Tensor]:
    """The state dict of rank ``rank``: expert tensors [E, ...] sliced to its [E/P, ...] block,
    everything else copied as is (replicated)."""
    lo, hi = _local_range(rank, world_size, num_experts)
    shard = {}
    for name, tensor in full_state.items():
        if is_expert_param(name):
            _check_expert_tensor(name, tensor, num_experts)
            shard[name] = tensor[lo:hi].clone()
        else:
            shard[name] = tensor.clone()
    return shard


def gather_expert_state(
    shard_states: Sequence[Mapping[str, Tensor]], num_experts: int
) -> dict[str, Tensor]:
    """Inverse of ``shard_expert_state``: concatenate the ranks' expert blocks (in rank order);
    replicated tensors are taken from rank 0."""
    world_size = len(shard_states)
    _local_range(0, world_size, num_experts)
    full = {}
    for name, tensor in shard_states[0].items():
        if is_expert_param(name):
            full[name] = torch.cat([s[name] for s in shard_states], dim=0).clone()
            _check_expert_tensor(name, full[name], num_experts)
        else:
            full[name] = tensor.clone()
    return full


def all_gather_expert_state(
    local_state: Mapping[str, Tensor], num_experts: int, group: dist.ProcessGroup | None
) -> dict[str, Tensor]:
    """Collective: every rank of ``group`` gets the full state dict (for checkpointing)."""
    size = group_size(group)
    if size == 1:
        return {k: v.clone() for k, v in local_state.items()}
    full = {}
    for name, tensor in local_state.items():
        if is_expert_param(name):
            parts = [torch.empty_like(tensor) for _ in range(size)]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            full[name] = torch.cat(parts, dim=0)
            _check_expert_tensor(name, full[name], num_experts)
        else:
            full[name] = tensor.clone()
    return full


# ---------------------------------------------------------------------------------------------
# Helpers for a trainer
# ---------------------------------------------------------------------------------------------


def split_named_parameters(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(expert params, replicated params)."""
    expert, replicated = [], []
    for name, param in named_parameters:
        (expert if is_expert_param(name) else replicated).append(param)
    return expert, replicated


def broadcast_replicated_params(
    module: nn.Module, group: dist.ProcessGroup | None, src_rank: int = 0
) -> None:
    """Make the replicated (non-expert) parameters of every rank equal to those of ``src_rank``
    (a global rank). Expert shards are left alone: each rank owns different experts."""
    if group_size(group) == 1:
        return
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not is_expert_param(name):
                dist.broadcast(param.data, src=src_rank, group=group)


def sync_gradients(
    module: nn.Module,
    dp_group: dist.ProcessGroup | None,
    ep_group: dist.ProcessGroup | None,
    expert_dp_group: dist.ProcessGroup | None = None,
) -> None:
    """After ``loss.backward()`` on every rank (each with its own per-rank mean loss), make the
    gradients those of the mean loss over ranks.

    Non-expert grads: all-reduce mean over ``dp_group``. Expert grads: divided by the EP world
    size (the backward all-to-all already summed every rank's contribution), then all-reduce
    mean over ``expert_dp_group`` if experts are replicated across EP groups.
    """
    dp_size, ep_size = group_size(dp_group), group_size(ep_group)
    for name, param in module.named_parameters():
        if param.grad is None:
            continue
        if is_expert_param(name):
            if ep_size > 1:
                param.grad.div_(ep_size)
            if group_size(expert_dp_group) > 1:
                dist.all_reduce(param.grad, group=expert_dp_group)
                param.grad.div_(group_size(expert_dp_group))
        elif dp_size > 1:
            dist.all_reduce(param.grad, group=dp_group)
            param.grad.div_(dp_size)
