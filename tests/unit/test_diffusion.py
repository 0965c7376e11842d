"""Diffusion head: configs, the forward process against diffusers, sampler mechanics, and
learning a two-mode 2-D Gaussian mixture (modes (-2, 0) and (2, 0), std 0.3) well enough that
samples recover both modes, with several schedulers and step counts."""

from __future__ import annotations

import threading

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from moedream.config import ConfigError
from moedream.world_model.diffusion import (
    Denoiser,
    DiffusionConfig,
    DiffusionSampler,
    SamplerConfig,
    check_compatible,
)

MODES = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
MODE_STD = 0.3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny nets: two threads only add contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gmm_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 [n, 2] from the two-mode mixture and the one-hot mode of each sample [n, 2]."""
    mode = torch.randint(0, 2, (n,), generator=generator)  # [n]
    x0 = MODES[mode] + MODE_STD * torch.randn(n, 2, generator=generator)
    return x0, torch.nn.functional.one_hot(mode, 2).float()


def train(
    cfg: DiffusionConfig, *, conditional: bool, steps: int = 600, batch: int = 256
) -> Denoiser:
    """Adam with a linear decay to 0; cond = one-hot mode if conditional, else zeros."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    denoiser = Denoiser(cfg, x_dim=2, cond_dim=2)
    opt = torch.optim.Adam(denoiser.parameters(), lr=3e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    for _ in range(steps):
        x0, onehot = gmm_batch(batch, generator)
        cond = onehot if conditional else torch.zeros_like(onehot)
        loss, _ = denoiser.loss(x0, cond, generator=generator)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    return denoiser.eval()


def draw(denoiser: Denoiser, sampler_cfg: SamplerConfig, cond: torch.Tensor, seed: int = 1):
    sampler = DiffusionSampler(denoiser.cfg, sampler_cfg)
    with torch.no_grad():
        return sampler.sample(denoiser, cond, 2, generator=torch.Generator().manual_seed(seed))


def mode_stats(x: torch.Tensor) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """Per mode: (fraction of samples within 1.0 of it, mean [2], std [2] of those samples)."""
    dist = torch.cdist(x, MODES)  # [n, 2]
    stats = []
    for m in range(2):
        near = dist[:, m] < 1.0
        stats.append((near.float().mean().item(), x[near].mean(0), x[near].std(0)))
    return stats


def assert_recovers_modes(x, *, mean_tol: float, std_range: tuple[float, float], what: str):
    for m, (frac, mean, std) in enumerate(mode_stats(x)):
        detail = f"{what}: mode {MODES[m].tolist()}: fraction {frac:.3f}, mean {mean.tolist()}, std {std.tolist()}"
        assert 0.35 <= frac <= 0.65, detail
        assert (mean - MODES[m]).abs().max() <= mean_tol, detail
        assert std_range[0] <= std.min() and std.max() <= std_range[1], detail


# ----------------------------------------------------------------------------- trained models


@pytest.fixture(scope="module")
def flow_denoiser() -> Denoiser:
    """Flow matching, trained conditionally with 30% null (zero) condition: one model serves
    the unconditional mixture (cond = 0) and the conditional test (cond = one-hot mode)."""
    cfg = DiffusionConfig(objective="flow", hidden=64, layers=2, cond_dropout=0.3)
    return train(cfg, conditional=True)


@pytest.fixture(scope="module")
def v_denoiser() -> Denoiser:
    cfg = DiffusionConfig(objective="v", beta_schedule="squaredcos_cap_v2", hidden=64, layers=2)
    return train(cfg, conditional=False)


@pytest.fixture(scope="module")
def eps_denoiser() -> Denoiser:
    cfg = DiffusionConfig(objective="eps", beta_schedule="linear", hidden=64, layers=2)
    return train(cfg, conditional=False)


NULL = torch.zeros(1000, 2)


def test_flow_euler_20_steps_recovers_both_modes(flow_denoiser):
    x = draw(flow_denoiser, SamplerConfig(scheduler="flow_euler", num_steps=20), NULL)
    assert_recovers_modes(x, mean_tol=0.2, std_range=(0.15, 0.45), what="flow 20 steps")


def test_ddim_eps_recovers_both_modes(eps_denoiser):
    x = draw(eps_denoiser, SamplerConfig(scheduler="ddim", num_steps=25), NULL)
    assert_recovers_modes(x, mean_tol=0.2, std_range=(0.15, 0.45), what="ddim eps 25 steps")


def test_ddim_v_cosine_recovers_both_modes_in_4_steps(v_denoiser):
    x = draw(v_denoiser, SamplerConfig(scheduler="ddim", num_steps=4), NULL)
    assert_recovers_modes(x, mean_tol=0.3, std_range=(0.1, 0.6), what="ddim v 4 steps")


def test_ddpm_ancestral_recovers_both_modes(v_denoiser):
    x = draw(v_denoiser, SamplerConfig(scheduler="ddpm", num_steps=20), NULL)
    assert_recovers_modes(x, mean_tol=0.25, std_range=(0.15, 0.5), what="ddpm v 20 steps")


def test_few_step_flow_stays_close(flow_denoiser):
    # Each Euler step moves along the current posterior-mean direction, so few steps pull
    # samples toward the data mean: mode means shift inward (measured ~0.2 at 3-4 steps vs
    # <0.06 at 20) and the spread across the modes' axis shrinks (std ~0.15 instead of 0.3).
    # Tolerances: 0.3 / 0.35 on the means, std in [0.08, 0.6]; both modes present and balanced.
    for steps, mean_tol in ((4, 0.3), (3, 0.35)):
        x = draw(flow_denoiser, SamplerConfig(num_steps=steps), NULL)
        assert_recovers_modes(
            x, mean_tol=mean_tol, std_range=(0.08, 0.6), what=f"flow {steps} steps"
        )


def test_one_step_collapses_to_the_mean(flow_denoiser):
    # At sigma = 1 the noisy input carries no information about x0, so one step returns
    # E[x0] = (0, 0): a 1-step sampler is a mean regressor, never a sampler of a multimodal law.
    x = draw(flow_denoiser, SamplerConfig(num_steps=1), NULL)
    assert (x.norm(dim=-1) < 1.0).float().mean() > 0.95
    assert x.mean(0).abs().max() < 0.3


def test_condition_selects_the_mode(flow_denoiser):
    for m in range(2):
        cond = torch.nn.functional.one_hot(torch.full((500,), m), 2).float()
        x = draw(flow_denoiser, SamplerConfig(num_steps=8), cond)
        on_mode = (x - MODES[m]).norm(dim=-1) < 1.0
        assert on_mode.float().mean() > 0.95, f"cond {m}: {on_mode.float().mean():.3f} on mode"
        assert (x[on_mode].mean(0) - MODES[m]).abs().max() < 0.25


def test_composed_predict_fn_matches_the_denoiser(flow_denoiser):
    # PoCE-style composition with one expert and alpha = 1 is the conditional expert itself.
    cond = torch.nn.functional.one_hot(torch.full((64,), 1), 2).float()

    def composed(x_t, t, c):
        uncond = flow_denoiser(x_t, t, torch.zeros_like(c))
        return uncond + 1.0 * (flow_denoiser(x_t, t, c) - uncond)

    sampler = DiffusionSampler(flow_denoiser.cfg, SamplerConfig())
    with torch.no_grad():
        a = sampler.sample(flow_denoiser, cond, 2, generator=torch.Generator().manual_seed(3))
        b = sampler.sample(composed, cond, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ forward process vs diffusers


def untrained(objective: str, beta_schedule: str = "squaredcos_cap_v2", x_dim: int = 6) -> Denoiser:
    torch.manual_seed(0)
    cfg = DiffusionConfig(objective=objective, beta_schedule=beta_schedule, hidden=32, layers=1)
    return Denoiser(cfg, x_dim=x_dim, cond_dim=3)


def replay_draws(x0: torch.Tensor, seed: int, num_train_timesteps: int = 1000):
    """The noise and timestep indices noisy_input draws with a generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    index = torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=g)
    return noise, index


def test_flow_noising_equals_diffusers_scale_noise():
    denoiser = untrained("flow")
    x0 = torch.randn(64, 6)
    x_t, t, target = denoiser.noisy_input(x0, torch.Generator().manual_seed(5))
    noise, index = replay_draws(x0, 5)
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    timesteps = reference.timesteps[index]
    torch.testing.assert_close(x_t, reference.scale_noise(x0, timesteps, noise))
    torch.testing.assert_close(t, timesteps)
    torch.testing.assert_close(target, noise - x0)
    sigma = (t / 1000)[:, None]
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * noise)  # rectified flow


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_ddpm_noising_and_targets(objective):
    denoiser = untrained(objective, beta_schedule="linear")
    x0 = torch.randn(64, 6)
    x_t, t, target = denoiser.noisy_input(x0, torch.Generator().manual_seed(7))
    noise, index = replay_draws(x0, 7)
    abar = DDPMScheduler(beta_schedule="linear").alphas_cumprod[index][:, None]  # [B, 1]
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    torch.testing.assert_close(t, index.float())
    expected = noise if objective == "eps" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
    torch.testing.assert_close(target, expected)


@pytest.mark.parametrize(
    ("objective", "beta_schedule"),
    [("eps", "linear"), ("v", "squaredcos_cap_v2"), ("v", "linear"), ("flow", "linear")],
)
def test_x0_transform_round_trip(objective, beta_schedule):
    """x0 -> noised with eps -> the objective's target -> x0 recovered, and back."""
    denoiser = untrained(objective, beta_schedule=beta_schedule)
    x0 = torch.randn(256, 6)
    x_t, t, target = denoiser.noisy_input(x0, torch.Generator().manual_seed(3))
    # eps divides by sqrt(abar), ~6e-3 at the last linear timestep: float32 error grows there
    torch.testing.assert_close(denoiser.x0_from_prediction(target, x_t, t), x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(denoiser.prediction_from_x0(x0, x_t, t), target, atol=1e-4, rtol=0)
    # a wrong prediction maps to a wrong x0 (the transform is not the identity on x0)
    wrong = denoiser.x0_from_prediction(target + 0.5, x_t, t)
    assert (wrong - x0).abs().mean() > 0.1


def test_loss_shapes_logs_and_gradients():
    denoiser = untrained("flow")
    loss, logs = denoiser.loss(torch.randn(32, 6), torch.randn(32, 3))
    assert loss.shape == () and torch.isfinite(loss)
    assert logs["diffusion/loss"] == pytest.approx(loss.item())
    assert set(logs) <= {"diffusion/loss", "diffusion/loss_high_noise", "diffusion/loss_low_noise"}
    loss.backward()
    assert all(p.grad is not None for p in denoiser.parameters())


def test_cond_dropout_nulls_a_fraction_of_conditions_in_training_only():
    cfg = DiffusionConfig(hidden=16, layers=1, cond_dropout=0.4)
    denoiser = Denoiser(cfg, x_dim=2, cond_dim=3)
    cond = torch.ones(4000, 3)
    dropped = (denoiser._drop_cond(cond, torch.Generator().manual_seed(0)) == 0).all(-1)
    assert 0.35 < dropped.float().mean() < 0.45
    denoiser.eval()
    assert torch.equal(denoiser._drop_cond(cond, None), cond)


def test_state_dict_round_trip_rebuilds_identical_predictions():
    denoiser = untrained("v")
    clone = Denoiser(DiffusionConfig.from_dict(denoiser.cfg.to_dict()), x_dim=6, cond_dim=3)
    clone.load_state_dict(denoiser.state_dict())
    x, t, c = torch.randn(8, 6), torch.rand(8) * 999, torch.randn(8, 3)
    torch.testing.assert_close(clone(x, t, c), denoiser(x, t, c))


def test_bad_shapes_name_the_argument():
    denoiser = untrained("flow")
    with pytest.raises(ValueError, match="`x0` must have shape"):
        denoiser.loss(torch.randn(4, 5), torch.randn(4, 3))
    with pytest.raises(ValueError, match="`cond` must have shape"):
        denoiser.loss(torch.randn(4, 6), torch.randn(5, 3))


# ------------------------------------------------------------------------------ sampler mechanics


def test_sample_shape_device_dtype_and_time_units():
    seen = []

    def predict(x_t, t, cond):
        seen.append((t.dtype, t.shape, t.device, float(t[0])))
        return torch.zeros_like(x_t)

    cond = torch.zeros(5, 3, dtype=torch.float64)
    for scheduler, cfg in (
        ("flow_euler", DiffusionConfig()),
        ("ddim", DiffusionConfig(objective="v")),
    ):
        seen.clear()
        sampler = DiffusionSampler(cfg, SamplerConfig(scheduler=scheduler, num_steps=4))
        x = sampler.sample(predict, cond, 7, generator=torch.Generator().manual_seed(0))
        assert x.shape == (5, 7) and x.dtype == torch.float64 and x.device == cond.device
        assert [s[:3] for s in seen] == [(torch.float32, (5,), cond.device)] * 4
        first_t = [s[3] for s in seen]
        assert first_t == (
            [1000.0, 750.0, 500.0, 250.0]
            if scheduler == "flow_euler"
            else [999.0, 749.0, 499.0, 249.0]
        )


def test_sample_with_a_real_denoiser_under_no_grad_and_with_grad():
    denoiser = untrained("flow")
    sampler = DiffusionSampler(denoiser.cfg, SamplerConfig(num_steps=2))
    cond = torch.randn(4, 3)
    with torch.no_grad():
        x = sampler.sample(denoiser, cond, 6)
    assert x.shape == (4, 6) and not x.requires_grad
    x = sampler.sample(denoiser, cond, 6)
    assert x.requires_grad  # gradients flow when the caller wants them


@pytest.mark.parametrize(
    ("objective", "beta_schedule", "sampler_cfg"),
    [
        ("flow", "squaredcos_cap_v2", SamplerConfig(scheduler="flow_euler", num_steps=4)),
        ("v", "squaredcos_cap_v2", SamplerConfig(scheduler="ddim", num_steps=4, eta=1.0)),
        ("eps", "linear", SamplerConfig(scheduler="ddpm", num_steps=4)),
    ],
)
def test_noise_scale_zero_is_deterministic(objective, beta_schedule, sampler_cfg):
    denoiser = untrained(objective, beta_schedule)
    sampler = DiffusionSampler(denoiser.cfg, sampler_cfg)
    cond = torch.randn(8, 3)
    with torch.no_grad():
        a = sampler.sample(
            denoiser, cond, 6, generator=torch.Generator().manual_seed(0), noise_scale=0.0
        )
        b = sampler.sample(
            denoiser, cond, 6, generator=torch.Generator().manual_seed(1), noise_scale=0.0
        )
        c = sampler.sample(denoiser, cond, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)  # the default noise_scale = 1 does draw noise


@pytest.mark.parametrize(
    ("objective", "sampler_cfg"),
    [
        ("v", SamplerConfig(scheduler="ddim", num_steps=5, eta=1.0)),
        ("eps", SamplerConfig(scheduler="ddpm", num_steps=5)),
    ],
)
def test_noise_scale_scales_only_the_stochastic_part(objective, sampler_cfg):
    # With a prediction linear in x_t and a fixed x_init, the result is affine in the per-step
    # noise: x(k) = x(0) + k * (sum of scaled noises), for the same generator seed.
    cfg = DiffusionConfig(objective=objective, beta_schedule="linear")
    sampler = DiffusionSampler(cfg, sampler_cfg)
    cond, x_init = torch.zeros(16, 1), torch.randn(16, 3)

    def run(scale):
        g = torch.Generator().manual_seed(11)
        return sampler.sample(
            lambda x, t, c: 0.5 * x, cond, 3, generator=g, noise_scale=scale, x_init=x_init
        )

    x0, x_half, x_quarter = run(0.0), run(0.5), run(0.25)
    assert (x_half - x0).abs().max() > 1e-3
    torch.testing.assert_close(x_half - x0, 2.0 * (x_quarter - x0), atol=1e-5, rtol=1e-4)


def test_noise_scale_scales_the_initial_noise():
    sampler = DiffusionSampler(DiffusionConfig(), SamplerConfig(num_steps=1))
    identity = lambda x, t, c: torch.zeros_like(x)  # noqa: E731  (v = 0: x stays x_init)
    cond = torch.zeros(4000, 1)
    x = sampler.sample(
        identity, cond, 2, generator=torch.Generator().manual_seed(0), noise_scale=0.75
    )
    assert x.std().item() == pytest.approx(0.75, rel=0.05)


def test_concurrent_samples_equal_sequential_ones():
    denoiser = untrained("flow")
    sampler = DiffusionSampler(denoiser.cfg, SamplerConfig(num_steps=6))
    conds = [torch.randn(16, 3) for _ in range(4)]

    def run(i):
        with torch.no_grad():
            return sampler.sample(denoiser, conds[i], 6, generator=torch.Generator().manual_seed(i))

    sequential = [run(i) for i in range(4)]
    results: dict[int, torch.Tensor] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, run(i))) for i in range(4)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(4):
        torch.testing.assert_close(results[i], sequential[i])


def test_clip_bounds_every_scheduler():
    for cfg, scheduler in (
        (DiffusionConfig(), "flow_euler"),
        (DiffusionConfig(objective="v"), "ddim"),
    ):
        sampler = DiffusionSampler(cfg, SamplerConfig(scheduler=scheduler, num_steps=4, clip=0.5))
        wild = lambda x, t, c: -10.0 * torch.ones_like(x)  # noqa: E731
        x = sampler.sample(wild, torch.zeros(8, 1), 4, generator=torch.Generator().manual_seed(0))
        assert x.abs().max() <= 0.5 + 1e-5, scheduler


def test_bad_predictions_and_inputs_raise_clear_errors():
    sampler = DiffusionSampler(DiffusionConfig(), SamplerConfig())
    with pytest.raises(ValueError, match="`predict_fn` must return a tensor of shape"):
        sampler.sample(lambda x, t, c: x[:, :1], torch.zeros(2, 1), 3)
    with pytest.raises(ValueError, match="`x_init` must have shape"):
        sampler.sample(lambda x, t, c: x, torch.zeros(2, 1), 3, x_init=torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="noise_scale"):
        sampler.sample(lambda x, t, c: x, torch.zeros(2, 1), 3, noise_scale=-1.0)


# ----------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("objective", "scheduler"),
    [("eps", "flow_euler"), ("v", "flow_euler"), ("flow", "ddim"), ("flow", "ddpm")],
)
def test_incompatible_objective_and_scheduler_name_both_fields(objective, scheduler):
    beta = "linear" if objective == "eps" else "squaredcos_cap_v2"
    dcfg, scfg = (
        DiffusionConfig(objective=objective, beta_schedule=beta),
        SamplerConfig(scheduler=scheduler),
    )
    with pytest.raises(ConfigError, match=r"`diffusion\.objective`.*`sampler\.scheduler`"):
        check_compatible(dcfg, scfg)
    with pytest.raises(ConfigError, match="incompatible"):
        DiffusionSampler(dcfg, scfg)


def test_compatible_pairs_pass():
    for objective, scheduler in (("eps", "ddpm"), ("v", "ddim"), ("flow", "flow_euler")):
        beta = "linear" if objective == "eps" else "squaredcos_cap_v2"
        check_compatible(
            DiffusionConfig(objective=objective, beta_schedule=beta),
            SamplerConfig(scheduler=scheduler),
        )


@pytest.mark.parametrize(
    ("cls", "data", "field"),
    [
        (DiffusionConfig, {"objective": "x0"}, "objective"),
        (DiffusionConfig, {"time_embed_dim": 7}, "time_embed_dim"),
        (DiffusionConfig, {"hidden": 0}, "hidden"),
        (DiffusionConfig, {"cond_dropout": 1.0}, "cond_dropout"),
        (DiffusionConfig, {"objective": "eps"}, "beta_schedule"),  # eps + cosine: not invertible
        (SamplerConfig, {"num_steps": 0}, "num_steps"),
        (SamplerConfig, {"num_steps": 1001}, "num_steps"),
        (SamplerConfig, {"eta": 1.5}, "eta"),
        (SamplerConfig, {"noise_scale": -0.1}, "noise_scale"),
        (SamplerConfig, {"clip": 0.0}, "clip"),
        (SamplerConfig, {"scheduler": "euler"}, "scheduler"),
    ],
)
def test_config_errors_name_the_field(cls, data, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        cls.from_dict(data)


def test_num_steps_above_train_timesteps_is_rejected():
    with pytest.raises(ConfigError, match="num_steps"):
        check_compatible(DiffusionConfig(num_train_timesteps=10), SamplerConfig(num_steps=20))


def test_configs_round_trip_through_dicts():
    dcfg = DiffusionConfig(objective="v", hidden=32, cond_dropout=0.1)
    scfg = SamplerConfig(scheduler="ddim", num_steps=8, eta=0.5, clip=3.0)
    assert DiffusionConfig.from_dict(dcfg.to_dict()) == dcfg
    assert SamplerConfig.from_dict(scfg.to_dict()) == scfg
