"""Imagination from the served world model, gated by the central coherence gate.

``ServedWorldModelImaginer`` is the imagination provider of MBMAPPO
(moedream.policies.imagination.ImaginationProvider) that the main job uses:

- ``imagine``: closed-loop rollouts under the CURRENT planner. Each step sends one batched
  request to the Serve deployment (``imagine`` with horizon 1 and the imagined steps so far as
  context), so the planner acts on imagined observations, and the world model conditions on
  the whole imagined history;
- ``gate``: the trajectories go to the central gate actor (``judge_and_refine``); REFINE rows
  are re-imagined by the gate through the same deployment with shrunk noise, and the final
  (possibly re-imagined) rows come back with the verdicts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moedream.envs.spec import EnvSpec
from moedream.world_model.trajectory import Trajectories


@dataclasses.dataclass
class ServedWorldModelImaginerFactory:
    """Picklable factory (the algorithm builds its provider in setup())."""

    env_name: str
    app_name: str = "world_model"
    deployment_name: str = "WorldModelDeployment"
    gate_actor_name: str = "moedream_coherence_gate"
    gate_namespace: str = "moedream"
    policy_id: str = "team"
    max_rows: int = 256
    """Rows per Serve request (the deployment's max_batch)."""

    def __call__(self, config: Any) -> ServedWorldModelImaginer:
        return ServedWorldModelImaginer(
            spec=EnvSpec.from_json(config.env_spec_json),
            horizon=config.imagination_horizon,
            seed=config.seed or 0,
            factory=self,
        )


class ServedWorldModelImaginer:
    def __init__(
        self, *, spec: EnvSpec, horizon: int, seed: int, factory: ServedWorldModelImaginerFactory
    ):
        self.spec, self.horizon, self.factory = spec, int(horizon), factory
        self._seed = int(seed)
        self._calls = 0
        self._last: dict[str, float] = {}

    # -------------------------------------------------------------------------- imagine

    def imagine(self, start_obs: np.ndarray, policy: Any) -> Trajectories:
        """start_obs [B, N, D] -> Trajectories of ``horizon`` steps, actions from ``policy``."""
        from ray import serve

        handle = serve.get_deployment_handle(
            self.factory.deployment_name, app_name=self.factory.app_name
        )
        self._calls += 1
        b, h = start_obs.shape[0], self.horizon
        obs = [np.asarray(start_obs, dtype=np.float32)]  # list of [B, N, D]
        actions, rewards, terms, uncert, obs_std, loads = [], [], [], [], [], []
        for t in range(h):
            encoded = self.spec.encode_actions(policy.act(obs[-1]))  # [B, N, A]
            replies = [
                handle.imagine.remote(self._request(obs, actions, encoded, rows, t))
                for rows in _row_chunks(b, self.factory.max_rows)
            ]
            out = _concat_replies([r.result() for r in replies])
            obs.append(out["obs"][:, 1])
            actions.append(encoded)
            rewards.append(out["reward"][:, 0])
            terms.append(out["terminated"][:, 0])
            uncert.append(out["uncertainty"][:, 0])
            if out.get("obs_std") is not None:
                obs_std.append(out["obs_std"][:, 0])
            if out.get("expert_load") is not None:
                loads.append(out["expert_load"])
        trajs = Trajectories(
            obs=np.stack(obs, 1),  # [B, H+1, N, D]
            action=np.stack(actions, 1),  # [B, H, N, A]
            reward=np.stack(rewards, 1),  # [B, H, N]
            terminated=np.stack(terms, 1),  # [B, H, N]
            uncertainty=np.stack(uncert, 1),  # [B, H]
            obs_std=np.stack(obs_std, 1) if len(obs_std) == h else None,
            expert_load=np.mean(loads, 0) if loads else None,  # [L, E]
        )
        self._last["uncertainty_mean"] = float(np.mean(trajs.uncertainty))
        self._last["imagined_reward_mean"] = float(np.mean(trajs.reward[..., 0]))
        if trajs.expert_load is not None:
            self._expert_load = trajs.expert_load
        return trajs

    def _request(self, obs: list, actions: list, encoded: np.ndarray, rows: slice, t: int) -> dict:
        request = {
            "start_obs": obs[-1][rows],
            "actions": encoded[rows, None],  # [b, 1, N, A]: one step
            "horizon": 1,
            "seed": (self._seed * 1_000_003 + self._calls * 1009 + t) % 2**31,
        }
        if t > 0:  # the imagined steps so far are the model's context
            request["context"] = {
                "obs": np.stack(obs[:-1], 1)[rows],  # [b, t, N, D]
                "actions": np.stack(actions, 1)[rows],  # [b, t, N, A]
            }
        return request

    # ----------------------------------------------------------------------------- gate

    def gate(self, trajectories: Trajectories) -> Any:
        import ray

        from moedream.coherence.kernel import Verdict
        from moedream.policies.imagination import GateDecision

        actor = ray.get_actor(self.factory.gate_actor_name, namespace=self.factory.gate_namespace)
        result = ray.get(
            actor.judge_and_refine.remote(
                trajectories, self.spec.env_name, self.factory.policy_id, seed=self._calls
            )
        )
        keep = result.verdicts == Verdict.APPROVE
        refined = result.tries > 0  # went through the refine loop
        self._last["gate_h7_mean"] = float(np.mean(result.h7))
        return GateDecision(  # approved + refined (then approved) + rejected = B
            keep=keep,
            approved=int(np.sum(keep & ~refined)),
            refined=int(np.sum(keep & refined)),
            rejected=int(np.sum(~keep)),
            trajectories=result.trajectories,
        )

    # --------------------------------------------------------------------- bookkeeping

    def metrics(self) -> dict[str, float]:
        out = dict(self._last)
        load = getattr(self, "_expert_load", None)
        if load is not None:  # [L, E] fraction of tokens per expert
            for layer, row in enumerate(np.asarray(load)):
                for expert, value in enumerate(row):
                    out[f"expert_load_l{layer}_e{expert}"] = float(value)
        return out

    def get_state(self) -> dict[str, Any]:
        return {"calls": self._calls, "seed": self._seed}

    def set_state(self, state: dict[str, Any]) -> None:
        self._calls = int(state.get("calls", 0))


def _row_chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _concat_replies(replies: list[dict]) -> dict[str, np.ndarray | None]:
    keys = ("obs", "reward", "terminated", "uncertainty", "obs_std")
    out: dict[str, Any] = {}
    for key in keys:
        parts = [r.get(key) for r in replies]
        out[key] = (
            None
            if any(p is None for p in parts)
            else np.concatenate([np.asarray(p) for p in parts])
        )
    out["expert_load"] = replies[0].get("expert_load")
    return out
