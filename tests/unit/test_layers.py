"""The world model's MLP builder: layer layout (checkpoint keys depend on it) and its check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moedream.world_model.layers import mlp


@pytest.mark.parametrize("hidden_layers, kinds", [
    (1, [nn.Linear, nn.LayerNorm, nn.SiLU, nn.Linear]),
    (2, [nn.Linear, nn.LayerNorm, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]),
])  # fmt: skip
def test_layout_is_the_one_checkpoints_were_saved_with(hidden_layers, kinds):
    net = mlp(5, 8, 3, hidden_layers=hidden_layers)
    assert [type(layer) for layer in net] == kinds
    assert net(torch.zeros(4, 2, 5)).shape == (4, 2, 3)


def test_zero_hidden_layers_is_refused():
    with pytest.raises(ValueError, match="hidden_layers = 0 is invalid"):
        mlp(5, 8, 3, hidden_layers=0)
