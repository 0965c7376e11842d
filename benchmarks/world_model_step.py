"""Achieved FLOP/s of one world-model training step (forward + backward + AdamW) as a
fraction of this machine's own matmul peak, both measured in the same run.

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode (matmuls, attention, convs:
the work that matters); the peak is a square fp32 matmul (and bf16 where the CPU has native
bf16 units: AMX or AVX512-BF16).
Goal: >= 30% of peak.

    .venv/bin/python benchmarks/world_model_step.py
    .venv/bin/python benchmarks/world_model_step.py --steps 3 --no-record   # quick look
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    cpu_bf16_units,
    interleaved_times,
    markdown_table,
    parse_args,
    publish,
    with_bf16,
)
from moedream.envs.spec import EnvSpec  # noqa: E402
from moedream.world_model.model import WorldModel, WorldModelConfig  # noqa: E402
from moedream.world_model.train_local import (  # noqa: E402
    TrainConfig,
    make_optimizer,
    train_step,
)

# MaMuJoCo HalfCheetah 2x3 sizes (env_spec("mamujoco")), without building the env.
SPEC = EnvSpec("mamujoco", ("agent_0", "agent_1"), (12, 12), "continuous", (3, 3))
SIZES = {
    "small (configs/world_model.yaml)": {},
    "wide (d_model 256, 8 experts of 512)": {
        "d_model": 256,
        "cond_dim": 256,
        "moe": {"d_hidden": 512, "num_experts": 8},
        "rssm": {"deter": 256, "hidden": 256},
        "diffusion": {"hidden": 512, "layers": 3},
        "heads": {"hidden": 256, "ensemble_hidden": 256},
    },  # fmt: skip
}


@dataclasses.dataclass
class Args:
    batch_size: int = 32
    """windows per step"""
    window: int = 8
    steps: int = 7
    """timed steps per case (best and median reported)"""
    warmup: int = 2
    threads: int = 2
    matmul_size: int = 1024
    bf16: str = "auto"
    """auto: also measure bf16 autocast if the CPU has AMX or AVX512-BF16; on; off"""
    record: bool = True


def batch(args: Args, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, t, n, d, a = args.batch_size, args.window, SPEC.n_agents, SPEC.obs_dim, SPEC.action_dim
    return {
        "obs": rng.normal(size=(b, t + 1, n, d)).astype(np.float32),
        "action": rng.uniform(-1, 1, size=(b, t, n, a)).astype(np.float32),
        "reward": rng.normal(size=(b, t, n)).astype(np.float32),
        "terminated": np.zeros((b, t, n), np.float32),
    }


def build_step(args: Args, overrides: dict, dtype: torch.dtype | None) -> tuple[float, Callable]:
    """(FLOPs per training step, the step function)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    cfg = WorldModelConfig.from_yaml("configs/world_model.yaml", section="model")
    cfg = WorldModelConfig.from_dict(_merge(cfg.to_dict(), overrides, drop=("moe.d_model",)))
    model = WorldModel(cfg, SPEC)
    data = batch(args)
    model.fit_normalization(data)
    optimizer = make_optimizer(model.parameters(), TrainConfig(lr=1e-4))
    step = lambda: train_step(model, optimizer, data, autocast=dtype)  # noqa: E731
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops()), step


def measure(args: Args, overrides: dict, dtype: torch.dtype | None, peak_dtype: torch.dtype):
    """(FLOPs per step, best and median seconds per step, best matmul peak FLOP/s). The peak
    matmul is timed in a block before and in a block after the steps (the best of both): one
    call at a time in between would flush the small model's weights from the caches."""
    flops, step = build_step(args, overrides, dtype)
    n = args.matmul_size
    a, b = torch.randn(n, n, dtype=peak_dtype), torch.randn(n, n, dtype=peak_dtype)
    matmul = lambda: a @ b  # noqa: E731
    before = interleaved_times({"peak": matmul}, 1, args.steps)["peak"]
    steps = interleaved_times({"step": step}, args.warmup, args.steps)["step"]
    after = interleaved_times({"peak": matmul}, 1, args.steps)["peak"]
    peak = 2 * n**3 / min(before + after)
    return flops, min(steps), statistics.median(steps), peak


def _merge(base: dict, overrides: dict, drop: tuple[str, ...] = ()) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in overrides.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    for path in drop:
        head, _, leaf = path.partition(".")
        with contextlib.suppress(KeyError):
            del out[head][leaf]
    return out


def main() -> None:
    args = parse_args(Args, __doc__)
    torch.set_num_threads(args.threads)
    precisions: list[tuple[str, torch.dtype | None, torch.dtype]] = [("fp32", None, torch.float32)]
    if with_bf16(args.bf16):
        precisions.append(("bf16 autocast", torch.bfloat16, torch.bfloat16))
    rows = []
    for name, dtype, peak_dtype in precisions:
        for size, overrides in SIZES.items():
            flops, best, median, peak = measure(args, overrides, dtype, peak_dtype)
            achieved = flops / best
            tokens = args.batch_size * args.window * SPEC.n_agents
            rows.append([size, name, f"{flops / 1e9:.3f}", f"{best * 1e3:.1f}", f"{median * 1e3:.1f}",
                         f"{tokens / best:.0f}", f"{achieved / 1e9:.2f}", f"{peak / 1e9:.1f}",
                         f"{100 * achieved / peak:.1f}%"])  # fmt: skip
            print(rows[-1], flush=True)
    table = markdown_table(
        ["model", "precision", "GFLOP/step", "best ms/step", "median ms/step", "tokens/s", "achieved GFLOP/s",
         f"matmul peak GFLOP/s ({args.matmul_size}^3)", "fraction of peak"], rows,
    )  # fmt: skip
    body = (
        f"Batch {args.batch_size} windows x {args.window} steps x {SPEC.n_agents} agents (HalfCheetah 2x3 sizes), "
        f"forward + backward + AdamW, {args.threads} threads; FLOPs from FlopCounterMode; {args.steps} steps after "
        f"{args.warmup} warm-up between two blocks of {args.steps} peak matmuls, fraction from the best times. Goal: >= 30% of "
        f"the matmul peak measured in the same run. native bf16 units: {cpu_bf16_units() or 'none'}.\n\n{table}"
    )
    publish(
        "world_model_step",
        "World-model training step: achieved FLOP/s vs matmul peak",
        body,
        args.record,
    )


if __name__ == "__main__":
    main()
