"""Expert specialisation: how routing depends on a token label (modality, agent, object type).

The metrics are plain numpy; ``layer_routes`` collects a world model's routing. Shape legend: (t)okens, (k) experts chosen per token, (E) experts, (G) label
values.

    counts[g, e] = routes of tokens labelled g to expert e               [G, E]
    P(e | g)     = counts[g, e] / sum_e counts[g, e]                     the heatmap's rows
    I(E; G)      = sum_{g,e} p(g, e) log2(p(g, e) / (p(g) p(e)))         bits

Every top-k route counts once (a token routed to experts 2 and 5 adds to both). I(E; G) is 0
when routing ignores the label and reaches min(H(E), H(G)) when the label decides the expert;
``normalised_mi`` divides by H(G) (1: the expert choice tells the label exactly).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def routing_counts(experts: np.ndarray, labels: np.ndarray, num_experts: int, num_labels: int):
    """experts [t, k] int, labels [t] int in [0, G) -> counts [G, E] float64."""
    experts = np.asarray(experts, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if experts.ndim != 2 or labels.shape != (experts.shape[0],):
        raise ValueError(
            f"routing_counts: experts must be [t, k] and labels [t], got {experts.shape} and "
            f"{labels.shape}"
        )
    counts = np.zeros((num_labels, num_experts))
    np.add.at(counts, (np.repeat(labels, experts.shape[1]), experts.reshape(-1)), 1.0)
    return counts


def routing_distribution(counts: np.ndarray) -> np.ndarray:
    """[G, E] counts -> P(expert | label) [G, E] (rows of labels never seen are 0)."""
    totals = counts.sum(1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def mutual_information(counts: np.ndarray) -> float:
    """I(expert; label) in bits from a [G, E] count table."""
    joint = counts / max(counts.sum(), 1e-12)
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)  # p(g) p(e)
    nonzero = joint > 0
    return float(np.sum(joint[nonzero] * np.log2(joint[nonzero] / outer[nonzero])))


def label_entropy(counts: np.ndarray) -> float:
    """H(label) in bits from a [G, E] count table."""
    p = counts.sum(1) / max(counts.sum(), 1e-12)
    p = p[p > 0]
    return float(-np.sum(p * np.log2(p)))


def normalised_mi(counts: np.ndarray) -> float:
    """I(expert; label) / H(label) in [0, 1] (0 when the label is constant)."""
    h = label_entropy(counts)
    return mutual_information(counts) / h if h > 0 else 0.0


@torch.no_grad()
def layer_routes(model: Any, obs: np.ndarray, action: np.ndarray) -> list[np.ndarray]:
    """The experts each backbone token is routed to, per MoE layer ([Q, k] each, tokens in
    the backbone's time-major order), for raw windows obs [B, T, N, D], action [B, T, N, A]
    of a WorldModel (native MoE backend), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        device = model.obs_mean.device
        as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device)  # noqa: E731
        out = model.backbone.encode(
            obs=model.normalize_obs(as_tensor(obs)), action=as_tensor(action)
        )
    finally:
        model.train(was_training)
    if any(s.assignments is None for s in out.stats):
        raise ValueError("routing assignments need moe.backend 'native'")
    return [s.assignments.cpu().numpy() for s in out.stats]


def token_labels(
    modality: np.ndarray, batch: int, steps: int, agents: int
) -> dict[str, np.ndarray]:
    """Modality and agent of every backbone token (time-major, as the backbone orders them)
    of windows [batch, steps, agents]; ``modality`` [S] is the tokenizer's per-token modality."""
    s = len(modality)
    shape = (batch, steps, agents, s)
    return {
        "modality": np.broadcast_to(np.asarray(modality), shape).reshape(-1),
        "agent": np.broadcast_to(np.arange(agents)[:, None], shape).reshape(-1),
    }


def specialisation_logs(model: Any, obs: np.ndarray, action: np.ndarray) -> dict[str, float]:
    """moe/nmi_modality_l{i} and moe/nmi_agent_l{i}: I(expert; label) / H(label) per layer."""
    from moedream.world_model.tokenizers import MODALITIES

    b, t, n = np.asarray(obs).shape[:3]
    labels = token_labels(model.backbone.tokenizer.modality.cpu().numpy(), b, t, n)
    sizes = {"modality": len(MODALITIES), "agent": n}
    e = model.config.moe.num_experts
    logs = {}
    for layer, experts in enumerate(layer_routes(model, obs, action)):
        for key, values in labels.items():
            counts = routing_counts(experts, values, e, sizes[key])
            logs[f"moe/nmi_{key}_l{layer}"] = normalised_mi(counts)
    return logs
