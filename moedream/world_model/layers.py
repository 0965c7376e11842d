"""The world model's one MLP builder (heads, RSSM prior/posterior)."""

from __future__ import annotations

from torch import nn


def mlp(d_in: int, hidden: int, d_out: int, *, hidden_layers: int = 2) -> nn.Sequential:
    """``hidden_layers`` SiLU layers of width ``hidden``, the first LayerNorm-ed, then a linear out.

    [..., d_in] -> [..., d_out]. LayerNorm after the first projection keeps the heads stable
    when their conditioning features (MoE outputs, RSSM states) drift in scale during training.
    """
    if hidden_layers < 1:
        raise ValueError(f"hidden_layers = {hidden_layers} is invalid: must be >= 1")
    layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.SiLU()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(hidden, hidden), nn.SiLU()]
    layers.append(nn.Linear(hidden, d_out))
    return nn.Sequential(*layers)
