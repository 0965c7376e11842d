"""Fault injection into a trained world model: the broken models the coherence gate benchmarks
(gate_faults.py, gate_training.py) feed it. Each returns a faulty copy; the good model is kept.

Every fault touches the reward head or the dynamics head alone, never the K-member ensemble,
so it shows as a gap between them (what the gate's model terms measure).
"""

from __future__ import annotations

import numpy as np
import torch

from moedream.world_model.model import WorldModel


def copy_model(model: WorldModel) -> WorldModel:
    out = WorldModel(model.config, model.spec)
    out.load_state_dict(model.state_dict())
    return out


def with_reward_bias(good: WorldModel, bias: float) -> WorldModel:
    """The reward head's output + ``bias`` at every step (raw reward units): a constant bias."""
    model = copy_model(good)
    with torch.no_grad():
        model.reward_head.net[-1].bias.add_(bias / float(good.reward_std.mean()))
    return model


def with_corrupt_dynamics(good: WorldModel, scale: float, seed: int) -> WorldModel:
    """Gaussian noise of ``scale`` times the weights' own std added to the last layer of the
    dynamics (mean) head."""
    model = copy_model(good)
    last = model.mean_head[-1]  # Linear(hidden, N*D): the regressed next-step change
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        noise = torch.randn(last.weight.shape, generator=gen) * last.weight.std() * scale
        last.weight.add_(noise)
    return model


def with_action_reward_bias(
    good: WorldModel, windows: dict[str, np.ndarray], action: int, bias: float
) -> tuple[WorldModel, dict[str, float]]:
    """Extra imagined reward ``bias`` (raw units) for every agent step that takes discrete
    action ``action``: a fault a planner can exploit (it learns to take that action), unlike a
    constant bias, which mostly shifts values.

    The reward head's last layer is linear in its hidden features h [M, N, F]; a least-squares
    probe (w, c) with h·w + c ≈ bias·1[a = action] / σ_r on the real ``windows`` (obs
    [B, T+1, N, D], encoded action [B, T, N, A], ...) is added to that layer's weight and bias,
    so the fault lives in the checkpoint's weights and is served like any model. Returns the
    faulty model and the bias it adds on those windows, for the action and for the others.
    """
    model = copy_model(good)
    last = model.reward_head.net[-1]  # Linear(F, 1), shared over agents
    features: list[torch.Tensor] = []  # the head's input, once per predict_windows
    hook = last.register_forward_hook(lambda _m, inputs, _o: features.append(inputs[0].detach()))
    try:
        before = model.predict_windows(windows, noise_scale=0.0)["reward"]  # [B, T, N]
    finally:
        hook.remove()
    h = features[0].reshape(-1, last.in_features).double()  # [B*T*N, F], agents fastest
    takes = torch.as_tensor(np.asarray(windows["action"])[..., action]).reshape(-1).double()
    target = takes * bias / float(good.reward_std.mean())  # normalised reward units
    design = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)  # [M, F + 1]
    solution = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]  # [F + 1]
    with torch.no_grad():
        last.weight.add_(solution[:-1].to(last.weight.dtype)[None])
        last.bias.add_(solution[-1].to(last.bias.dtype))
    added = (model.predict_windows(windows, noise_scale=0.0)["reward"] - before).reshape(-1)
    mask = takes.bool()
    return model, {
        "bias_on_action": float(added[mask].mean()),
        "bias_on_others": float(added[~mask].mean()),
    }
