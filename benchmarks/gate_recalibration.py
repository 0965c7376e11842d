"""Cost of recalibrating the gate's model terms after a world-model retrain, as the served-model
provider does it every swap: load the new checkpoint, view the newest held-out real windows
through it (coherence.model_calibration.model_view, teacher-forced), fit the terms' quantiles
(Normalizer.calibrate_model_terms) and persist the view (the gate keeps it for refits of φ).

The quickstart's world model (configs/quickstart.yaml; untrained: the cost does not depend on
the weights) on Overcooked cramped_room random-policy windows of the imagination horizon (at
most the model's context), ``windows`` of them (the provider's gate_calibration_windows).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from _common import markdown_table, parse_args, publish  # noqa: E402

from moedream.coherence.gate import save_model_view  # noqa: E402
from moedream.coherence.kernel import GateConfig, Normalizer  # noqa: E402
from moedream.coherence.model_calibration import context_steps, model_view  # noqa: E402
from moedream.envs import env_spec  # noqa: E402
from moedream.platform.commands.calibrate_gate import (  # noqa: E402
    collect_random_episodes,
    windows_from_episodes,
)
from moedream.world_model.model import WorldModel, WorldModelConfig  # noqa: E402


@dataclasses.dataclass
class Args:
    config: str = "configs/quickstart.yaml"
    """YAML whose world_model.model section is the model; agents.imagination.horizon the H."""
    windows: tuple[int, ...] = (64, 256)
    """Held-out windows per recalibration."""
    repeats: int = 5
    threads: int = 1
    record: bool = True


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(Path(args.config).read_text())
    model = WorldModel(WorldModelConfig.from_dict(cfg["world_model"]["model"]),
                       env_spec("overcooked"))  # fmt: skip
    steps = context_steps(model, cfg["agents"]["imagination"]["horizon"])
    episodes = collect_random_episodes("overcooked", 30, 120, seed=0)
    config = GateConfig()
    normalizer = Normalizer.fit([e["obs"] for e in episodes[:10]], config)
    held = windows_from_episodes(episodes[10:], steps, stride=steps)
    data = {k: getattr(held, k) for k in ("obs", "action", "reward", "terminated")}
    model.fit_normalization(data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "world_model.safetensors"
        model.save(path)
        for n in args.windows:
            windows = {k: v[:n] for k, v in data.items()}
            parts = [_recalibrate(path, windows, normalizer, config, Path(tmp))
                     for _ in range(args.repeats)]  # fmt: skip
            median = np.median(np.asarray(parts), axis=0)  # [4]
            rows.append([len(windows["obs"]), *(f"{s:.3f}" for s in median),
                         f"{median.sum():.3f}"])  # fmt: skip
    headers = ["held-out windows", "load checkpoint (s)", "model_view (s)", "fit quantiles (s)",
               "persist view (s)", "total (s)"]  # fmt: skip
    note = (
        f"Model: {args.config} world_model.model ({sum(p.numel() for p in model.parameters())} "
        f"parameters), windows of {steps} steps, {args.threads} torch thread(s), median of "
        f"{args.repeats}. Load average at the end: {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs (a shared machine: loaded-machine figures)."
    )
    publish("gate_recalibration", "Gate model-term recalibration after a retrain",
            note + "\n\n" + markdown_table(headers, rows), args.record)  # fmt: skip


def _recalibrate(path: Path, windows: dict, normalizer: Normalizer, config: GateConfig,
                 tmp: Path) -> list[float]:  # fmt: skip
    """Seconds of each part of one recalibration: load, view, fit, persist."""
    times = [time.perf_counter()]
    model = WorldModel.load(path, map_location="cpu")
    times.append(time.perf_counter())
    view = model_view(model, windows)
    times.append(time.perf_counter())
    Normalizer.from_dict(normalizer.to_dict()).calibrate_model_terms(
        view, windows["reward"], config
    )
    times.append(time.perf_counter())
    save_model_view(tmp / "view.npz", view, windows["reward"])
    times.append(time.perf_counter())
    return list(np.diff(times))


if __name__ == "__main__":
    main(parse_args(Args, __doc__.splitlines()[0]))
