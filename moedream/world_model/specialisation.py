"""Expert specialisation: how routing depends on a token label (modality, agent, object type).

Plain numpy. Shape legend: (t)okens, (k) experts chosen per token, (E) experts, (G) label
values.

    counts[g, e] = routes of tokens labelled g to expert e               [G, E]
    P(e | g)     = counts[g, e] / sum_e counts[g, e]                     the heatmap's rows
    I(E; G)      = sum_{g,e} p(g, e) log2(p(g, e) / (p(g) p(e)))         bits

Every top-k route counts once (a token routed to experts 2 and 5 adds to both). I(E; G) is 0
when routing ignores the label and reaches min(H(E), H(G)) when the label decides the expert;
``normalised_mi`` divides by H(G) (1: the expert choice tells the label exactly).
"""

from __future__ import annotations

import numpy as np


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
