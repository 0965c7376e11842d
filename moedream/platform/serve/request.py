"""The callers' side of the world-model endpoint: the one way an ``imagine`` request is built.

The agents' imaginer and the coherence gate send it through a DeploymentHandle, the HTTP client
as JSON; ``schemas.parse_imagine`` is the server's side that checks it. No ray and no torch
here: the HTTP client imports it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def imagine_request(
    start_obs: Any,
    actions: Any = None,
    *,
    horizon: int,
    seed: int = 0,
    context_obs: Any = None,
    context_actions: Any = None,
    noise_scale: float | None = None,
    num_samples: int | None = None,
    policy: str | None = None,
    sampler: dict[str, Any] | None = None,
    episode_id: str | None = None,
    prediction: str | None = None,
    as_lists: bool = False,
) -> dict[str, Any]:
    """An ``ImagineRequest`` (schemas.py) body.

    start_obs        [B, N, D]       where the rollouts start
    actions          [B, H, N, A]    encoded joint actions to replay (or [B, H, N] indices)
    horizon          H               imagined steps
    seed             int             sampling seed
    context_obs      [B, T, N, D]    the steps before ``start_obs`` the model conditions on ...
    context_actions  [B, T, N, A]    ... and the actions taken after each of them
    episode_id       str             compose this posted episode's memory (see episode_request)
    prediction       str             "sample" (diffusion, the server's default) or "mean"

    The other fields go in only when given, so the server's defaults apply otherwise. Values
    are passed as they are (the server validates them); ``as_lists`` turns numpy arrays into
    nested lists (JSON over HTTP, or a deployment that expects JSON)."""
    body: dict[str, Any] = {"start_obs": start_obs, "horizon": horizon, "seed": seed}
    optional = {"actions": actions, "policy": policy, "num_samples": num_samples,
                "noise_scale": noise_scale, "sampler": sampler,
                "episode_id": episode_id, "prediction": prediction}  # fmt: skip
    body.update({k: v for k, v in optional.items() if v is not None})
    if context_obs is not None or context_actions is not None:
        body["context"] = {"obs": context_obs, "actions": context_actions}
    return jsonable(body) if as_lists else body


def episode_request(
    episode_id: str, obs: Any, actions: Any, *, seed: int = 0, as_lists: bool = False
) -> dict[str, Any]:
    """An ``EpisodeRequest`` (schemas.py) body: an episode's real obs [L+1, N, D] and the
    actions [L, N, A] (or [L, N] indices) between them, to build or continue its memory."""
    body = {"episode_id": episode_id, "obs": obs, "actions": actions, "seed": seed}
    return jsonable(body) if as_lists else body


def jsonable(value: Any) -> Any:
    """numpy arrays (also inside dicts, e.g. per-agent observations) -> nested lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value
