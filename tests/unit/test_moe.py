"""MoE layer: routing, aux losses, capacity dropping, outputs against brute force, backends."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moedream.config import ConfigError
from moedream.world_model.moe import (
    MoEConfig,
    MoEFeedForward,
    MoEStats,
    dense_hidden_width,
    expert_capacity,
    load_balancing_loss,
    merge_stats,
    route_slots,
    router_z_loss,
    slot_positions,
    top_k_routing,
)


def small_cfg(**changes) -> MoEConfig:
    base = dict(d_model=8, d_hidden=16, num_experts=4, top_k=2)
    base.update(changes)
    return MoEConfig(**base)


@torch.no_grad()
def brute_force_moe(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """y = sum_{i in top-k} p_i * expert_i(x), one token and one expert at a time."""
    cfg, experts = layer.cfg, layer.experts
    x = x.detach()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(layer.router.weight @ x[t], dim=-1)
        chosen = sorted(range(cfg.num_experts), key=lambda e: -float(probs[e]))[: cfg.top_k]
        total = sum(float(probs[e]) for e in chosen) if cfg.top_k > 1 else 1.0
        for e in chosen:
            hidden = F.gelu(x[t] @ experts.w_in[e] + experts.b_in[e])
            out[t] += float(probs[e]) / total * (hidden @ experts.w_out[e] + experts.b_out[e])
    return out


def routed_layer(choices: list[int], **changes) -> tuple[MoEFeedForward, torch.Tensor]:
    """A layer whose router sends token i to expert choices[i] first, (choices[i] + 1) % 4 second."""
    cfg = small_cfg(d_model=4, num_experts=4, **changes)
    layer = MoEFeedForward(cfg)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4) * 5.0)
    first = torch.tensor(choices)
    x = F.one_hot(first, 4).float() + 0.5 * F.one_hot((first + 1) % 4, 4).float()  # [t, 4]
    return layer, x


# --- routing and losses ------------------------------------------------------------------------


def test_top_k_routing_matches_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(50, 6)
    probs, weights, experts = top_k_routing(logits, 3)
    assert probs.dtype == torch.float32
    for t in range(50):
        p = torch.softmax(logits[t], -1)
        order = sorted(range(6), key=lambda e: -float(p[e]))[:3]
        assert experts[t].tolist() == order
        expected = torch.tensor([float(p[e]) for e in order])
        torch.testing.assert_close(weights[t], expected / expected.sum())


def test_top1_keeps_raw_probability():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    _, weights, experts = top_k_routing(logits, 1)
    assert experts.item() == 0
    torch.testing.assert_close(weights[0, 0], torch.softmax(logits, -1)[0, 0])


def test_load_balancing_loss_hand_made():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    top1 = torch.tensor([[0], [0], [2], [0]])
    f = torch.tensor([3 / 4, 0.0, 1 / 4])
    p_mean = probs.mean(0)
    expected = 3 * float((f * p_mean).sum())
    assert load_balancing_loss(probs, top1).item() == pytest.approx(expected)
    mask = F.one_hot(top1[:, 0], 3).float()
    assert load_balancing_loss(probs, mask).item() == pytest.approx(expected)
    assert load_balancing_loss(probs, mask.bool()).item() == pytest.approx(expected)


def test_load_balancing_loss_is_one_when_uniform():
    num_experts, tokens = 4, 8
    probs = torch.full((tokens, num_experts), 1 / num_experts)
    top2 = torch.tensor([[t % 4, (t + 1) % 4] for t in range(tokens)])
    assert load_balancing_loss(probs, top2).item() == pytest.approx(1.0)
    # collapsed routing with confident probabilities is penalised: E * 1 * 1 = E
    collapsed = F.one_hot(torch.zeros(tokens, dtype=torch.long), num_experts).float()
    assert load_balancing_loss(collapsed, collapsed).item() == pytest.approx(num_experts)


def test_router_z_loss_formula():
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    expected = (math.log(2.0) ** 2 + math.log(math.exp(1) + math.exp(3)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


# --- capacity ----------------------------------------------------------------------------------


def test_capacity_formula():
    assert expert_capacity(100, 8, 2, 1.25) == math.ceil(1.25 * 2 * 100 / 8)
    assert expert_capacity(3, 8, 2, 100.0) == 3  # never more slots than tokens


def test_first_choices_fill_slots_before_second_choices():
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]])  # [t=3, k=2]
    position = slot_positions(experts, 2)  # [k, t]
    assert position.tolist() == [[0, 0, 1], [1, 2, 2]]
    slots = route_slots(experts, position, capacity=2, num_experts=2)
    assert slots.tolist() == [[0, 2, 1], [3, 4, 4]]  # 4 = scratch slot: dropped


def test_dropped_tokens_counted_on_skewed_routing():
    # 8 tokens, top-1, 4 experts, capacity_factor 1 -> C = 2; expert 0 gets 5 tokens -> 3 dropped
    choices = [0, 0, 0, 0, 0, 1, 1, 2]
    layer, x = routed_layer(choices, top_k=1, capacity_factor=1.0)
    y, stats = layer(x)
    assert stats.dropped_tokens.item() == 3
    assert stats.tokens == 8
    torch.testing.assert_close(stats.expert_load, torch.tensor([5, 2, 1, 0]) / 8)
    # tokens 2, 3, 4 came after expert 0's two slots were full: their output is 0
    assert torch.all(y[2:5] == 0)
    reference = brute_force_moe(layer, x)
    torch.testing.assert_close(y[[0, 1, 5, 6, 7]], reference[[0, 1, 5, 6, 7]])


def test_eval_mode_drops_nothing_so_rows_do_not_depend_on_the_batch():
    choices = [0, 0, 0, 0, 0, 1, 1, 2]
    layer, x = routed_layer(choices, top_k=1, capacity_factor=1.0)
    layer.eval()
    with torch.no_grad():
        y, stats = layer(x)
        alone, _ = layer(x[4:5])  # token 4 was dropped in training mode behind tokens 0-3
    assert stats.dropped_tokens.item() == 0
    torch.testing.assert_close(y, brute_force_moe(layer, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[4:5], alone)
    layer.cfg.eval_dropless = False  # the old behaviour: capacity applies in eval too
    with torch.no_grad():
        assert layer(x)[1].dropped_tokens.item() == 3


def test_dropless_drops_nothing_and_matches_brute_force():
    choices = [0, 0, 0, 0, 0, 1, 1, 2]
    layer, x = routed_layer(choices, top_k=2, capacity_factor=1.0, dropless=True)
    y, stats = layer(x)
    assert stats.dropped_tokens.item() == 0
    torch.testing.assert_close(y, brute_force_moe(layer, x), rtol=1e-5, atol=1e-6)


# --- the layer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_output_matches_brute_force_when_nothing_dropped(top_k):
    torch.manual_seed(1)
    layer = MoEFeedForward(small_cfg(top_k=top_k, capacity_factor=8.0))
    x = torch.randn(2, 13, 8)
    y, stats = layer(x)
    assert y.shape == x.shape
    assert stats.dropped_tokens.item() == 0
    reference = brute_force_moe(layer, x.reshape(-1, 8)).reshape(x.shape)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-6)
    assert stats.expert_load.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.25, 8.0])
def test_grouped_dispatch_equals_capacity_buffer(capacity_factor):
    """Running each expert on exactly its routed tokens gives the padded buffer's outputs,
    drops and gradients (capacity 0.5 drops many routes, 8.0 none)."""
    torch.manual_seed(5)
    x = torch.randn(40, 8)
    results = {}
    for dispatch in ("grouped", "buffer"):
        torch.manual_seed(6)
        layer = MoEFeedForward(small_cfg(capacity_factor=capacity_factor, dispatch=dispatch))
        inputs = x.clone().requires_grad_(True)
        y, stats = layer(inputs)
        (y.square().sum() + stats.aux_loss).backward()
        grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
        results[dispatch] = (y.detach(), int(stats.dropped_tokens), inputs.grad, grads)
    (y_g, drop_g, dx_g, grads_g), (y_b, drop_b, dx_b, grads_b) = (
        results["grouped"],
        results["buffer"],
    )
    assert drop_g == drop_b
    assert (drop_g > 0) == (capacity_factor < 1.0)
    torch.testing.assert_close(y_g, y_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_g, dx_b, rtol=1e-5, atol=1e-6)
    for name in grads_b:
        torch.testing.assert_close(grads_g[name], grads_b[name], rtol=1e-5, atol=1e-6)


def test_grouped_dispatch_with_an_idle_expert():
    # every token prefers experts 0 and 1: experts 2 and 3 get no rows (empty groups)
    layer, x = routed_layer([0, 0, 0, 0, 0, 0], top_k=1, capacity_factor=8.0)
    y, stats = layer(x)
    torch.testing.assert_close(y, brute_force_moe(layer, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.expert_load, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_stats_losses_are_the_free_functions_of_the_router():
    torch.manual_seed(2)
    cfg = small_cfg(balance_loss_weight=0.5, z_loss_weight=0.25)
    layer = MoEFeedForward(cfg)
    x = torch.randn(20, 8)
    _, stats = layer(x)
    logits = x @ layer.router.weight.T
    probs, _, experts = top_k_routing(logits, cfg.top_k)
    balance = load_balancing_loss(probs, experts)
    z_loss = router_z_loss(logits)
    torch.testing.assert_close(stats.balance_loss, balance)
    torch.testing.assert_close(stats.z_loss, z_loss)
    torch.testing.assert_close(stats.aux_loss, 0.5 * balance + 0.25 * z_loss)


def test_gradients_flow_to_router_and_experts():
    torch.manual_seed(3)
    layer = MoEFeedForward(small_cfg(balance_loss_weight=0.0, z_loss_weight=0.0))
    x = torch.randn(32, 8, requires_grad=True)
    y, stats = layer(x)
    (y.square().mean() + stats.aux_loss).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bf16_autocast_keeps_router_in_fp32():
    torch.manual_seed(4)
    layer = MoEFeedForward(small_cfg())
    x = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router(x)
        y, stats = layer(x)
    assert logits.dtype == torch.float32
    assert y.dtype == x.dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y, layer(x)[0], rtol=0.05, atol=0.05)


def test_jitter_noise_only_in_training():
    torch.manual_seed(5)
    layer = MoEFeedForward(small_cfg(jitter_noise=0.5))
    x = torch.randn(16, 8)
    assert not torch.equal(layer.router(x), layer.router(x))
    layer.eval()
    assert torch.equal(layer.router(x), layer.router(x))


def test_dense_backend_has_top_k_experts_active_width():
    cfg = small_cfg(backend="dense", top_k=2)
    layer = MoEFeedForward(cfg)
    assert dense_hidden_width(cfg) == cfg.top_k * cfg.d_hidden
    assert layer.dense.fc_in.weight.shape == (dense_hidden_width(cfg), cfg.d_model)
    # active weights per token: top_k experts' minus the (top_k - 1) output biases they add
    moe = MoEFeedForward(small_cfg(backend="native", top_k=2))
    one_expert = sum(p[0].numel() for p in moe.experts.parameters())  # [E, ...] stacked
    dense = sum(p.numel() for p in layer.dense.parameters())
    assert dense == cfg.top_k * one_expert - (cfg.top_k - 1) * cfg.d_model
    x = torch.randn(3, 5, 8, requires_grad=True)
    y, stats = layer(x)
    assert y.shape == x.shape
    assert stats.aux_loss.item() == 0 and stats.dropped_tokens.item() == 0 and stats.tokens == 15
    y.sum().backward()
    assert x.grad is not None


def test_merge_stats_and_logs():
    a = MoEStats.zeros(4, 10, torch.device("cpu"))
    b = MoEStats.zeros(4, 6, torch.device("cpu"))
    b.expert_load = torch.tensor([1.0, 0, 0, 0])
    b.dropped_tokens = torch.tensor(3)
    merged = merge_stats([a, b])
    assert merged.tokens == 16 and merged.dropped_tokens.item() == 3
    torch.testing.assert_close(merged.expert_load, torch.tensor([0.5, 0, 0, 0]))
    logs = merged.to_logs()
    assert logs["moe/dropped_fraction"] == pytest.approx(3 / 16)


def test_wrong_input_width_names_d_model():
    layer = MoEFeedForward(small_cfg())
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(4, 7))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(top_k=5), "top_k"),
        (dict(num_experts=0), "num_experts"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(backend="megablocks"), "backend"),
        (dict(activation="tanh"), "activation"),
        (dict(jitter_noise=1.5), "jitter_noise"),
        (dict(dispatch="scatter"), "dispatch"),
        (dict(balance_loss_weight=-1.0), "balance_loss_weight"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        small_cfg(**changes).validate()


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="num_expert"):
        MoEConfig.from_dict({"num_expert": 4})
    assert MoEConfig.from_dict({"top_k": 1}).top_k == 1


# --- DeepSpeed backend -------------------------------------------------------------------------


def _require_deepspeed():
    try:
        import deepspeed.moe.layer  # noqa: F401
    except ModuleNotFoundError as err:
        pytest.skip(f"deepspeed is not installed ({err}); `make install` pins deepspeed==0.19.8")
    except Exception as err:  # installed but broken: that is a failure, with the reason
        pytest.fail(f"deepspeed is installed but `import deepspeed.moe.layer` failed: {err!r}")


def copy_native_into_deepspeed(native: MoEFeedForward, ds_layer: MoEFeedForward) -> None:
    moe = ds_layer.deepspeed.moe.deepspeed_moe
    with torch.no_grad():
        moe.gate.wg.weight.copy_(native.router.weight)
        for e, mlp in enumerate(moe.experts.deepspeed_experts):
            mlp[0].weight.copy_(native.experts.w_in[e].T)
            mlp[0].bias.copy_(native.experts.b_in[e])
            mlp[2].weight.copy_(native.experts.w_out[e].T)
            mlp[2].bias.copy_(native.experts.b_out[e])


def test_deepspeed_backend_forward_backward_shapes():
    _require_deepspeed()
    torch.manual_seed(6)
    layer = MoEFeedForward(small_cfg(backend="deepspeed"))
    x = torch.randn(2, 16, 8, requires_grad=True)
    y, stats = layer(x)
    assert y.shape == x.shape
    assert stats.expert_load.shape == (4,) and stats.expert_load.sum().item() == pytest.approx(1.0)
    assert stats.tokens == 32 and stats.balance_loss.requires_grad
    (y.sum() + stats.aux_loss).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert layer.deepspeed.moe.deepspeed_moe.gate.wg.weight.grad is not None


def test_deepspeed_backend_equals_native_with_same_weights():
    _require_deepspeed()
    torch.manual_seed(7)
    native = MoEFeedForward(small_cfg(dropless=True))
    deepspeed_layer = MoEFeedForward(small_cfg(dropless=True, backend="deepspeed"))
    copy_native_into_deepspeed(native, deepspeed_layer)
    x = torch.randn(40, 8)
    y_native, stats_native = native(x)
    y_ds, stats_ds = deepspeed_layer(x)
    torch.testing.assert_close(y_ds, y_native, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats_ds.expert_load, stats_native.expert_load)
