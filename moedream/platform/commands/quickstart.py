"""`moedream quickstart`: the main job, i.e. the pipeline of `moedream train` on the embedded
default config (configs/quickstart.yaml), or on `--env mamujoco`'s."""

from __future__ import annotations

from moedream.platform.commands.train import add_arguments, run

HELP = "the main job: the whole pipeline on the embedded default config"
__all__ = ["HELP", "add_arguments", "run"]
