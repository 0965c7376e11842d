"""Decision-time planning through a world model: a building block, not yet an entry point.

No config option, evaluation or Serve client acts with it (teams act with their planner's
policy; the former ``team.mode: mpc`` setting was removed because nothing used it), and no
benchmark has measured it against the policy alone.

At each decision the planner samples ``n_candidates`` joint action sequences of length H from
its policy, imagines them through ``imagine_fn`` (the world model, injected: any callable
``imagine_fn(start_obs [C, N, D], action_plans) -> Trajectories-like`` with ``obs`` [C, H+1, N, D],
``reward`` [C, H, N], ``terminated`` [C, H, N]) and scores each by the reflector:

    score_c = sum_{t<H} gamma^t r_team(c, t) alive(c, t) + gamma^H alive(c, H) V(o_H^c)

(r_team = agent 0's reward when the team reward is shared, else the sum). It returns the first
joint action of the best sequence (receding horizon).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from moedream.envs.spec import EnvSpec
from moedream.policies.imagination import TeamPolicy
from moedream.policies.names import REFLECTOR


@dataclasses.dataclass
class MPCSettings:
    n_candidates: int = 16
    horizon: int = 5
    gamma: float = 0.99
    shared_team_reward: bool = True


class MPCPlanner:
    """Acts by planning through ``imagine_fn``; the team module supplies policy and values."""

    def __init__(
        self,
        module: Any,
        spec: EnvSpec,
        imagine_fn: Callable[[np.ndarray, np.ndarray], Any],
        *,
        shared_planner: bool = True,
        settings: MPCSettings | None = None,
    ):
        self.module, self.spec, self.imagine_fn = module, spec, imagine_fn
        self.policy = TeamPolicy(module, spec, shared_planner)
        self.settings = settings or MPCSettings()

    def candidate_plans(self, obs: np.ndarray) -> np.ndarray:
        """obs [N, D] -> plans [C, H, N] (discrete) or [C, H, N, A], sampled from the policy."""
        c, h = self.settings.n_candidates, self.settings.horizon
        repeated = np.repeat(obs[None], c * h, axis=0)  # [C * H, N, D]
        actions = self.policy.act(repeated)  # [C * H, N(, A)]
        return actions.reshape(c, h, *actions.shape[1:])

    @torch.no_grad()
    def scores(self, trajs: Any) -> np.ndarray:
        """Imagined trajectories -> score per candidate [C] (formula in the module docstring)."""
        s = self.settings
        reward = np.asarray(trajs.reward, dtype=np.float64)  # [C, H, N]
        team = reward[..., 0] if s.shared_team_reward else reward.sum(-1)  # [C, H]
        done = np.asarray(trajs.terminated).max(-1) >= 0.5  # [C, H]
        alive = np.concatenate(
            [np.ones((team.shape[0], 1), bool), ~np.cumsum(done, 1).astype(bool)], 1
        )
        discount = s.gamma ** np.arange(team.shape[1])  # [H]
        returns = (team * discount * alive[:, :-1]).sum(1)  # [C]
        return returns + (s.gamma ** team.shape[1]) * alive[:, -1] * self.final_values(
            trajs.obs[:, -1]
        )

    def final_values(self, obs: np.ndarray) -> np.ndarray:
        """Joint observations [C, N, D] -> reflector value (for agent 0) [C]."""
        reflector = self.module[REFLECTOR]
        device = next(reflector.parameters()).device
        joint = torch.as_tensor(
            np.asarray(obs, np.float32).reshape(obs.shape[0], -1), device=device
        )
        index = torch.zeros(obs.shape[0], dtype=torch.int64, device=device)
        return reflector.value(joint, index).cpu().numpy().astype(np.float64)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """obs [N, D] -> the first joint action [N] (or [N, A]) of the best imagined plan."""
        plans = self.candidate_plans(obs)
        start = np.repeat(obs[None], plans.shape[0], axis=0)  # [C, N, D]
        trajs = self.imagine_fn(start, plans)
        return plans[int(np.argmax(self.scores(trajs)))][0]
