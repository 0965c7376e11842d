"""The main job's report: runs/<name>/report.md with PNG plots (matplotlib, no display)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from moedream.coherence.kernel import CAUSES

_LOAD_KEY = re.compile(r"moe/load_l(\d+)_e(\d+)$")


def write_report(run_dir: Path, cfg: Any, figures: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    plots = {
        "return": _plot_return(run_dir, figures),
        "gate": _plot_gate(run_dir, figures["agents"]["history"]),
        "experts": _plot_expert_load(run_dir, figures["world_model"]),
        "world_model": _plot_world_model_loss(run_dir, figures["world_model"]),
    }
    text = _markdown(cfg, figures, {k: v for k, v in plots.items() if v})
    path = run_dir / "report.md"
    path.write_text(text)
    return path


def _series(history: list[dict[str, float]], key: str) -> np.ndarray:
    return np.array([h.get(key, math.nan) for h in history], dtype=float)


def _plot_return(run_dir: Path, figures: dict[str, Any]) -> str | None:
    import matplotlib.pyplot as plt

    history = figures["agents"]["history"]
    if not history:
        return None
    steps, ret = _series(history, "charts/real_env_steps"), _series(history, "charts/team_return")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, ret, marker="o", label="model-based team (training episodes)")
    ev = figures["evaluation"]
    ax.axhline(ev["trained"]["team_return"], color="C2", ls="--", label="trained team (evaluation)")
    ax.axhline(ev["random"]["team_return"], color="C3", ls=":", label="random team (evaluation)")
    ax.set_xlabel("real env steps")
    ax.set_ylabel("team return per episode")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, run_dir / "return_vs_real_steps.png")


def _plot_gate(run_dir: Path, history: list[dict[str, float]]) -> str | None:
    import matplotlib.pyplot as plt

    if not history:
        return None
    it = np.arange(1, len(history) + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in (("approve", "C2"), ("refine", "C1"), ("reject", "C3")):
        ax.plot(it, _series(history, f"gate/{name}_rate"), marker="o", color=color, label=name)
    for k, cause in enumerate(CAUSES):  # why trajectories were not approved whole
        series = _series(history, f"provider/gate_cause_{cause}_rate")
        if np.isfinite(series).any():
            ax.plot(it, series, ls="--", color=f"C{4 + k}", label=f"cause: {cause}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("fraction of imagined trajectories")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, run_dir / "gate_rates.png")


def _expert_loads(history: dict[str, list]) -> dict[int, dict[int, float]]:
    loads: dict[int, dict[int, float]] = {}
    for key, values in history.items():
        match = _LOAD_KEY.search(key)
        finite = [v for v in values if isinstance(v, (int, float)) and v == v]
        if match and finite:
            loads.setdefault(int(match[1]), {})[int(match[2])] = float(finite[-1])
    return loads


def _plot_expert_load(run_dir: Path, wm: dict[str, Any]) -> str | None:
    import matplotlib.pyplot as plt

    loads = _expert_loads(wm.get("history", {}))
    if not loads:
        return None
    layers = sorted(loads)
    experts = sorted({e for layer in loads.values() for e in layer})
    width = 0.8 / len(layers)
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, layer in enumerate(layers):
        xs = np.arange(len(experts)) + k * width
        ax.bar(xs, [loads[layer].get(e, 0.0) for e in experts], width, label=f"layer {layer}")
    ax.axhline(1.0 / len(experts), color="k", ls=":", label="uniform")
    ax.set_xticks(np.arange(len(experts)) + 0.4 - width / 2, [f"e{e}" for e in experts])
    ax.set_ylabel("fraction of routed tokens (last report)")
    ax.legend()
    return _save(fig, run_dir / "expert_load.png")


def _plot_world_model_loss(run_dir: Path, wm: dict[str, Any]) -> str | None:
    import matplotlib.pyplot as plt

    history = wm.get("history", {})
    steps = history.get("step")
    keys = [k for k in ("wm/loss", "eval/obs_mse", "eval/copy_obs_mse") if k in history]
    if not steps or not keys:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        ys = np.array(history[key], dtype=float)
        ok = np.isfinite(ys)
        ax.plot(np.array(steps)[ok], ys[ok], marker=".", label=key)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, run_dir / "world_model_loss.png")


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.3g}"
    return str(value)


def _cause_rates(last: dict[str, float]) -> str:
    """'drift 0.02, reward 0.31, ...' from the gate's per-cause rates ('n/a' without them)."""
    rates = {c: last.get(f"provider/gate_cause_{c}_rate", math.nan) for c in CAUSES}
    if all(v != v for v in rates.values()):
        return "n/a"
    return ", ".join(f"{c} {_fmt(v)}" for c, v in rates.items())


def _markdown(cfg: Any, figures: dict[str, Any], plots: dict[str, str]) -> str:
    history = figures["agents"]["history"]
    last = history[-1] if history else {}
    ev, gate, wm = figures["evaluation"], figures["gate"], figures["world_model"]["final"]
    rows = [
        ("env", f"{cfg.collect.env} {cfg.collect.env_options}"),
        ("real env steps (agents)", _fmt(last.get("charts/real_env_steps", math.nan))),
        ("imagined env steps learned from", _fmt(last.get("charts/imagined_env_steps", math.nan))),
        ("team return, trained (eval)", _fmt(ev["trained"]["team_return"])),
        ("team return, random (eval)", _fmt(ev["random"]["team_return"])),
        ("soups per episode, trained / random",
         f"{_fmt(ev['trained']['soups_per_episode'])} / {_fmt(ev['random']['soups_per_episode'])}"),
        ("gate: held-out real trajectories approved", _fmt(gate.get("holdout_real_approval", math.nan))),
        ("gate: imagined approve / refine / reject (last iteration)",
         " / ".join(_fmt(last.get(f"gate/{k}_rate", math.nan)) for k in ("approve", "refine", "reject"))),
        ("gate: not approved whole, by cause (last iteration)", _cause_rates(last)),
        ("gate: truncated to the coherent prefix (last iteration)",
         _fmt(last.get("provider/gate_truncated_rate", math.nan))),
        ("world model: final loss", _fmt(wm.get("wm/loss", math.nan))),
    ]  # fmt: skip
    lines = [
        f"# moedream quickstart report: `{cfg.name}`",
        "",
        "Every figure below was measured by this run (`moedream quickstart`).",
        "",
        "| what | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "Wall time per stage (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in figures["timings_s"].items()),
        "",
    ]
    titles = {
        "return": "Team return vs real env steps",
        "gate": "Coherence gate verdicts per iteration",
        "experts": "World-model expert load (Ray Train, last report)",
        "world_model": "World-model training loss",
    }
    for key, name in plots.items():
        lines += [f"## {titles[key]}", "", f"![{titles[key]}]({name})", ""]
    lines += ["## Data", "", "```", figures["summary"], "```", ""]
    return "\n".join(lines)
