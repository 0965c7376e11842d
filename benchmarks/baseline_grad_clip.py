"""Model-free MAPPO's final return per grad_clip: the baseline tuned before it is a target.

    python benchmarks/baseline_grad_clip.py --envs overcooked --grad-clips 0.5 5 0

The sample-efficiency headline (benchmarks/sample_efficiency.py) counts the real steps the
model-based run needs to reach the MODEL-FREE run's final return. A badly tuned model-free
run makes that target easy, so this sweep trains the model-free baseline (imagination off,
the sample-efficiency settings otherwise) for each ``grad_clip`` (0 = no clipping) and seed,
and records the final smoothed team return (the same smoothing as the headline) and the
largest pre-clip gradient norm. The config's ``grad_clip`` should be the best one here.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import sample_efficiency as se  # noqa: E402
from benchmarks._common import markdown_table, parse_args, publish  # noqa: E402


@dataclasses.dataclass
class Args:
    envs: tuple[str, ...] = ("overcooked", "mamujoco")
    """Envs to run (overcooked = cramped_room, mamujoco = HalfCheetah 2x3)."""
    grad_clips: tuple[float, ...] = (0.5, 5.0, 0.0)
    """Global gradient-norm clips to compare (0 = no clipping)."""
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    env_steps: int = 40_000
    """Real env step budget per run."""
    train_batch_size: int = 2000
    minibatch_size: int = 500
    num_epochs: int = 6
    smooth_steps: int = 4000
    """Each curve point is the mean team return of the iterations within the last this many
    real steps (as in sample_efficiency.py)."""
    storage_path: str = "runs/bench_baseline_grad_clip"
    record: bool = True
    """Write the block (benchmarks/results/, indexed in RESULTS.md)."""
    tag: str = ""
    """Record in the block `baseline_grad_clip_<tag>` instead of `baseline_grad_clip`."""


def baseline_config(args: Args, env: str, seed: int, grad_clip: float):
    """The sample-efficiency benchmark's model-free config with this ``grad_clip``."""
    se_args = se.Args(
        train_batch_size=args.train_batch_size,
        minibatch_size=args.minibatch_size,
        num_epochs=args.num_epochs,
        grad_clip=grad_clip,
    )
    return se.run_config(se_args, env, seed, False)


def final_return(history: list[dict[str, float]], window: int) -> float:
    """The run's last smoothed team return (the headline's model-free target)."""
    return float(se.smooth(*se.curve(history, False), window)[-1])


def max_grad_norm(history: list[dict[str, float]]) -> float:
    """The largest pre-clip global gradient norm over the run's iterations."""
    return float(np.nanmax([h.get("losses/grad_global_norm", np.nan) for h in history]))


def main(argv: list[str] | None = None) -> None:
    import torch

    from moedream.platform.agents import train
    from moedream.platform.ray_setup import init_ray

    args = parse_args(Args, __doc__.split("\n\n")[0], argv)
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray()
    rows = []
    for env in args.envs:
        for clip in args.grad_clips:
            finals, norms = [], []
            for seed in args.seeds:
                result = train(
                    baseline_config(args, env, seed, clip),
                    args.storage_path,
                    env_steps=args.env_steps,
                    run_name=f"{env}_clip{clip:g}_s{seed}",
                    checkpoint=False,
                )
                finals.append(final_return(result.history, args.smooth_steps))
                norms.append(max_grad_norm(result.history))
            label = f"{clip:g}" if clip else "off"
            rows.append(
                [env, label, " / ".join(f"{f:.1f}" for f in finals), float(np.mean(finals)),
                 float(np.std(finals)), float(np.max(norms))]
            )  # fmt: skip
    body = (
        f"Model-free MAPPO (imagination off), {args.env_steps} real env steps per run, batch "
        f"{args.train_batch_size}, minibatch {args.minibatch_size}, {args.num_epochs} epochs, "
        f"seeds {', '.join(map(str, args.seeds))}; final return = mean team return over the "
        f"iterations of the last {args.smooth_steps} real steps (the sample-efficiency "
        "headline's model-free target).\n\n"
        + markdown_table(
            ["env", "grad_clip", "final return per seed", "mean", "std", "max pre-clip grad norm"],
            rows,
        )  # fmt: skip
    )
    name = f"baseline_grad_clip_{args.tag}" if args.tag else "baseline_grad_clip"
    title = "Model-free baseline: final return per grad_clip" + (
        f" ({args.tag})" if args.tag else ""
    )
    publish(name, title, body, args.record)


if __name__ == "__main__":
    main()
