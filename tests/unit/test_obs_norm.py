"""RunningObsNorm: statistics equal numpy's over all batches seen, clipping, state round trip."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from moedream.policies.obs_norm import RunningObsNorm


def batches(rng: np.random.Generator, dim: int) -> list[np.ndarray]:
    """Batches of different sizes (one of a single row) and very different scales per dim."""
    scale = np.array([1e-2, 1.0, 50.0, 1e3][:dim] + [3.0] * max(0, dim - 4))
    offset = np.linspace(-100, 100, dim)
    return [rng.normal(offset, scale, size=(n, dim)) for n in (7, 1, 300, 64, 2)]


def test_statistics_equal_numpy_over_several_batches():
    rng = np.random.default_rng(0)
    data = batches(rng, 6)
    norm = RunningObsNorm(6)
    for batch in data:
        norm.update(torch.as_tensor(batch, dtype=torch.float32))
    seen = np.concatenate([b.astype(np.float32) for b in data]).astype(np.float64)  # [374, 6]
    np.testing.assert_array_equal(norm.count.numpy(), np.full(6, len(seen)))
    np.testing.assert_allclose(norm.mean.numpy(), seen.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(norm.var.numpy(), seen.var(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(norm.std.numpy(), np.sqrt(seen.var(0) + norm.eps), rtol=1e-9)
    # normalised data: mean 0, std 1 per dim (nothing near the clip here)
    out = norm(torch.as_tensor(seen, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(out.std(0), 1.0, atol=1e-3)
    # batches of leading shape [B, N, D] count every row
    norm.update(torch.zeros(5, 2, 6))
    assert norm.count[0].item() == len(seen) + 10


def test_smaller_observations_update_and_use_only_their_dims():
    rng = np.random.default_rng(1)
    big, small = rng.normal(5.0, 2.0, (50, 4)), rng.normal(-3.0, 0.5, (30, 2))
    norm = RunningObsNorm(4)
    norm.update(torch.as_tensor(big))
    norm.update(torch.as_tensor(small))
    np.testing.assert_array_equal(norm.count.numpy(), [80, 80, 50, 50])
    first = np.concatenate([big[:, :2], small])
    np.testing.assert_allclose(norm.mean.numpy()[:2], first.mean(0), rtol=1e-10)
    np.testing.assert_allclose(norm.mean.numpy()[2:], big[:, 2:].mean(0), rtol=1e-10)
    np.testing.assert_allclose(norm.var.numpy()[2:], big[:, 2:].var(0), rtol=1e-9)
    assert norm(torch.as_tensor(small, dtype=torch.float32)).shape == (30, 2)


def test_identity_before_any_update_then_clipped():
    norm = RunningObsNorm(3, clip=2.5)
    x = torch.tensor([[0.5, -1.0, 2.0], [50.0, -30.0, 7.0]])
    torch.testing.assert_close(norm(x), x)  # never updated: passes through, even beyond clip
    norm.update(torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]]))  # mean 1, std 1
    out = norm(torch.tensor([[1.0, 100.0, -100.0], [2.0, 3.0, 1.0]]))
    torch.testing.assert_close(
        out, torch.tensor([[0.0, 2.5, -2.5], [1.0, 2.0, 0.0]]), rtol=0, atol=1e-6
    )
    assert out.dtype == torch.float32


def test_state_round_trip_carries_the_statistics():
    rng = np.random.default_rng(2)
    norm = RunningObsNorm(5, clip=4.0)
    for batch in batches(rng, 5):
        norm.update(torch.as_tensor(batch))
    state = norm.state_dict()
    assert sorted(state) == ["count", "m2", "mean"]
    copy = RunningObsNorm(5, clip=4.0)
    copy.load_state_dict({k: torch.as_tensor(v.numpy()) for k, v in state.items()})
    x = torch.as_tensor(rng.normal(0, 100, (16, 5)), dtype=torch.float32)
    torch.testing.assert_close(copy(x), norm(x), rtol=0, atol=0)
    # and the copy keeps merging from where the original stopped
    more = torch.as_tensor(rng.normal(3, 1, (40, 5)))
    norm.update(more)
    copy.update(more)
    for key in state:
        torch.testing.assert_close(getattr(copy, key), getattr(norm, key), rtol=0, atol=0)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="clip"):
        RunningObsNorm(3, clip=0.0)
    norm = RunningObsNorm(3)
    with pytest.raises(ValueError, match="4 dims"):
        norm.update(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        norm.update(torch.tensor([[0.0, float("nan"), 1.0]]))
    assert norm.count.sum().item() == 0  # the bad batch changed nothing


def test_no_ray_imported():
    # in a fresh interpreter: other unit tests may import ray into this one
    code = "import sys, moedream.policies.obs_norm; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
