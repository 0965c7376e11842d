"""Parallel episode collection on Ray: each task collects a chunk of episodes into its own
Parquet shard (written atomically, see moedream/data/episodes.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from moedream.config import ConfigBase, check, check_positive


@dataclasses.dataclass
class CollectConfig(ConfigBase):
    env: str = "overcooked"
    """Env name from the registry (overcooked, mamujoco, memory)."""
    env_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Options of that env (e.g. layout, horizon, shaped_reward_weight)."""
    episodes: int = 8
    """How many episodes to collect in all."""
    episodes_per_shard: int = 4
    """Episodes per Parquet shard (one Ray task each)."""
    seed: int = 0
    out: str = "runs/data"
    """Output folder of the shards."""
    num_cpus_per_task: float = 0.5
    """Ray CPUs per collection task (fractional: the local cluster has 8 logical CPUs)."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        from moedream.envs import env_config

        env_config(self.env, **self.env_options)  # names the bad env or option
        check(self.episodes > 0, f"{prefix}episodes", self.episodes, "must be > 0")
        check(
            self.episodes_per_shard > 0,
            f"{prefix}episodes_per_shard",
            self.episodes_per_shard,
            "must be > 0",
        )
        check_positive(f"{prefix}num_cpus_per_task", self.num_cpus_per_task)


def collect_parallel(cfg: CollectConfig, *, show_progress: bool = True) -> list[Path]:
    """Collect ``cfg.episodes`` episodes with Ray tasks; returns the shard paths."""
    import ray
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    remote = ray.remote(num_cpus=cfg.num_cpus_per_task)(_collect_shard)
    chunks = _chunks(cfg.episodes, cfg.episodes_per_shard)
    refs = [
        remote.remote(
            cfg.env,
            cfg.env_options,
            n,
            str(out / f"shard-{cfg.seed:04d}-{i:05d}.parquet"),
            cfg.seed * 1000 + i,
        )
        for i, n in enumerate(chunks)
    ]
    paths: list[Path] = []
    with tqdm(
        total=cfg.episodes, desc=f"collect {cfg.env}", unit="ep", disable=not show_progress
    ) as bar:
        pending = dict(zip(refs, chunks))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            paths.append(Path(ray.get(done[0])))
            bar.update(pending.pop(done[0]))
    return sorted(paths)


def _collect_shard(env: str, options: dict, n: int, path: str, seed: int) -> str:
    from moedream.data import collect_episodes

    return str(collect_episodes(env, options, n, path, seed=seed, run_id=Path(path).stem))


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]
