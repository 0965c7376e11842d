"""Sparse Mixture-of-Experts feed-forward layer: router, batched experts, capacity dispatch.

Einsum / shape legend: (t)okens, (e)xperts, (c)apacity, (d)model, (h)idden, (k) routes per
token (top-k), (p) expert-parallel ranks, (l)ocal experts per rank (= e / p).

    g(x)   = softmax(W_g x)                       router probabilities, always fp32
    top-k  = the k largest g_i(x), renormalised over the chosen experts (k >= 2)
    y(x)   = sum_{i in top-k} p_i * e_i(x)        e_i(x) = W2_i act(W1_i x + b1_i) + b2_i

Dispatch is capacity based (GShard, Switch Transformer): every expert has C slots,
C = ceil(capacity_factor * k * t / e); a token's route to an expert past its C-th slot is
dropped (its contribution is 0; the caller's residual carries the token) and counted. First
choices fill the slots before second choices. ``dropless`` sizes C to the busiest expert, so
nothing is dropped (``eval_dropless``: always in eval mode, the default). The [e, c, d] buffer
is what expert parallelism sends with all-to-all (see ``expert_parallel.py``); at
expert-parallel size 1 the experts run on exactly their routed tokens instead
(``dispatch="grouped"``: the same drops, no padding, so dropless costs nothing extra).

The router returns logits; the auxiliary losses are free functions of them
(``load_balancing_loss``, ``router_z_loss``) and ``MoEFeedForward.forward`` returns them in
``MoEStats`` instead of storing them on the module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moedream.config import ConfigBase, check, check_choice, check_positive, check_positive_ints
from moedream.world_model import expert_parallel as ep

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@dataclass
class MoEConfig(ConfigBase):
    d_model: int = 128
    d_hidden: int = 256
    """Hidden width of one expert (the dense backend's width is :func:`dense_hidden_width`)."""
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25
    """Slots per expert = ceil(capacity_factor * top_k * tokens / num_experts)."""
    dropless: bool = False
    """Size the capacity to the busiest expert so that no token is ever dropped."""
    eval_dropless: bool = True
    """Drop nothing in eval mode (native backend): capacity dropping makes a token's output
    depend on the other tokens of the batch (an imagined rollout on the other rollouts batched
    with it, a step on later steps of earlier rows); at inference each row must stand alone."""
    jitter_noise: float = 0.0
    """Multiplicative router-input noise x * U(1 - eps, 1 + eps) in training (Switch)."""
    backend: Literal["native", "deepspeed", "dense"] = "native"
    dispatch: Literal["grouped", "buffer"] = "grouped"
    """Native backend at expert-parallel size 1: "grouped" runs each expert on exactly the
    tokens routed to it (no padding to capacity, same drops); "buffer" fills the padded
    [e, c, d] capacity buffer. Expert parallelism (P > 1) always uses the buffer: the
    all-to-all exchanges fixed-size slots."""
    activation: str = "gelu"
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check_positive_ints(self, prefix, ("d_model", "d_hidden", "num_experts", "top_k"))
        check(
            self.top_k <= self.num_experts,
            f"{prefix}top_k",
            self.top_k,
            f"must be <= num_experts ({self.num_experts}); lower top_k or add experts",
        )
        check_positive(f"{prefix}capacity_factor", self.capacity_factor)
        check(
            0.0 <= self.jitter_noise < 1.0,
            f"{prefix}jitter_noise",
            self.jitter_noise,
            "must be in [0, 1) (0 disables the noise)",
        )
        check_choice(f"{prefix}backend", self.backend, ("native", "deepspeed", "dense"))
        check_choice(f"{prefix}dispatch", self.dispatch, ("grouped", "buffer"))
        check_choice(f"{prefix}activation", self.activation, sorted(ACTIVATIONS))
        check_positive(f"{prefix}balance_loss_weight", self.balance_loss_weight, allow_zero=True)
        check_positive(f"{prefix}z_loss_weight", self.z_loss_weight, allow_zero=True)


@dataclass
class MoEStats:
    """What one MoE layer reports for one forward pass (all tensors on the input's device).

    aux_loss        scalar, in the graph: balance_loss_weight * balance + z_loss_weight * z
    balance_loss    scalar, in the graph: Switch Transformer load-balancing loss
    z_loss          scalar, in the graph: ST-MoE router z-loss
    expert_load     [e] detached: fraction of routed (token, expert) assignments per expert,
                    counted before capacity dropping
    dropped_tokens  int64 scalar: (token, expert) assignments dropped at capacity
    tokens          number of tokens in the batch
    assignments     [t, k] long, detached: each token's chosen experts, in the input's token
                    order (native backend; None otherwise), for specialisation analysis
    """

    aux_loss: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    expert_load: Tensor
    dropped_tokens: Tensor
    tokens: int
    assignments: Tensor | None = None

    @classmethod
    def zeros(cls, num_experts: int, tokens: int, device: torch.device) -> MoEStats:
        zero = torch.zeros((), device=device)
        return cls(
            aux_loss=zero,
            balance_loss=zero,
            z_loss=zero,
            expert_load=torch.zeros(num_experts, device=device),
            dropped_tokens=torch.zeros((), dtype=torch.int64, device=device),
            tokens=tokens,
        )

    @property
    def dropped_fraction(self) -> float:
        return float(self.dropped_tokens) / max(1, self.tokens)

    def to_logs(self, prefix: str = "moe/") -> dict[str, float]:
        """Namespaced scalars for TensorBoard."""
        logs = {
            f"{prefix}aux_loss": float(self.aux_loss.detach()),
            f"{prefix}balance_loss": float(self.balance_loss.detach()),
            f"{prefix}z_loss": float(self.z_loss.detach()),
            f"{prefix}dropped_fraction": self.dropped_fraction,
        }
        if self.expert_load.numel():
            logs[f"{prefix}max_expert_load"] = float(self.expert_load.max())
        return logs


def merge_stats(stats: Sequence[MoEStats]) -> MoEStats:
    """Combine the stats of several layers: losses and drops summed, loads averaged."""
    if not stats:
        raise ValueError("merge_stats needs at least one MoEStats")
    return MoEStats(
        aux_loss=sum((s.aux_loss for s in stats[1:]), stats[0].aux_loss),
        balance_loss=sum((s.balance_loss for s in stats[1:]), stats[0].balance_loss),
        z_loss=sum((s.z_loss for s in stats[1:]), stats[0].z_loss),
        expert_load=torch.stack([s.expert_load for s in stats]).mean(0),
        dropped_tokens=torch.stack([s.dropped_tokens for s in stats]).sum(),
        tokens=sum(s.tokens for s in stats),
    )


# ---------------------------------------------------------------------------------------------
# Router and auxiliary losses (pure functions)
# ---------------------------------------------------------------------------------------------


class Router(nn.Module):
    """Linear gate W_g: x [t, d] -> logits [t, e], computed in fp32 (also under autocast)."""

    def __init__(self, d_model: int, num_experts: int, jitter_noise: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear
        self.jitter_noise = jitter_noise

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.training and self.jitter_noise > 0:
                noise = torch.empty_like(x).uniform_(
                    1.0 - self.jitter_noise, 1.0 + self.jitter_noise
                )
                x = x * noise
            return F.linear(x, self.weight.float())  # [t, e]


def top_k_routing(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(probs [t, e], weights [t, k], experts [t, k]) from router logits, in fp32.

    Weights are the chosen probabilities renormalised to sum to 1 when k >= 2; with k = 1 the
    raw probability is kept (Switch Transformer), else the router would get no gradient.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # [t, e]
    weights, experts = torch.topk(probs, top_k, dim=-1)  # [t, k]
    if top_k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(
            torch.finfo(weights.dtype).eps
        )
    return probs, weights, experts


def load_balancing_loss(router_probs: Tensor, expert_mask: Tensor) -> Tensor:
    """Switch Transformer auxiliary loss (Fedus et al. 2021, eq. 4): L = E * sum_e f_e * P_e.

    router_probs  [t, e] softmax router probabilities
    expert_mask   float or bool [t, e]: 1 (or a count) where a token was routed to an expert;
                  or an integer [t, k] tensor of top-k expert indices
    f_e = fraction of routed (token, expert) assignments that went to e, P_e = mean_t p_e(x_t).
    With top-k routing f_e is normalised by t * k, so perfectly uniform routing gives 1.0.
    """
    num_experts = router_probs.shape[-1]
    if not (expert_mask.is_floating_point() or expert_mask.dtype == torch.bool):
        expert_mask = expert_counts(expert_mask, num_experts)  # indices [t, k] -> [t, e]
    mask = expert_mask.to(router_probs.dtype)
    fraction_routed = mask.sum(0) / mask.sum().clamp_min(1.0)  # f_e [e]
    mean_prob = router_probs.mean(0)  # P_e [e]
    return num_experts * torch.sum(fraction_routed * mean_prob)


def grouped_balancing_loss(router_probs: Tensor, expert_mask: Tensor, groups: Tensor) -> Tensor:
    """The load-balancing loss with every group weighted equally: E * sum_e f_e * P_e where
    f_e and P_e are the means over the groups present of each group's own routed fraction and
    mean probability. router_probs [t, e], expert_mask float [t, e], groups [t] long (e.g.
    token modality).

    Balancing inside each group would push every modality to use every expert (no
    specialisation is then possible); balancing the plain token pool lets the most numerous
    modality (a grid's cells) decide the balance. Weighting the groups equally lets modalities
    own different experts while no expert goes idle across them."""
    num_experts = router_probs.shape[-1]
    one_hot = F.one_hot(groups.long()).to(router_probs.dtype)  # [t, g]
    present = one_hot.sum(0) > 0  # [g]
    one_hot = one_hot[:, present]  # [t, g'], the groups present
    mask = expert_mask.to(router_probs.dtype)
    routed = one_hot.t() @ mask  # [g', e] routes per group and expert
    fraction_routed = (routed / routed.sum(-1, keepdim=True).clamp_min(1.0)).mean(0)  # f_e [e]
    mean_prob = ((one_hot.t() @ router_probs) / one_hot.sum(0)[:, None]).mean(0)  # P_e [e]
    return num_experts * torch.sum(fraction_routed * mean_prob)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean_t (logsumexp_e logits)^2."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def expert_counts(experts: Tensor, num_experts: int) -> Tensor:
    """[t, k] expert indices -> [t, e] counts (0/1 for distinct top-k choices)."""
    counts = torch.zeros(experts.shape[0], num_experts, device=experts.device)
    return counts.scatter_add_(1, experts.long(), torch.ones_like(experts, dtype=counts.dtype))


# ---------------------------------------------------------------------------------------------
# Capacity dispatch (pure functions)
# ---------------------------------------------------------------------------------------------


def expert_capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * top_k * tokens / num_experts), at least 1, at most tokens."""
    capacity = math.ceil(capacity_factor * top_k * tokens / num_experts)
    return max(1, min(capacity, tokens))


def slot_positions(experts: Tensor, num_experts: int) -> Tensor:
    """Position of each route in its expert's queue, first choices first: [t, k] -> [k, t].

    Route (k=j, token s) sits behind all first..(j-1)-th choices and the j-th choices of
    earlier tokens that picked the same expert (GShard's ordering).
    """
    routes = experts.t().reshape(-1)  # [k*t], all first choices, then all second choices, ...
    one_hot = F.one_hot(routes, num_experts)  # [k*t, e]
    position = one_hot.cumsum(0).gather(1, routes[:, None]).squeeze(1) - 1  # [k*t]
    return position.view(experts.shape[1], experts.shape[0])  # [k, t]


def route_slots(experts: Tensor, position: Tensor, capacity: int, num_experts: int) -> Tensor:
    """Flat slot e * C + position of every route [k, t]; dropped routes get the scratch slot
    e * C (one past the buffer)."""
    slots = experts.t() * capacity + position  # [k, t]
    return torch.where(position < capacity, slots, torch.full_like(slots, num_experts * capacity))


def dispatch(x: Tensor, slots: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Tokens x [t, d] into the expert buffer [e, c, d] (empty slots are zero). A gather, so
    the backward is an index_add (a token routed to k experts gets k gradient terms)."""
    tokens, d_model = x.shape
    scratch = num_experts * capacity
    source = torch.full((scratch + 1,), tokens, dtype=torch.long, device=x.device)  # [e*c + 1]
    token_ids = torch.arange(tokens, device=x.device).expand_as(slots)  # [k, t]
    source.scatter_(0, slots.reshape(-1), token_ids.reshape(-1))  # dropped routes hit scratch
    padded = torch.cat([x, x.new_zeros(1, d_model)])  # [t + 1, d], row t is the zero pad
    return padded.index_select(0, source[:scratch]).view(num_experts, capacity, d_model)


def combine(expert_out: Tensor, slots: Tensor, weights: Tensor) -> Tensor:
    """y [t, d] = sum_k weights[t, k] * expert_out[slot(k, t)]; dropped routes contribute 0.

    expert_out [e, c, d], slots [k, t], weights [t, k] (fp32: the sum accumulates in fp32).
    """
    d_model = expert_out.shape[-1]
    flat = expert_out.reshape(-1, d_model)
    padded = torch.cat([flat, flat.new_zeros(1, d_model)])  # [e*c + 1, d]
    routed = padded.index_select(0, slots.reshape(-1)).view(*slots.shape, d_model)  # [k, t, d]
    # a weighted sum over k, not einsum "ktd,tk->td" (that becomes t tiny bmm's on CPU)
    return (routed.float() * weights.t().float().unsqueeze(-1)).sum(0)  # [t, d]


def grouped_routes(slots: Tensor, num_experts: int, capacity: int) -> tuple[Tensor, Tensor, list]:
    """The kept routes sorted by expert, for running each expert on exactly its tokens.

    slots [k, t] (from ``route_slots``; dropped routes hold the scratch slot e * C).
    Returns (route_ids [r] into the flattened [k*t] routes, token_ids [r], counts: routes per
    expert, a list of e ints). A kept slot e * C + position is unique, so sorting by slot
    orders the routes by expert, then by queue position (the buffer's order).
    """
    tokens = slots.shape[1]
    flat = slots.reshape(-1)  # [k*t]
    scratch = num_experts * capacity
    kept = int((flat < scratch).sum())
    route_ids = torch.argsort(flat)[:kept]  # dropped routes (scratch slot) sort last
    counts = torch.bincount(flat[route_ids] // capacity, minlength=num_experts)
    return route_ids, route_ids % tokens, counts.tolist()


def combine_grouped(out: Tensor, token_ids: Tensor, route_weights: Tensor, tokens: int) -> Tensor:
    """y [t, d] = sum over a token's kept routes of weight * expert output; out [r, d] in the
    order of ``grouped_routes``, route_weights [r]; accumulated in fp32."""
    y = out.new_zeros(tokens, out.shape[-1], dtype=torch.float32)
    return y.index_add(0, token_ids, out.float() * route_weights.float().unsqueeze(-1))


# ---------------------------------------------------------------------------------------------
# Experts
# ---------------------------------------------------------------------------------------------


class BatchedExperts(nn.Module):
    """``num_local`` two-layer MLPs applied with batched matmuls: x [l, n, d] -> [l, n, d].

    Weights are [l, d, h] and [l, h, d]. ``init_experts``/``first_expert`` let a shard hold
    experts [first, first + l) of a full layer of ``init_experts`` experts, initialised exactly
    as the full layer would be (so a sharded model equals the single-process one, same seed).
    """

    def __init__(
        self,
        num_local: int,
        d_model: int,
        d_hidden: int,
        activation: str,
        *,
        init_experts: int | None = None,
        first_expert: int = 0,
    ) -> None:
        super().__init__()
        total = init_experts or num_local
        local = slice(first_expert, first_expert + num_local)
        bound_in, bound_out = 1.0 / math.sqrt(d_model), 1.0 / math.sqrt(d_hidden)  # as nn.Linear
        self.w_in = nn.Parameter(_uniform(total, d_model, d_hidden, bound=bound_in)[local].clone())
        self.b_in = nn.Parameter(_uniform(total, d_hidden, bound=bound_in)[local].clone())
        self.w_out = nn.Parameter(
            _uniform(total, d_hidden, d_model, bound=bound_out)[local].clone()
        )
        self.b_out = nn.Parameter(_uniform(total, d_model, bound=bound_out)[local].clone())
        self.act = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.act(torch.baddbmm(self.b_in.unsqueeze(1), x, self.w_in))  # [l, n, h]
        return torch.baddbmm(self.b_out.unsqueeze(1), hidden, self.w_out)  # [l, n, d]

    def forward_grouped(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """x [r, d] sorted by expert, counts[i] rows for expert i -> [r, d]. One addmm per
        expert on its own rows: no padding (a CPU runs l small matmuls as fast as one bmm, and
        torch's grouped_mm has no CPU backward yet)."""
        # unbind, not w[i]: its backward stacks the l gradients once instead of adding l
        # full-size zero-padded ones
        params = zip(
            self.w_in.unbind(0), self.b_in.unbind(0), self.w_out.unbind(0), self.b_out.unbind(0)
        )
        outputs = []
        for rows, (w_in, b_in, w_out, b_out) in zip(torch.split(x, list(counts)), params):
            if rows.shape[0] == 0:
                continue
            hidden = self.act(torch.addmm(b_in, rows, w_in))  # [n_i, h]
            outputs.append(torch.addmm(b_out, hidden, w_out))  # [n_i, d]
        return torch.cat(outputs) if outputs else x.new_zeros(0, x.shape[-1])


def _uniform(*shape: int, bound: float) -> Tensor:
    return torch.empty(*shape).uniform_(-bound, bound)


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


class MoEFeedForward(nn.Module):
    """Sparse MoE feed-forward: forward(x [..., d]) -> (y [..., d], MoEStats).

    backend "native": this file's router + batched experts, expert parallel over ``ep_group``
    (each rank holds num_experts / P experts). "dense": one MLP of width top_k * d_hidden (same
    active parameters, for ablations; zero MoE stats). "deepspeed": ``deepspeed.moe.layer.MoE``
    behind the same signature.
    """

    def __init__(self, cfg: MoEConfig, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.ep_group = ep_group
        self.ep_size = ep.group_size(ep_group)
        self.ep_rank = ep.group_rank(ep_group)
        if cfg.num_experts % self.ep_size:
            raise ValueError(
                f"moe.num_experts ({cfg.num_experts}) must be divisible by the expert-parallel "
                f"world size ({self.ep_size}); change num_experts or the number of workers"
            )
        self.num_local_experts = cfg.num_experts // self.ep_size
        if cfg.backend == "native":
            self.router = Router(cfg.d_model, cfg.num_experts, cfg.jitter_noise)
            self.experts = BatchedExperts(
                self.num_local_experts,
                cfg.d_model,
                cfg.d_hidden,
                cfg.activation,
                init_experts=cfg.num_experts,
                first_expert=self.ep_rank * self.num_local_experts,
            )
        elif cfg.backend == "dense":
            self.dense = DenseFeedForward(cfg.d_model, dense_hidden_width(cfg), cfg.activation)
        else:
            self.deepspeed = DeepSpeedMoE(cfg, ep_group)

    def forward(
        self, x: Tensor, *, route_input: Tensor | None = None, groups: Tensor | None = None
    ) -> tuple[Tensor, MoEStats]:
        """x [..., d] -> (y [..., d], stats). ``route_input`` [..., d] (native backend) is
        added to the router's input only (e.g. a modality embedding); ``groups`` [...] long
        makes the balance loss the mean of per-group balance losses (e.g. per modality)."""
        if x.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"MoEFeedForward got input of shape {tuple(x.shape)}; the last dim must be "
                f"moe.d_model={self.cfg.d_model}"
            )
        if (route_input is not None or groups is not None) and self.cfg.backend != "native":
            raise ValueError(
                f"modality-aware routing needs moe.backend 'native', not {self.cfg.backend!r}; "
                "set backbone.modality_routing: false or use the native backend"
            )
        flat = x.reshape(-1, self.cfg.d_model)  # [t, d]
        if self.cfg.backend == "native":
            route = None if route_input is None else route_input.reshape(-1, self.cfg.d_model)
            group = None if groups is None else groups.reshape(-1)
            y, stats = self._forward_native(flat, route, group)
        elif self.cfg.backend == "dense":
            y = self.dense(flat)
            stats = MoEStats.zeros(self.cfg.num_experts, flat.shape[0], x.device)
        else:
            y, stats = self.deepspeed(flat)
        return y.to(x.dtype).reshape(x.shape), stats

    def _forward_native(
        self, x: Tensor, route_input: Tensor | None = None, groups: Tensor | None = None
    ) -> tuple[Tensor, MoEStats]:
        cfg = self.cfg
        tokens = x.shape[0]
        logits = self.router(x if route_input is None else x + route_input)  # [t, e] fp32
        probs, weights, experts = top_k_routing(logits, cfg.top_k)  # [t, e], [t, k], [t, k]
        position = slot_positions(experts, cfg.num_experts)  # [k, t]
        capacity = self._capacity(tokens, position)
        slots = route_slots(experts, position, capacity, cfg.num_experts)  # [k, t]
        if self.ep_size == 1 and cfg.dispatch == "grouped":
            route_ids, token_ids, counts = grouped_routes(slots, cfg.num_experts, capacity)
            rows = _autocast_input(x).index_select(0, token_ids)  # [r, d]
            expert_out = self.experts.forward_grouped(rows, counts)
            route_weights = weights.t().reshape(-1).index_select(0, route_ids)  # [r]
            y = combine_grouped(expert_out, token_ids, route_weights, tokens)  # [t, d] fp32
        else:
            buffer = dispatch(x, slots, cfg.num_experts, capacity)  # [e, c, d]
            expert_out = self._run_experts(buffer)  # [e, c, d]
            y = combine(expert_out, slots, weights)  # [t, d] fp32

        counts = expert_counts(experts, cfg.num_experts)  # [t, e]
        balance = (
            load_balancing_loss(probs, counts)
            if groups is None
            else grouped_balancing_loss(probs, counts, groups)
        )
        z_loss = router_z_loss(logits)
        stats = MoEStats(
            aux_loss=cfg.balance_loss_weight * balance + cfg.z_loss_weight * z_loss,
            balance_loss=balance,
            z_loss=z_loss,
            expert_load=(counts.sum(0) / max(1, tokens * cfg.top_k)).detach(),
            dropped_tokens=(position >= capacity).sum(),
            tokens=tokens,
            assignments=experts.detach(),
        )
        return y, stats

    def _capacity(self, tokens: int, position: Tensor) -> int:
        """Slots per expert; equal on every rank of the EP group (all-to-all needs it)."""
        cfg = self.cfg
        if cfg.dropless or (cfg.eval_dropless and not self.training):
            capacity = int(position.max()) + 1 if position.numel() else 1
        else:
            capacity = expert_capacity(tokens, cfg.num_experts, cfg.top_k, cfg.capacity_factor)
        return ep.all_reduce_max_int(capacity, self.ep_group, position.device)

    def _run_experts(self, buffer: Tensor) -> Tensor:
        """[e, c, d] -> [e, c, d]; with P ranks each runs its l = e / p experts on the slots of
        every rank, exchanged by all-to-all."""
        if self.ep_size == 1:
            return self.experts(buffer)
        p, l = self.ep_size, self.num_local_experts  # noqa: E741
        e, c, d = buffer.shape
        received = ep.all_to_all(buffer, self.ep_group)  # [p*l, c, d]: rank q's slots of my experts
        local_in = received.view(p, l, c, d).transpose(0, 1).reshape(l, p * c, d)  # [l, p*c, d]
        local_out = self.experts(local_in)  # [l, p*c, d]
        send = local_out.view(l, p, c, d).transpose(0, 1).reshape(e, c, d)  # [p*l, c, d]
        return ep.all_to_all(send, self.ep_group)  # [e, c, d], my tokens' outputs


def _autocast_input(x: Tensor) -> Tensor:
    """x in the autocast dtype when autocast is on: cast once before the gather, not once per
    expert inside each matmul (the cast is the same either way, the gather moves fewer bytes)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(device))
    return x


def dense_hidden_width(cfg: MoEConfig) -> int:
    """Hidden width of the dense FFN with the MoE's active parameters per token.

    A token runs through top_k experts of d_hidden each (2 d d_hidden + d_hidden + d weights
    apiece), so one MLP of top_k * d_hidden has the same weights per token up to the router's
    d x num_experts and (top_k - 1) output biases."""
    return cfg.top_k * cfg.d_hidden


class DenseFeedForward(nn.Module):
    """Dense MLP d -> hidden -> d (the ablation baseline with top_k experts' active width)."""

    def __init__(self, d_model: int, d_hidden: int, activation: str) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_hidden)
        self.fc_out = nn.Linear(d_hidden, d_model)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.act(self.fc_in(x)))  # [t, d]


class DeepSpeedMoE(nn.Module):
    """``deepspeed.moe.layer.MoE`` behind MoEFeedForward's signature.

    Works on CPU at world size 1 without torch.distributed (DeepSpeed picks its CPU accelerator
    when no GPU is found). With an ``ep_group`` of size P, DeepSpeed's own group registry is
    bypassed: the layer is built with ep_size=P and handed the group directly. Its l_aux (for
    k=2 it counts only first choices in f_e) is the balance loss; DeepSpeed has no z-loss.
    Second-expert Gumbel sampling and random token selection are off, to match the native
    backend's deterministic top-k.
    """

    def __init__(self, cfg: MoEConfig, ep_group: dist.ProcessGroup | None) -> None:
        super().__init__()
        try:
            from deepspeed.moe.layer import MoE
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ImportError(
                f"moe.backend='deepspeed' needs the deepspeed package ({err}); install "
                "deepspeed==0.19.8 or set moe.backend to 'native'"
            ) from err
        self.cfg = cfg
        ep_size = ep.group_size(ep_group)
        expert = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_hidden),
            _Activation(cfg.activation),
            nn.Linear(cfg.d_hidden, cfg.d_model),
        )
        self.moe = MoE(
            hidden_size=cfg.d_model,
            expert=expert,
            num_experts=cfg.num_experts,
            ep_size=ep_size,
            k=cfg.top_k,
            capacity_factor=cfg.capacity_factor,
            eval_capacity_factor=cfg.capacity_factor,
            min_capacity=0,
            noisy_gate_policy="Jitter" if cfg.jitter_noise > 0 else None,
            drop_tokens=not cfg.dropless,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        if ep_size > 1:
            _init_deepspeed_comm()
            self.moe.deepspeed_moe._set_ep_group(ep_group)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEStats]:
        cfg = self.cfg
        tokens = x.shape[0]
        y, l_aux, exp_counts = self.moe(x)  # [t, d], scalar, [e] routes per expert (pre-drop)
        zero = torch.zeros((), device=x.device)
        counts = exp_counts.to(x.device).float()
        stats = MoEStats(
            aux_loss=cfg.balance_loss_weight * l_aux,
            balance_loss=l_aux,
            z_loss=zero,
            expert_load=(counts / counts.sum().clamp_min(1.0)).detach(),
            dropped_tokens=self._dropped(counts, tokens),
            tokens=tokens,
        )
        return y, stats

    def _dropped(self, counts: Tensor, tokens: int) -> Tensor:
        """Routes over DeepSpeed's capacity ceil(tokens / e * capacity_factor * k)
        (``sharded_moe._capacity``; its top-1/top-2/top-k gates all use that formula)."""
        if self.cfg.dropless:
            return torch.zeros((), dtype=torch.int64, device=counts.device)
        factor = self.cfg.capacity_factor * self.cfg.top_k
        capacity = math.ceil(tokens / self.cfg.num_experts * factor)
        return (counts - capacity).clamp_min(0).sum().to(torch.int64)


def _init_deepspeed_comm() -> None:
    """DeepSpeed's all-to-all goes through ``deepspeed.comm``, which must wrap the process
    group the caller already initialised with torch.distributed."""
    import deepspeed.comm as ds_comm

    from moedream.torch_extensions import load_deepspeed_comm_ops

    if not dist.is_initialized():
        raise RuntimeError(
            "moe.backend='deepspeed' with an ep_group needs torch.distributed initialised first "
            "(dist.init_process_group)"
        )
    if not ds_comm.is_initialized():
        load_deepspeed_comm_ops()
        ds_comm.init_distributed(
            dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False
        )


class _Activation(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.fn = ACTIVATIONS[name]

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def count_parameters(module: nn.Module) -> dict[str, int]:
    """{"total": all parameters, "expert": expert-shard parameters} of a module."""
    total = expert = 0
    for name, param in module.named_parameters():
        total += param.numel()
        expert += param.numel() if ep.is_expert_param(name) else 0
    return {"total": total, "expert": expert}


__all__ = [
    "MoEConfig",
    "MoEStats",
    "MoEFeedForward",
    "Router",
    "BatchedExperts",
    "DenseFeedForward",
    "dense_hidden_width",
    "DeepSpeedMoE",
    "top_k_routing",
    "load_balancing_loss",
    "grouped_balancing_loss",
    "router_z_loss",
    "expert_capacity",
    "merge_stats",
    "count_parameters",
]
