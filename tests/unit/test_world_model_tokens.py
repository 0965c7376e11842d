"""Tokenisation by modality, the discrete next-observation head, modality-aware routing and
the expert-specialisation metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moedream.config import ConfigError
from moedream.envs.spec import EnvSpec
from moedream.world_model.discrete_head import value_vocabulary
from moedream.world_model.model import WorldModel
from moedream.world_model.moe import (
    MoEConfig,
    MoEFeedForward,
    grouped_balancing_loss,
    load_balancing_loss,
)
from moedream.world_model.specialisation import (
    mutual_information,
    normalised_mi,
    routing_counts,
    routing_distribution,
)
from moedream.world_model.tokenizers import GRID_PLANES, MODALITIES, resolve_kind, tokenizer_for
from moedream.world_model.train_local import TrainConfig, fit
from tests.world_models import tiny_config

SIDE = 3  # the toy grid world is SIDE x SIDE cells
MOVES = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]])  # stay, up, down, left, right


def toy_spec() -> EnvSpec:
    d = SIDE * SIDE * GRID_PLANES
    return EnvSpec("toy_grid", ("a0", "a1"), (d, d), "discrete", (5, 5), {})


def toy_windows(episodes: int, steps: int, window: int, seed: int) -> dict[str, np.ndarray]:
    """A deterministic 2-agent grid world: each agent moves by its action, walls stop it.
    Agent i's observation: plane 0 = its own cell, plane 1 = the other agent's cell."""
    rng = np.random.default_rng(seed)
    obs, action = [], []
    for _ in range(episodes):
        pos = rng.integers(0, SIDE, size=(2, 2))
        ep_obs, ep_act = [], []
        for _ in range(steps + 1):
            grid = np.zeros((2, SIDE, SIDE, GRID_PLANES), dtype=np.float32)
            for i in range(2):
                grid[i, pos[i][0], pos[i][1], 0] = 1.0
                grid[1 - i, pos[i][0], pos[i][1], 1] = 1.0
            ep_obs.append(grid.reshape(2, -1))
            act = rng.integers(0, 5, size=2)
            ep_act.append(np.eye(5, dtype=np.float32)[act])
            pos = np.clip(pos + MOVES[act], 0, SIDE - 1)
        for s in range(0, steps - window + 1, window):
            obs.append(np.stack(ep_obs[s : s + window + 1]))
            action.append(np.stack(ep_act[s : s + window]))
    obs_arr, act_arr = np.asarray(obs), np.asarray(action)
    b = obs_arr.shape[0]
    zeros = np.zeros((b, window, 2), dtype=np.float32)
    return {"obs": obs_arr, "action": act_arr, "reward": zeros, "terminated": zeros.copy()}


def new_model(spec: EnvSpec, **changes) -> WorldModel:
    config = tiny_config(
        tokenizer="grid",
        obs_head="discrete",
        backbone={"num_layers": 1, "num_heads": 2, "max_context": 2, "modality_routing": True},
        **changes,
    )
    return WorldModel(config, spec)


# ----------------------------------------------------------------------------- tokenizers


def test_grid_tokenizer_gives_cell_agent_and_action_tokens() -> None:
    tok = tokenizer_for("grid", toy_spec(), d_model=8)
    obs, action = torch.randn(3, 2, 2, SIDE * SIDE * GRID_PLANES), torch.randn(3, 2, 2, 5)
    tokens = tok(obs, action)
    cells = SIDE * SIDE
    assert tokens.shape == (3, 2, 2, cells + 2, 8)
    names = [MODALITIES[i] for i in tok.modality.tolist()]
    assert names == ["cell"] * cells + ["agent", "action"]
    assert tok.summary_token == cells and tok.obs_tokens == cells
    # a cell token depends on its own planes only: change cell 4, only token 4 moves
    changed = obs.clone()
    changed[..., 4 * GRID_PLANES] += 1.0
    moved = (tok(changed, action) - tokens).abs().sum((0, 1, 2, 4)) > 0
    assert moved.tolist() == [i == 4 for i in range(cells + 2)]


def test_auto_tokenizer_follows_the_env_spec() -> None:
    grid = EnvSpec("overcooked", ("a", "b"), (520, 520), "discrete", (6, 6), {"encoding": "grid"})
    feat = EnvSpec(
        "overcooked", ("a", "b"), (96, 96), "discrete", (6, 6), {"encoding": "featurized"}
    )
    assert resolve_kind("auto", grid) == "grid"
    assert resolve_kind("auto", feat) == "flat"
    with pytest.raises(ConfigError, match="tokenizer.*grid.*97 features"):
        tokenizer_for("grid", EnvSpec("x", ("a",), (97,), "discrete", (2,), {}), d_model=8)


def test_bad_model_switches_name_the_field() -> None:
    with pytest.raises(ConfigError, match="obs_head"):
        tiny_config(obs_head="categorical")
    with pytest.raises(ConfigError, match="tokenizer"):
        tiny_config(tokenizer="patch")


def test_modality_routing_needs_the_native_backend() -> None:
    layer = MoEFeedForward(MoEConfig(d_model=8, d_hidden=8, num_experts=4, backend="dense"))
    with pytest.raises(ValueError, match="modality-aware routing needs moe.backend 'native'"):
        layer(torch.randn(5, 8), groups=torch.zeros(5, dtype=torch.long))


# ------------------------------------------------------------------------ discrete head


def test_value_vocabulary_marks_many_valued_features_continuous() -> None:
    values = torch.zeros(50, 1, 2)
    values[:, 0, 0] = torch.tensor([0.0, 1.0, 3.0]).repeat(17)[:50]  # 3 values: discrete
    values[:, 0, 1] = torch.linspace(-1, 1, 50)  # 50 values: continuous
    vocab, counts = value_vocabulary(values, size=4)
    assert counts.tolist() == [[3, 5]]
    assert vocab[0, 0].tolist() == [0.0, 1.0, 3.0, 3.0]  # padded with the largest


def test_discrete_model_keeps_continuous_features_from_diffusion() -> None:
    spec = EnvSpec("toy", ("a0", "a1"), (3, 3), "discrete", (2, 2), {})
    model = WorldModel(tiny_config(obs_head="discrete", discrete_values=4), spec)
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 2, size=(8, 3, 2, 3)).astype(np.float32)
    obs[..., 2] = rng.normal(size=(8, 3, 2))  # a continuous feature
    zeros = np.zeros((8, 2, 2), np.float32)
    batch = {"obs": obs, "action": np.eye(2, dtype=np.float32)[rng.integers(0, 2, (8, 2, 2))],
             "reward": zeros, "terminated": zeros}  # fmt: skip
    model.fit_normalization(batch)
    assert model.discrete_features().tolist() == [[True, True, False]] * 2
    loss, logs = model.loss(batch)
    assert torch.isfinite(loss) and logs["wm/discrete"] > 0
    pred = model.predict_windows(batch, noise_scale=0.0)["next_obs"]
    assert set(pred[..., :2].unique().tolist()) <= {0.0, 1.0}  # values from the vocabulary


def countdown_windows(windows: int = 10, window: int = 4) -> dict[str, np.ndarray]:
    """One agent, features [timer, flag]: the timer counts 9, 8, ..., 0 and restarts at 9
    (10 values, but only the changes -1 and +9); the flag is always 1."""
    steps = np.arange(windows)[:, None] * window + np.arange(window + 1)  # [B, T+1]
    timer = (9 - steps % 10).astype(np.float32)
    obs = np.stack([timer, np.ones_like(timer)], -1)[:, :, None]  # [B, T+1, 1, 2]
    zeros = np.zeros((windows, window, 1), np.float32)
    action = np.zeros((windows, window, 1, 2), np.float32)
    action[..., 0] = 1.0
    return {"obs": obs, "action": action, "reward": zeros, "terminated": zeros}


def test_delta_classes_make_a_countdown_discrete_and_decode_inside_the_support() -> None:
    spec = EnvSpec("toy", ("a0",), (2,), "discrete", (2,), {})
    batch = countdown_windows()
    by_value = WorldModel(tiny_config(obs_head="discrete", discrete_values=4), spec)
    by_value.fit_normalization(batch)
    assert by_value.discrete_features().tolist() == [[False, True]]  # 10 timer values > 4
    model = WorldModel(
        tiny_config(obs_head="discrete", discrete_values=4, discrete_target="delta"), spec
    )
    model.fit_normalization(batch)
    assert model.discrete_features().tolist() == [[True, True]]  # 2 timer changes <= 4
    assert model.obs_values[0, 0].tolist() == [-1.0, 9.0, 9.0, 9.0]  # padded with the largest
    loss, logs = model.loss(batch)
    assert torch.isfinite(loss) and logs["wm/discrete"] > 0
    head = model.discrete_head
    with torch.no_grad():  # a head whose mode is class 0 (-1) for every feature
        head.stay.zero_()
        head.net[-1].weight.zero_()
        head.net[-1].bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]).repeat(2))
    pred = model.predict_windows(batch, noise_scale=0.0)["next_obs"][:, :, 0]  # [B, T, 2]
    current = torch.as_tensor(batch["obs"][:, :-1, 0])
    assert bool((current[..., 0] == 0).any())  # ... where the timer's 0 - 1 leaves the support
    assert torch.equal(pred[..., 0], (current[..., 0] - 1.0).clamp_min(0.0))
    assert torch.equal(pred[..., 1], current[..., 1])  # the flag's only change is 0: it stays
    with pytest.raises(ConfigError, match="discrete_target"):
        tiny_config(discrete_target="value_and_delta")


def countdown_model(discrete_loss: str, batch: dict[str, np.ndarray], logits) -> WorldModel:
    """A countdown model with delta classes whose head gives every row ``logits`` [4] (the
    classes: timer changes -1, +9, +9, +9)."""
    spec = EnvSpec("toy", ("a0",), (2,), "discrete", (2,), {})
    config = tiny_config(
        obs_head="discrete", discrete_values=4, discrete_target="delta", discrete_loss=discrete_loss
    )
    model = WorldModel(config, spec)
    model.fit_normalization(batch)
    with torch.no_grad():
        model.discrete_head.stay.zero_()
        model.discrete_head.net[-1].weight.zero_()
        model.discrete_head.net[-1].bias.copy_(torch.tensor(logits).repeat(2))
    return model


def uniform_head_discrete_loss(discrete_loss: str, batch: dict[str, np.ndarray]) -> float:
    """The discrete loss of a countdown model whose head gives every class probability 1/4."""
    model = countdown_model(discrete_loss, batch, [0.0] * 4)
    return model.loss(batch)[1]["wm/discrete"]


def test_change_weighted_heads_decode_the_likeliest_class_not_the_costliest() -> None:
    batch = countdown_windows()
    timer = torch.as_tensor(batch["obs"][:, :-1, 0, 0])  # [B, T]
    logits = [0.0, 1.0, -9.0, -9.0]  # the restart (+9) is e times likelier than the tick
    plain = countdown_model("cross_entropy", batch, logits)
    assert bool((plain.predict_windows(batch, noise_scale=0.0)["next_obs"][..., 0, 0] == 9).all())
    # trained with change_weighted, these logits are log p + log(1 + change^2): the restart's
    # weight 1 + (9 - timer)^2 comes off, so it stays the mode only within 2 steps of 9
    weighted = countdown_model("change_weighted", batch, logits)
    pred = weighted.predict_windows(batch, noise_scale=0.0)["next_obs"][..., 0, 0]
    assert torch.equal(pred, torch.where(timer >= 7, 9.0, (timer - 1).clamp_min(0)))


def test_discrete_losses_weight_the_countdowns_restart_by_its_squared_change() -> None:
    batch = countdown_windows()
    current, after = batch["obs"][:, :-1, 0, 0], batch["obs"][:, 1:, 0, 0]  # timer [B, T]
    change = after - current  # -1 (a tick) or +9 (the restart)
    assert set(np.unique(change).tolist()) == {-1.0, 9.0}
    ce = np.log(4.0)  # per feature, 2 features (timer, flag)
    assert uniform_head_discrete_loss("cross_entropy", batch) == pytest.approx(2 * ce)
    weighted = ce * ((1 + change**2) + 1).mean()  # the flag never changes: weight 1
    assert uniform_head_discrete_loss("change_weighted", batch) == pytest.approx(weighted)
    # classes: timer changes [-1, 9, 9, 9] (padded), decoded inside the timer's support [0, 9]
    draws = np.stack([current - 1, *[current + 9] * 3], -1).clip(0, 9)  # [B, T, 4]
    expected = ((draws - after[..., None]) ** 2).mean(-1).mean()  # the flag's draws are exact
    assert uniform_head_discrete_loss("expected_error", batch) == pytest.approx(2 * ce + expected)
    with pytest.raises(ConfigError, match="discrete_loss"):
        tiny_config(discrete_loss="focal")


def reward_model(reward: np.ndarray) -> WorldModel:
    """A flat model with nearest-value rewards fitted on windows whose rewards are
    ``reward`` [B, T, 1], its reward head's expectation set to rewards 7 and 13 alternately."""
    spec = EnvSpec("toy", ("a0",), (2,), "discrete", (2,), {})
    model = WorldModel(tiny_config(reward_prediction="nearest_value", discrete_values=4), spec)
    batch = countdown_windows(windows=reward.shape[0])
    model.fit_normalization({**batch, "reward": reward})
    return model


def test_nearest_value_rewards_snap_the_expectation_to_a_seen_reward() -> None:
    sparse = np.zeros((10, 4, 1), np.float32)
    sparse[::3, 1] = 20.0  # a soup now and then: rewards {0, 20}
    model = reward_model(sparse)
    assert model.reward_values[0, :2].tolist() == [0.0, 20.0]
    expectation = torch.tensor([[7.0], [13.0], [-1.0], [26.0]])  # [M, N]
    assert model._predicted_reward(expectation)[:, 0].tolist() == [0.0, 20.0, 0.0, 20.0]
    batch = countdown_windows()
    pred = model.predict_windows({**batch, "reward": sparse}, noise_scale=0.0)
    assert set(pred["reward"].unique().tolist()) <= {0.0, 20.0}
    assert not torch.equal(pred["reward"], pred["reward_mean"])  # the expectation as it was
    unseen = reward_model(np.zeros((10, 4, 1), np.float32))  # a random team: no soup yet
    assert unseen._predicted_reward(expectation)[:, 0].tolist() == [0.0] * 4
    unseen.refit_reward_normalization({"reward": sparse})  # a team that cooks: 20 joins
    assert unseen._predicted_reward(expectation)[:, 0].tolist() == [0.0, 20.0, 0.0, 20.0]
    dense = np.linspace(-1, 1, 40, dtype=np.float32).reshape(10, 4, 1)  # 40 values > 4
    assert torch.equal(reward_model(dense)._predicted_reward(expectation), expectation)
    with pytest.raises(ConfigError, match="reward_prediction"):
        tiny_config(reward_prediction="median")


def test_checkpoints_round_trip_and_format_3_still_loads(tmp_path) -> None:
    spec = toy_spec()
    model = new_model(spec)
    model.fit_normalization(toy_windows(2, 6, 2, seed=0))
    again = WorldModel.load(model.save(tmp_path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    flat = WorldModel(tiny_config(), EnvSpec("toy", ("a",), (4,), "discrete", (2,), {}))
    state = flat.checkpoint_state()
    state["format_version"] = "3"  # before the tokenizers: embeddings on the backbone
    state["state_dict"] = {
        k.replace("backbone.tokenizer.", "backbone."): v for k, v in state["state_dict"].items()
    }
    old = WorldModel.from_checkpoint_state(state)
    weight = old.backbone.tokenizer.obs_embed.weight
    assert torch.equal(weight, flat.backbone.tokenizer.obs_embed.weight)


@pytest.mark.slow
def test_grid_world_model_learns_a_deterministic_grid_world_exactly() -> None:
    """The tokenised model with the discrete head must predict a deterministic toy grid
    world's next observation almost exactly (the copy baseline's error is 1)."""
    torch.manual_seed(0)
    spec = toy_spec()
    model = new_model(
        spec,
        d_model=32,
        moe={"d_hidden": 32, "num_experts": 4, "top_k": 2},
        heads={"hidden": 64, "ensemble_size": 3, "ensemble_hidden": 16},
    )
    train = toy_windows(episodes=24, steps=40, window=2, seed=0)
    test = toy_windows(episodes=6, steps=40, window=2, seed=1)
    cfg = TrainConfig(steps=500, batch_size=32, window=2, lr=3e-3, warmup=20, seed=0)
    fit(model, train, cfg, progress=False)
    pred = model.predict_windows(test, noise_scale=0.0)["next_obs"].numpy()
    obs = test["obs"]
    change = np.sqrt(np.mean((obs[:, 1:] - obs[:, :-1]) ** 2))
    rel_err = np.sqrt(np.mean((pred - obs[:, 1:]) ** 2)) / change
    assert rel_err < 0.1, f"one-step relative error {rel_err:.3f} on the toy grid world"


# --------------------------------------------------------------- routing and specialisation


def test_grouped_balance_lets_groups_own_experts() -> None:
    """Two modalities on disjoint experts, uniform overall: balanced (1.0) under the
    modality-weighted loss, though each modality alone uses only half of the experts."""
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 6 + [[0.0, 0.0, 0.5, 0.5]] * 2)
    mask = (probs > 0).float()
    groups = torch.tensor([0] * 6 + [1] * 2)
    assert float(grouped_balancing_loss(probs, mask, groups)) == pytest.approx(1.0)
    # the plain pool lets the 6-token modality decide: experts 0, 1 look overloaded
    assert float(load_balancing_loss(probs, mask)) > 1.2


def test_specialisation_metrics_on_known_assignments() -> None:
    labels = np.repeat(np.arange(4), 100)
    decided = np.stack([labels, (labels + 1) % 4], 1)  # the label decides both experts
    counts = routing_counts(decided, labels, num_experts=4, num_labels=4)
    assert routing_distribution(counts)[2].tolist() == [0.0, 0.0, 0.5, 0.5]
    assert mutual_information(counts) == pytest.approx(1.0)  # 2 bits of label, 1 kept
    assert normalised_mi(routing_counts(decided[:, :1], labels, 4, 4)) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    ignored = rng.integers(0, 4, size=(400, 2))  # routing independent of the label
    assert normalised_mi(routing_counts(ignored, labels, 4, 4)) < 0.02


def test_router_modality_embedding_reaches_the_assignments() -> None:
    """With a strong modality embedding on the router's input, expert choice follows it."""
    torch.manual_seed(0)
    layer = MoEFeedForward(MoEConfig(d_model=8, d_hidden=8, num_experts=4, top_k=2))
    groups = torch.arange(2).repeat(50)  # [100] two modalities
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4, 8))  # logit j = input feature j
    table = torch.zeros(2, 8)
    table[0, :2] = 10.0  # modality 0 -> experts 0, 1
    table[1, 2:4] = 10.0  # modality 1 -> experts 2, 3
    _, stats = layer(torch.randn(100, 8), route_input=table[groups], groups=groups)
    counts = routing_counts(stats.assignments.numpy(), groups.numpy(), 4, 2)
    assert normalised_mi(counts) > 0.9
