"""Seconds of one MBMAPPO PPO update (``MBMAPPO._update``) at 1 vs 2 torch threads, measured
in the same run.

The team is the configs/agents_overcooked.yaml one (Overcooked cramped_room), model-free: what
is timed is the learner update alone, on one batch of real episodes sampled once with the
algorithm's env runners (deep-copied before every update: the learner's connectors change the
episodes in place). Thread counts are timed in turn (1, 2, 1, 2, ...), so load from other
processes on a shared machine hits all of them alike. Sampling is synchronous, so the env
runners are idle while the learner updates and the learner could use every core.

    .venv/bin/python benchmarks/learner_threads.py
    .venv/bin/python benchmarks/learner_threads.py --repeats 2 --no-record   # quick look
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/learner_threads.py  # waiting threads sleep
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import interleaved_times, markdown_table, parse_args, record  # noqa: E402

CONFIG = "configs/agents_overcooked.yaml"


@dataclasses.dataclass
class Args:
    batch_steps: int = 4000
    """real env steps in the timed batch (one iteration's real + imagined steps)"""
    minibatch_size: int = 500
    num_epochs: int = 6
    threads: tuple[int, ...] = (1, 2)
    """torch intra-op thread counts to time; the first is the baseline of the ratio"""
    warmup: int = 1
    repeats: int = 9
    record: bool = True


def build_algo(args: Args, logdir: str):
    """The configs/agents_overcooked.yaml team with the benchmark's batch, imagination off,
    leaving the learner's thread count to the caller."""
    from moedream.platform.agents import AgentsConfig, build_algo_config

    cfg = AgentsConfig.from_yaml(CONFIG).replace(
        train_batch_size=args.batch_steps,
        minibatch_size=args.minibatch_size,
        num_epochs=args.num_epochs,
    )
    return build_algo_config(cfg, logdir_root=logdir).build_algo()


def update_step(algo, batches: list[list], threads: int) -> Callable[[], None]:
    """One PPO update at ``threads`` torch threads on the next of ``batches`` (copies of the
    episodes made before the clock starts, so the timings are of the update alone)."""

    def step() -> None:
        batch = batches.pop()
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            algo._stage_seconds = {}  # _update adds its seconds to the iteration's stages
            algo._update(batch)
        finally:
            torch.set_num_threads(previous)

    return step


def time_updates(args: Args) -> tuple[dict[int, list[float]], int]:
    """Seconds of each timed update per thread count, and the batch's env steps."""
    from moedream.platform.ray_setup import init_ray

    init_ray()
    with tempfile.TemporaryDirectory(prefix="learner_threads_") as logdir:
        algo = build_algo(args, logdir)
        try:
            episodes = algo._sample_real()
            calls = args.warmup + args.repeats
            steps = {
                n: update_step(algo, [copy.deepcopy(episodes) for _ in range(calls)], n)
                for n in args.threads
            }
            times = interleaved_times(steps, warmup=args.warmup, repeats=args.repeats)
        finally:
            algo.stop()
    return times, sum(e.env_steps() for e in episodes)


def times_table(args: Args, times: dict[int, list[float]]) -> str:
    """Median and mean (what training's wall-clock adds up) per thread count, each also as a
    ratio to the first thread count's."""
    base = times[args.threads[0]]
    rows = []
    for n in args.threads:
        median, mean = statistics.median(times[n]), statistics.mean(times[n])
        rows.append([n, median, mean, min(times[n]), max(times[n])])
        rows[-1] += [
            f"{median / statistics.median(base):.2f}x",
            f"{mean / statistics.mean(base):.2f}x",
        ]
        print(rows[-1], [round(t, 3) for t in times[n]], flush=True)
    baseline = f"vs {args.threads[0]} thread(s)"
    headers = ["torch threads", "median s/update", "mean s", "min s", "max s"]
    return markdown_table(headers + [f"median {baseline}", f"mean {baseline}"], rows)


def main() -> None:
    args = parse_args(Args, __doc__)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    times, steps = time_updates(args)
    load_after = os.getloadavg()[0]
    wait_policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    body = (
        f"One MBMAPPO PPO update (`MBMAPPO._update`: {args.num_epochs} epochs, minibatch "
        f"{args.minibatch_size}) on {steps} real Overcooked cramped_room env steps, team of "
        f"{CONFIG}, imagination off. Thread counts timed in turn, {args.repeats} updates each "
        f"after {args.warmup} warm-up, each on a fresh copy of the batch; OMP_WAIT_POLICY "
        f"{wait_policy}. 1-min load average {load_before:.1f} before, {load_after:.1f} after on "
        f"{os.cpu_count()} logical CPUs (the benchmark alone adds 1 to 2; more: other processes "
        f"shared the cores).\n\n{times_table(args, times)}"
    )
    # OpenMP reads OMP_WAIT_POLICY once, at start-up: each policy is its own run and block
    policy_set = wait_policy != "unset"
    name = "learner_threads" + (f"_omp_{wait_policy.lower()}" if policy_set else "")
    title = "Learner update: 1 vs 2 torch threads"
    title += f", OMP_WAIT_POLICY={wait_policy}" if policy_set else ""
    if not args.record:
        print(body)
        return
    command = (f"OMP_WAIT_POLICY={wait_policy} " if policy_set else "") + "python "
    record(name, title, body, command=command + " ".join(sys.argv))


if __name__ == "__main__":
    main()
