"""Perceiver, planner and reflector as RLModules in one MultiRLModule (RLlib new API stack).

Follows RLlib's shared-encoder pattern (``examples/rl_modules/classes/
vpg_using_shared_encoder_rlm.py``), made to work with PPO's learner:

- ``perceiver`` (:class:`Perceiver`): the observation encoder, shared by all agents and roles.
  obs [B, D_i] -> (optional running mean/std normalisation) -> zero-padded [B, D] ->
  embedding [B, E]. The normaliser lives in the module, so raw real and raw imagined
  observations are normalised alike everywhere;
  :class:`moedream.policies.connectors.UpdateObsNormStats` (a learner connector piece) updates
  its statistics from real observations only.
- ``planner`` (:class:`Planner`): the acting policy. By default ONE planner is shared by all
  agents and told who is acting through a learned agent-id embedding (column ``agent_index``,
  added by :class:`moedream.policies.connectors.AddAgentIndex`); with per-agent planners each
  agent has its own module ``planner_<agent_id>``.
- ``reflector`` (:class:`Reflector`): the centralised critic (MAPPO): the value of an agent
  from the joint observation of all agents (column ``joint_obs``, added on the learner by
  :class:`moedream.policies.connectors.AddJointObservation`), each agent's observation
  encoded by the perceiver.

RLlib asks each planner for ``compute_values`` (GAE connector, PPO loss), so a planner reaches
the perceiver and the reflector through references that the MultiRLModule wires in ``setup``.
The references are kept out of ``nn.Module``'s registry (plain tuple), so every parameter
belongs to exactly one module: one optimizer over all modules trains them together
(:class:`moedream.policies.algorithm.TeamPPOTorchLearner`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.models.base import ENCODER_OUT
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModule
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule
from torch import nn

from moedream.policies.names import AGENT_INDEX, JOINT_OBS, PERCEIVER, REFLECTOR, planner_id
from moedream.policies.obs_norm import RunningObsNorm


def mlp(
    sizes: list[int], activation: type[nn.Module] = nn.Tanh, *, out_gain: float = 1.0
) -> nn.Sequential:
    """Linear layers of ``sizes`` with ``activation`` between them (none after the last).

    Orthogonal init as in CleanRL's PPO: gain sqrt(2) for hidden layers, ``out_gain`` for the
    last (0.01 for a policy head, so the first policy is close to uniform).
    """
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        linear = nn.Linear(n_in, n_out)
        nn.init.orthogonal_(linear.weight, out_gain if last else 2**0.5)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if not last:
            layers.append(activation())
    return nn.Sequential(*layers)


class Perceiver(TorchRLModule):
    """Shared observation encoder.

    model_config: obs_dim (padded D), embedding_dim, hidden; obs_norm (bool, default false)
    and obs_norm_clip: standardise every observation with a running mean/std
    (:class:`moedream.policies.obs_norm.RunningObsNorm`, its statistics are buffers of this
    module) before encoding. The normaliser is applied in every forward pass (env runners,
    imagination, learner), so raw real and raw imagined observations are treated alike; its
    statistics are updated on the learner from real observations only
    (:class:`moedream.policies.connectors.UpdateObsNormStats`) and reach the env runners with
    the weights.
    """

    def setup(self) -> None:
        super().setup()
        cfg = self.model_config
        self.obs_dim = int(cfg["obs_dim"])
        self.net = mlp([self.obs_dim, *cfg["hidden"], int(cfg["embedding_dim"])])
        self.obs_norm = (
            RunningObsNorm(self.obs_dim, clip=float(cfg.get("obs_norm_clip", 10.0)))
            if cfg.get("obs_norm", False)
            else None
        )

    def encode(self, obs: torch.Tensor, agent_dims: list[int] | None = None) -> torch.Tensor:
        """obs [..., D_i] (D_i <= D) -> embedding [..., E].

        ``agent_dims``: for joint observations [..., N, D] already zero-padded per agent, the
        true size of each agent's observation, so that the padding stays zero after
        normalisation (as it is for a single agent's [..., D_i] observation).
        """
        obs = obs.float()
        if self.obs_norm is not None:
            obs = self.obs_norm(obs)  # [..., D_i], standardised and clipped
            if agent_dims is not None and min(agent_dims) < obs.shape[-1]:
                dims = torch.as_tensor(agent_dims, device=obs.device)  # [N]
                keep = torch.arange(obs.shape[-1], device=obs.device) < dims[:, None]  # [N, D]
                obs = obs * keep
        pad = self.obs_dim - obs.shape[-1]
        if pad > 0:  # [..., D_i] -> [..., D]
            obs = nn.functional.pad(obs, (0, pad))
        return torch.tanh(self.net(obs))

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {ENCODER_OUT: self.encode(batch[Columns.OBS])}


class Reflector(TorchRLModule):
    """Centralised critic over all agents' perceptions.

    model_config: n_agents, obs_dim, embedding_dim, hidden, agent_embedding_dim, obs_dims (the
    true observation size of each agent, default obs_dim for all).
    """

    def setup(self) -> None:
        super().setup()
        cfg = self.model_config
        self.n_agents = int(cfg["n_agents"])
        self.obs_dim = int(cfg["obs_dim"])
        self.agent_obs_dims = [int(d) for d in cfg.get("obs_dims", [self.obs_dim] * self.n_agents)]
        agent_dim = int(cfg["agent_embedding_dim"])
        self.agent_embedding = nn.Embedding(self.n_agents, agent_dim) if agent_dim else None
        n_in = self.n_agents * int(cfg["embedding_dim"]) + agent_dim
        self.value_head = mlp([n_in, *cfg["hidden"], 1])
        self._perceiver: tuple[Perceiver, ...] = ()  # wired by TeamModule.setup

    def wire(self, perceiver: Perceiver) -> None:
        self._perceiver = (perceiver,)

    def value(self, joint_obs: torch.Tensor, agent_index: torch.Tensor) -> torch.Tensor:
        """joint_obs [B, N * D], agent_index [B] -> value [B]."""
        b = joint_obs.shape[0]
        per_agent = joint_obs.float().reshape(b, self.n_agents, self.obs_dim)  # [B, N, D]
        emb = self._perceiver[0].encode(per_agent, self.agent_obs_dims)  # [B, N, E]
        emb = emb.reshape(b, -1)  # [B, N * E]
        if self.agent_embedding is not None:
            emb = torch.cat([emb, self.agent_embedding(agent_index.long())], dim=-1)
        return self.value_head(emb).squeeze(-1)

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.VF_PREDS: self.value(batch[JOINT_OBS], batch[AGENT_INDEX])}


class Planner(TorchRLModule, ValueFunctionAPI):
    """The acting policy: perceiver embedding (+ agent-id embedding) -> action distribution.

    model_config: n_agents, embedding_dim, hidden, agent_embedding_dim (0 = no agent id, used
    by per-agent planners), free_log_std (continuous actions: state-independent log std).
    """

    def setup(self) -> None:
        super().setup()
        cfg = self.model_config
        agent_dim = int(cfg["agent_embedding_dim"])
        self.agent_embedding = nn.Embedding(int(cfg["n_agents"]), agent_dim) if agent_dim else None
        n_in = int(cfg["embedding_dim"]) + agent_dim
        if hasattr(self.action_space, "n"):
            self.continuous = False
            self.pi = mlp([n_in, *cfg["hidden"], int(self.action_space.n)], out_gain=0.01)
        else:
            self.continuous = True
            act_dim = int(self.action_space.shape[0])
            self.pi = mlp([n_in, *cfg["hidden"], act_dim], out_gain=0.01)
            self.log_std = nn.Parameter(
                torch.full((act_dim,), float(cfg.get("initial_log_std", -0.5)))
            )
        self._roles: tuple[Perceiver, Reflector] | tuple = ()  # wired by TeamModule.setup

    def wire(self, perceiver: Perceiver, reflector: Reflector) -> None:
        self._roles = (perceiver, reflector)

    def _features(
        self, batch: dict[str, Any], embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Perceiver embedding [B, E] (+ agent embedding [B, A]) -> features [B, E + A]."""
        emb = embeddings if embeddings is not None else self._roles[0].encode(batch[Columns.OBS])
        if self.agent_embedding is not None:
            emb = torch.cat([emb, self.agent_embedding(batch[AGENT_INDEX].long())], dim=-1)
        return emb

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        emb = batch.get(ENCODER_OUT)
        out = self.pi(self._features(batch, emb))
        if self.continuous:  # [B, act] mean -> [B, 2 * act] (mean, log_std)
            out = torch.cat([out, self.log_std.expand_as(out)], dim=-1)
        return {Columns.ACTION_DIST_INPUTS: out}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        """Value from the reflector over the joint observation (centralised critic)."""
        if JOINT_OBS not in batch:
            raise KeyError(
                f"batch has no `{JOINT_OBS}` column: add moedream.policies.connectors."
                "AddJointObservation to the learner connector (build_algo_config does)"
            )
        return self._roles[1].value(batch[JOINT_OBS], batch[AGENT_INDEX])


class TeamModule(MultiRLModule):
    """perceiver + reflector + planner(s): wires the planners to the shared roles.

    The default MultiRLModule forward runs each planner on its own batch; each planner
    encodes through the shared perceiver, so one backward pass trains perceiver, planner and
    reflector together.
    """

    def setup(self) -> None:
        super().setup()
        missing = {PERCEIVER, REFLECTOR} - set(self._rl_modules)
        if missing:
            raise ValueError(f"TeamModule needs modules {sorted(missing)} in its MultiRLModuleSpec")
        perceiver, reflector = self._rl_modules[PERCEIVER], self._rl_modules[REFLECTOR]
        reflector.wire(perceiver)
        for module_id in self.planner_ids():
            self._rl_modules[module_id].wire(perceiver, reflector)

    def planner_ids(self) -> list[str]:
        return [m for m in self._rl_modules if m not in (PERCEIVER, REFLECTOR)]


def team_module_spec(
    spec: Any,
    *,
    embedding_dim: int = 128,
    perceiver_hidden: list[int] | tuple[int, ...] = (128,),
    planner_hidden: list[int] | tuple[int, ...] = (128,),
    reflector_hidden: list[int] | tuple[int, ...] = (128,),
    agent_embedding_dim: int = 8,
    shared_planner: bool = True,
    obs_norm: bool = False,
    obs_norm_clip: float = 10.0,
):
    """The MultiRLModuleSpec of a team for env ``spec`` (a moedream EnvSpec).

    ``obs_norm``: the perceiver standardises observations with running statistics, clipped to
    [-obs_norm_clip, obs_norm_clip] (``learner_pieces(obs_norm=True)`` in
    :mod:`moedream.policies.connectors` adds the piece that updates its statistics).
    """
    import gymnasium as gym
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    def obs_space(i: int) -> gym.spaces.Box:
        return gym.spaces.Box(-np.inf, np.inf, shape=(spec.obs_dims[i],), dtype=np.float32)

    def act_space(i: int) -> gym.Space:
        if spec.action_kind == "discrete":
            return gym.spaces.Discrete(spec.action_dims[i])
        return gym.spaces.Box(-1.0, 1.0, shape=(spec.action_dims[i],), dtype=np.float32)

    common = {"n_agents": spec.n_agents, "obs_dim": spec.obs_dim, "embedding_dim": embedding_dim}
    padded = gym.spaces.Box(-np.inf, np.inf, shape=(spec.obs_dim,), dtype=np.float32)
    specs = {
        PERCEIVER: RLModuleSpec(
            module_class=Perceiver,
            observation_space=padded,
            action_space=act_space(0),
            model_config={
                **common,
                "hidden": list(perceiver_hidden),
                "obs_norm": bool(obs_norm),
                "obs_norm_clip": float(obs_norm_clip),
            },
        ),
        REFLECTOR: RLModuleSpec(
            module_class=Reflector,
            observation_space=padded,
            action_space=act_space(0),
            model_config={
                **common,
                "hidden": list(reflector_hidden),
                "agent_embedding_dim": agent_embedding_dim,
                "obs_dims": [int(d) for d in spec.obs_dims],
            },
        ),
    }
    planner_cfg = {
        **common,
        "hidden": list(planner_hidden),
        "agent_embedding_dim": agent_embedding_dim if shared_planner else 0,
    }
    for i, agent in enumerate(spec.agent_ids):
        mid = planner_id(agent, shared_planner)
        if mid not in specs:
            specs[mid] = RLModuleSpec(
                module_class=Planner,
                observation_space=obs_space(i),
                action_space=act_space(i),
                model_config=planner_cfg,
            )
    return MultiRLModuleSpec(multi_rl_module_class=TeamModule, rl_module_specs=specs)
