"""Diffusion sampler throughput: samples/s by scheduler and step count, and the share of time
spent outside the network (scheduler copy, set_timesteps, step) at a realistic world-model size.

    python benchmarks/diffusion_sampler.py [--batch 256] [--x-dim 192] [--cond-dim 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import markdown_table, record  # noqa: E402

from moedream.world_model.diffusion import (  # noqa: E402
    Denoiser,
    DiffusionConfig,
    DiffusionSampler,
    SamplerConfig,
)


@dataclasses.dataclass
class Args:
    batch: int = 256
    """samples per sample() call"""
    x_dim: int = 192
    """sampled vector size (2 agents x 96-dim Overcooked features)"""
    cond_dim: int = 256
    """conditioning features (the backbone's output)"""
    hidden: int = 256
    """denoiser width"""
    layers: int = 3
    """denoiser residual blocks"""
    steps: tuple[int, ...] = (1, 2, 4, 20)
    """sampling step counts to measure"""
    repeats: int = 7
    """timed calls per setting (median, after one warm-up call)"""
    threads: int = 1
    """torch threads (1 gives stable figures on a shared 2-core machine)"""


def parse_args() -> Args:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "steps":
            parser.add_argument(flag, type=int, nargs="+", default=list(f.default))
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    ns = parser.parse_args()
    return Args(**{**vars(ns), "steps": tuple(ns.steps)})


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up (robust to a shared machine)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args: Args, objective: str, scheduler: str, steps: int, cond: torch.Tensor) -> list:
    cfg = DiffusionConfig(objective=objective, hidden=args.hidden, layers=args.layers)
    denoiser = Denoiser(cfg, x_dim=args.x_dim, cond_dim=args.cond_dim).eval()
    sampler = DiffusionSampler(cfg, SamplerConfig(scheduler=scheduler, num_steps=steps))
    generator = torch.Generator().manual_seed(0)
    zero_prediction = lambda x_t, t, c: torch.zeros_like(x_t)  # noqa: E731
    with torch.no_grad():
        total = median_seconds(
            lambda: sampler.sample(denoiser, cond, args.x_dim, generator=generator), args.repeats
        )
        alone = median_seconds(
            lambda: sampler.sample(zero_prediction, cond, args.x_dim, generator=generator),
            args.repeats,
        )
    return [scheduler, steps, args.batch / total, total * 1e3, alone * 1e3, 100 * alone / total]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cond = torch.randn(args.batch, args.cond_dim)
    rows = [measure(args, "flow", "flow_euler", n, cond) for n in args.steps]
    rows += [measure(args, "v", "ddim", n, cond) for n in args.steps]
    headers = ["scheduler", "steps", "samples/s", "ms/call", "sampler-only ms", "sampler share %"]
    n_params = sum(
        p.numel()
        for p in Denoiser(
            DiffusionConfig(hidden=args.hidden, layers=args.layers), args.x_dim, args.cond_dim
        ).parameters()
    )
    body = (
        f"Batch {args.batch}, x_dim {args.x_dim}, cond_dim {args.cond_dim}, denoiser hidden "
        f"{args.hidden} x {args.layers} blocks ({n_params / 1e6:.2f} M params), fp32, no_grad, "
        f"{args.threads} torch thread(s), median of {args.repeats} calls. `sampler-only ms`: the "
        "same call with a zero predict_fn (scheduler copy, set_timesteps, steps, noise).\n\n"
        + markdown_table(headers, rows)
    )
    record("diffusion_sampler", "Diffusion sampler throughput", body)


if __name__ == "__main__":
    main()
