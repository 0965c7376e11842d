"""The results table: every variant of a spec, N seeds each, trained on the platform to a real-step
budget and evaluated on fixed-seed episodes; resumable; table, curves and a RESULTS.md block.

    python benchmarks/results.py --spec configs/results/overcooked.yaml
    python benchmarks/results.py --spec configs/results/overcooked.yaml --only model_free_tuned
    python benchmarks/results.py --spec configs/results/overcooked.yaml --summarise-only

Runs go to ``--out`` (default runs/results/<spec name>): one JSONL curve per (variant, seed),
finished runs are skipped on a re-run, unfinished ones continue from their last evaluation
(a resume point saved after every evaluation; moedream/results/runner.py, resume.py).
The table and curves are built from the finished runs only (moedream/results/summary.py):
``summary.md`` and ``curves.png`` in ``--out``, and with ``--record`` the block
``results_<spec name>`` (benchmarks/results/, indexed in RESULTS.md), plot in benchmarks/plots/.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import parse_args, publish  # noqa: E402


@dataclasses.dataclass
class Args:
    spec: str = "configs/results/overcooked.yaml"
    out: str = ""
    """Run folder (default runs/results/<spec file name without .yaml>)."""
    only: tuple[str, ...] = ()
    """Train only these variants now (the table still lists every variant of the spec)."""
    summarise_only: bool = False
    """Train nothing: build the table from the runs finished so far."""
    record: bool = True
    """Write the block (benchmarks/results/, indexed in RESULTS.md)."""
    plots: str = "benchmarks/plots"
    progress: bool = True


def out_dir(args: Args) -> Path:
    return Path(args.out or f"runs/results/{Path(args.spec).stem}")


def train_selected(args: Args, spec) -> None:
    from moedream.config import ConfigError
    from moedream.platform.ray_setup import init_ray
    from moedream.results.platform_train import PlatformTrainer
    from moedream.results.runner import run_all

    names = [v.name for v in spec.variants]
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        raise ConfigError(f"--only {unknown}: not variants of {args.spec}; valid: {names}")
    selected = [v for v in spec.variants if not args.only or v.name in args.only]
    chosen = dataclasses.replace(spec, variants=tuple(selected))
    trainer = PlatformTrainer(chosen, out_dir(args), progress=args.progress)
    init_ray()
    run_all(chosen, trainer, out_dir(args))


def record(args: Args, spec, markdown: str) -> None:
    from moedream.results.summary import CURVES_FILE

    name = f"results_{Path(args.spec).stem}"
    plot = Path(args.plots) / f"{name}.png"
    if args.record:  # else the curves stay in --out only
        plot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out_dir(args) / CURVES_FILE, plot)
    rows = "; ".join(
        f"`{v.name}`: `python benchmarks/results.py --spec {args.spec} --only {v.name}`"
        for v in spec.variants
    )
    body = (
        f"Each row is trained by the command beside it (resumable: finished runs are skipped), "
        f"the table built from the runs finished so far: {rows}.\n\n"
        + markdown.split("\n", 2)[2]  # the table's own title is the block's
        + f"\n![{name}]({os.path.relpath(plot, 'benchmarks')})\n\n"
        "Timings on a shared 2-core machine (other jobs ran at the same time): wall-clock "
        "figures compare only roughly across variants run at different times.\n"
    )
    publish(name, f"Results table: {Path(args.spec).stem} ({spec.protocol.metric})", body,
            args.record)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    import torch

    from moedream.results.spec import load_spec
    from moedream.results.summary import summarise
    from moedream.results.variants import resolve

    args = parse_args(Args, __doc__.split("\n\n")[0], argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    spec = resolve(load_spec(args.spec))
    if not args.summarise_only:
        train_selected(args, spec)
    markdown = summarise(out_dir(args), spec)
    record(args, spec, markdown)


if __name__ == "__main__":
    main()
