"""Forward + backward throughput of the sparse MoE layer vs a dense FFN with the same active
parameters (top_k * d_hidden wide) vs DeepSpeed's MoE layer, on this machine.

Goal: native MoE >= 0.7x the dense tokens/s (the MoE does the dense layer's FLOPs times the
capacity factor, plus routing and dispatch). bf16 autocast is measured beside fp32 only where
the CPU has native bf16 units (AMX or AVX512-BF16; else bf16 matmuls are emulated and slower
than fp32; the table says so). "native" runs each expert on exactly its routed tokens (the
layer's default at expert-parallel size 1); "native-buffer" fills the padded [e, c, d]
capacity buffer that expert parallelism sends through the all-to-all.

    .venv/bin/python benchmarks/moe_vs_dense.py            # the figures in RESULTS.md
    .venv/bin/python benchmarks/moe_vs_dense.py --tokens 1024 --repeats 3   # quick look
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import statistics
import sys
from pathlib import Path

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
from moedream.world_model.moe import MoEConfig, MoEFeedForward, count_parameters  # noqa: E402

# name -> (MoEConfig.backend, MoEConfig.dispatch)
BACKENDS = {
    "native": ("native", "grouped"),
    "native-buffer": ("native", "buffer"),
    "dense": ("dense", "grouped"),
    "deepspeed": ("deepspeed", "grouped"),
}


@dataclasses.dataclass
class Args:
    tokens: tuple[int, ...] = (2048, 8192)
    """token counts per forward (batch x sequence, flattened)"""
    d_models: tuple[int, ...] = (128, 256)
    """model widths; each expert is d_hidden = hidden_mult * d_model wide"""
    hidden_mult: int = 2
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25
    repeats: int = 7
    """timed forward+backward steps per case (the median is reported)"""
    warmup: int = 2
    threads: int = 2
    bf16: str = "auto"
    """auto: measure bf16 autocast only if the CPU has AMX or AVX512-BF16; on; off"""
    record: bool = True
    """write the table into its block (benchmarks/results/, indexed in RESULTS.md)"""


def fwd_bwd(layer: MoEFeedForward, x: torch.Tensor, precision: str) -> None:
    """One forward + backward (loss = mean(y^2) + aux) from cleared gradients."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    with autocast:
        y, stats = layer(x)
        loss = y.float().square().mean() + stats.aux_loss
    loss.backward()


def build_layer(name: str, d_model: int, args: Args) -> MoEFeedForward:
    backend, dispatch = BACKENDS[name]
    cfg = MoEConfig(
        d_model=d_model,
        d_hidden=args.hidden_mult * d_model,
        num_experts=args.num_experts,
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
        backend=backend,
        dispatch=dispatch,
    )
    torch.manual_seed(0)
    return MoEFeedForward(cfg)


def measure_case(tokens: int, d_model: int, precision: str, args: Args) -> list[list]:
    """Backends are timed round-robin (step by step), so that load from other processes on a
    shared machine hits all of them alike. The best (minimum) step time is the figure of
    merit, the least disturbed by other processes; the median is shown beside it."""
    layers = {backend: build_layer(backend, d_model, args) for backend in BACKENDS}
    x = torch.randn(tokens, d_model, requires_grad=True)
    steps = {b: functools.partial(fwd_bwd, layer, x, precision) for b, layer in layers.items()}
    times = interleaved_times(steps, args.warmup, args.repeats)
    best = {b: min(t) for b, t in times.items()}
    rows = []
    for backend, layer in layers.items():
        with torch.no_grad():
            _, stats = layer(x)
        rows.append(
            [
                tokens,
                d_model,
                precision,
                backend,
                count_parameters(layer)["total"],
                round(best[backend] * 1e3, 1),
                round(statistics.median(times[backend]) * 1e3, 1),
                round(tokens / best[backend]),
                stats.dropped_fraction,
                best["dense"] / best[backend],
            ]
        )
    return rows


def _span(rows: list[list], backend: str, precision: str) -> str:
    ratios = [r[-1] for r in rows if r[3] == backend and r[2] == precision]
    return f"{min(ratios):.2f}x - {max(ratios):.2f}x"


def main() -> None:
    args = parse_args(Args, __doc__)
    torch.set_num_threads(args.threads)
    precisions = ["fp32"] + (["bf16"] if with_bf16(args.bf16) else [])
    headers = [
        "tokens",
        "d_model",
        "precision",
        "backend",
        "params",
        "best ms / fwd+bwd",
        "median ms",
        "tokens/s (best)",
        "dropped frac",
        "vs dense",
    ]
    rows = []
    for d_model in args.d_models:
        for tokens in args.tokens:
            for precision in precisions:
                case = measure_case(tokens, d_model, precision, args)
                for row in case:
                    print(" | ".join(str(v) for v in row), flush=True)
                rows += case
    summary = "; ".join(
        f"{precision}: native {_span(rows, 'native', precision)} (goal >= 0.7x), padded capacity "
        f"buffer {_span(rows, 'native-buffer', precision)}, DeepSpeed {_span(rows, 'deepspeed', precision)}"
        for precision in precisions
    )
    body = markdown_table(headers, rows) + (
        f"\n\n{args.num_experts} experts, top-{args.top_k}, capacity factor {args.capacity_factor}, "
        f"expert width {args.hidden_mult} x d_model; dense = one FFN of width top_k x d_hidden "
        f"(same active parameters). Best and median of {args.repeats} steps (backends interleaved) after {args.warmup} warm-up; ratios from the best times.\n"
        f"MoE / dense tokens/s, {summary}.\n"
        + (
            f"bf16 autocast measured beside fp32 ({cpu_bf16_units() or 'forced with --bf16 on'})."
            if "bf16" in precisions
            else f"bf16 not measured: no AMX or AVX512-BF16 on this CPU (capability "
            f"{torch.backends.cpu.get_cpu_capability()}); bf16 matmuls would be emulated."
        )
    )
    publish("moe_vs_dense", "MoE vs dense feed-forward (forward + backward)", body, args.record)


if __name__ == "__main__":
    main()
