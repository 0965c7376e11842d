"""The main job: local Ray, collect episodes, (later stages: train the world model, serve it,
learn with gated imagination, evaluate, report)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moedream.config import ConfigBase, check
from moedream.platform.collect import CollectConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "quickstart.yaml"


@dataclasses.dataclass
class QuickstartConfig(ConfigBase):
    name: str = "quickstart"
    """Run name: everything goes to <out>/<name>/."""
    out: str = "runs"
    collect: CollectConfig = dataclasses.field(default_factory=CollectConfig)

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check(
            bool(self.name) and "/" not in self.name,
            f"{prefix}name",
            self.name,
            "must be a non-empty folder name without '/'",
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name


def run_quickstart(cfg: QuickstartConfig) -> dict:
    from moedream.data import read_episodes
    from moedream.platform.collect import collect_parallel
    from moedream.platform.commands.collect import summarize
    from moedream.platform.ray_setup import init_ray

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    collect_cfg = cfg.collect.replace(out=str(run_dir / "data"))
    print(f"[1/1] starting Ray and collecting {collect_cfg.episodes} episodes of {collect_cfg.env}")
    init_ray()
    paths = collect_parallel(collect_cfg)
    spec, episodes = read_episodes(paths)
    summary = summarize(spec, episodes)
    print(summary)
    (run_dir / "summary.txt").write_text(summary + "\n")
    return {"run_dir": str(run_dir), "episodes": len(episodes), "shards": [str(p) for p in paths]}
