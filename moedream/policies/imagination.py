"""Imagined rollouts as RLlib episodes, and the interface an imagination provider implements.

A provider (the Serve world model + coherence gate in production) implements
:class:`ImaginationProvider`: ``imagine(start_obs [B, N, D], policy) -> Trajectories`` with the
current planner choosing the actions, and ``gate(trajs) -> GateDecision`` (or a keep mask).
:func:`build_imagined_episodes` turns the kept trajectories into ``MultiAgentEpisode``s that
look exactly like sampled ones to PPO's learner: the same extra model outputs
(``action_logp``, ``action_dist_inputs``, ``weights_seq_no``), log-probs under the current
planner, ids starting with ``imagined-`` (so the learner connector can count them).

:class:`EnvReplayImaginer` is NOT a world model: it produces its "imagined" rollouts by
stepping its own copies of the REAL env with the current planner (real data, which makes it a
legitimate stand-in to test the whole path end to end). Its steps are real env steps; the
sample-efficiency benchmark counts them as such.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.env.multi_agent_episode import MultiAgentEpisode
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from moedream.coherence.kernel import td_residuals as kernel_td_residuals
from moedream.envs import episode_limit, make_env
from moedream.envs.spec import EnvSpec
from moedream.policies.episode_ends import restore_truncation
from moedream.policies.names import AGENT_INDEX, IMAGINED_PREFIX, REFLECTOR, planner_id
from moedream.world_model.trajectory import Trajectories


@dataclasses.dataclass
class GateDecision:
    """Which trajectories to learn from, and the gate's verdict counts."""

    keep: np.ndarray  # [B] bool
    approved: int
    refined: int
    rejected: int
    trajectories: Trajectories | None = None
    """The judged batch with refined rows re-imagined (None: the batch as given)."""

    @classmethod
    def from_result(cls, result: GateDecision | np.ndarray) -> GateDecision:
        """Accept a GateDecision or a bare keep mask (kept = approved, dropped = rejected)."""
        if isinstance(result, GateDecision):
            return result
        keep = np.asarray(result, dtype=bool).reshape(-1)
        return cls(keep=keep, approved=int(keep.sum()), refined=0, rejected=int((~keep).sum()))


class ProviderFailure(RuntimeError):
    """A provider call failed for good (its remote retries exhausted): MBMAPPO goes on without
    it. ``stage`` is the provider method ("imagine", "gate", "evaluate", "observe",
    "retrain"); ``cause`` the failure's short name (e.g. "ActorDiedError"). A failed
    ``imagine`` or ``gate`` skips the iteration's remaining imagination rounds, any other stage
    only itself; MBMAPPO logs it and counts it (``provider_failures_<stage>_total``,
    ``imagination_skipped_total``)."""

    def __init__(self, stage: str, cause: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage, self.cause = stage, cause


class ImaginationProvider(Protocol):
    """What MBMAPPO needs from imagination (world model + gate).

    Optional hooks MBMAPPO calls when present: ``observe(episodes)`` (every iteration, the
    real episodes, e.g. for the episode store), ``retrain(iteration)`` (on the
    ``world_model_retrain_every`` schedule, e.g. train + Serve ``reconfigure``),
    ``swap_retrained()`` (every iteration, first: serve what a background retrain made),
    ``close()`` (on ``stop``),
    ``metrics() -> dict[str, float]`` (logged as ``moedream/provider_<key>``, e.g. the world-model loss),
    ``get_state()``/``set_state(state)`` (saved in algorithm checkpoints, e.g. the checkpoint
    reference and the gate calibration). A call that fails for good raises
    :class:`ProviderFailure`.
    """

    def imagine(self, start_obs: np.ndarray, policy: TeamPolicy) -> Trajectories:
        """start_obs [B, N, D] -> trajectories of the configured horizon, actions from policy."""

    def gate(self, trajectories: Trajectories) -> GateDecision | np.ndarray:
        """Verdicts on the trajectories: a GateDecision or a [B] bool keep mask."""


def penalise_uncertainty(trajs: Trajectories, lam: float) -> tuple[Trajectories, float]:
    """MOPO's pessimism: reward [B, H, N] - lam * uncertainty [B, H] for every agent.

    Returns the penalised trajectories and the mean penalty per step (0.0 when lam is 0, the
    batch is empty, or the provider gives no uncertainty, e.g. real env replay).
    """
    if lam <= 0 or not trajs.batch_size or trajs.uncertainty is None:
        return trajs, 0.0
    penalty = float(lam) * np.nan_to_num(trajs.uncertainty, nan=0.0)[..., None]  # [B, H, 1]
    reward = (trajs.reward - penalty).astype(trajs.reward.dtype)
    return dataclasses.replace(trajs, reward=reward), float(np.mean(penalty))


class TeamPolicy:
    """The planners of a team module as a batched policy over stacked observations.

    Calls each agent's planner with its exploration forward pass (as the env runners do).
    """

    def __init__(self, module: Any, spec: EnvSpec, shared_planner: bool):
        self.module, self.spec, self.shared = module, spec, shared_planner

    def _device(self) -> torch.device:
        params = list(self.module.parameters()) if hasattr(self.module, "parameters") else []
        return params[0].device if params else torch.device("cpu")

    @torch.no_grad()
    def dist_inputs(self, obs: np.ndarray) -> list[torch.Tensor]:
        """obs [M, N, D] -> per agent i, action dist inputs [M, K]."""
        device = self._device()
        out = []
        for i, agent in enumerate(self.spec.agent_ids):
            planner = self.module[planner_id(agent, self.shared)]
            batch = {
                Columns.OBS: torch.as_tensor(obs[:, i, : self.spec.obs_dims[i]], device=device),
                AGENT_INDEX: torch.full((obs.shape[0],), i, dtype=torch.int64, device=device),
            }
            out.append(planner.forward_exploration(batch)[Columns.ACTION_DIST_INPUTS])
        return out

    def distributions(self, obs: np.ndarray) -> list[Any]:
        """obs [M, N, D] -> per agent, the exploration action distribution over M rows."""
        dists = []
        for i, inputs in enumerate(self.dist_inputs(obs)):
            planner = self.module[planner_id(self.spec.agent_ids[i], self.shared)]
            dists.append(planner.get_exploration_action_dist_cls().from_logits(inputs))
        return dists

    @torch.no_grad()
    def values(self, obs: np.ndarray) -> np.ndarray:
        """obs [M, N, D] -> the reflector's team value [M] float64: the mean over agents i of
        its centralised V(joint obs, i)."""
        device, m = self._device(), obs.shape[0]
        reflector = self.module[REFLECTOR]
        joint = torch.as_tensor(obs.reshape(m, -1), dtype=torch.float32, device=device)
        per_agent = [
            reflector.value(joint, torch.full((m,), i, dtype=torch.int64, device=device))
            for i in range(self.spec.n_agents)
        ]  # each [M]
        return torch.stack(per_agent, 1).mean(1).double().cpu().numpy()

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """obs [M, N, D] -> sampled raw actions [M, N] int64 or [M, N, A] float32."""
        samples = [d.sample().cpu().numpy() for d in self.distributions(obs)]
        if self.spec.action_kind == "discrete":
            return np.stack(samples, axis=1).astype(np.int64)
        out = np.zeros((obs.shape[0], self.spec.n_agents, self.spec.action_dim), dtype=np.float32)
        for i, s in enumerate(samples):
            out[:, i, : s.shape[-1]] = s
        return out


def td_residuals(
    policy: TeamPolicy, obs: np.ndarray, reward: np.ndarray, terminated: np.ndarray, gamma: float
) -> np.ndarray:
    """The reflector's one-step TD residuals δ [B, T] (coherence.kernel.td_residuals) of obs
    [B, T+1, N, D], reward [B, T, N], terminated [B, T, N] with V = :meth:`TeamPolicy.values`."""
    b, t1, n, d = obs.shape
    value = policy.values(np.asarray(obs, np.float32).reshape(b * t1, n, d)).reshape(b, t1)
    return kernel_td_residuals(value, reward, terminated, gamma)


def real_td_residuals(
    policy: TeamPolicy, episodes: list, spec: EnvSpec, gamma: float
) -> np.ndarray:
    """:func:`td_residuals` of every step of real RLlib episodes (or chunks), concatenated."""
    from moedream.platform.retrain import episode_from_rllib

    out = []
    for episode in episodes:
        ep = episode_from_rllib(episode, spec)
        if ep.length:
            out.append(td_residuals(policy, ep.obs[None], ep.reward[None],
                                    ep.terminated[None], gamma)[0])  # fmt: skip
    return np.concatenate(out) if out else np.zeros(0)


def decode_actions(encoded: np.ndarray, spec: EnvSpec) -> np.ndarray:
    """Encoded actions [..., N, A] -> indices [..., N] (discrete) or vectors (continuous)."""
    if spec.action_kind == "discrete":
        return np.asarray(encoded).argmax(axis=-1).astype(np.int64)
    return np.asarray(encoded, dtype=np.float32)


def build_imagined_episodes(
    trajectories: Trajectories,
    module: Any,
    spec: EnvSpec,
    *,
    shared_planner: bool = True,
    weights_seq_no: int = 0,
    obs_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    termination_threshold: float = 0.5,
    bootstrap_truncated: bool = True,
) -> list[MultiAgentEpisode]:
    """Trajectories (B of horizon H) -> B numpy MultiAgentEpisodes for PPO's learner.

    Log-probs and dist inputs of the imagined actions come from ``module``'s planners (the
    current policy). ``obs_transform`` applies the env-to-module preprocessing the real
    episodes got (e.g. an observation filter): [..., D] -> [..., D]. An episode ends
    terminated at the first step where any agent's predicted termination reaches
    ``termination_threshold``, else it is cut at its length (H, or the coherent prefix the gate
    kept: ``trajectories.length``). A cut episode is truncated and NOT terminated, for the team
    and every agent, so PPO's GAE bootstraps from the reflector's value of the last imagined
    state (moedream.policies.episode_ends.restore_truncation); ``bootstrap_truncated=False``
    leaves it terminated, as RLlib marks it (no bootstrap: the cut reads as the end of the
    episode).
    """
    obs = np.asarray(trajectories.obs, dtype=np.float32)  # [B, H + 1, N, D]
    if obs_transform is not None:
        obs = obs_transform(obs)
    b, h = trajectories.batch_size, trajectories.horizon
    actions = decode_actions(trajectories.action, spec)  # [B, H, N] or [B, H, N, A]
    policy = TeamPolicy(module, spec, shared_planner)
    flat_obs = obs[:, :h].reshape(b * h, spec.n_agents, spec.obs_dim)  # [B * H, N, D]
    flat_act = actions.reshape(b * h, spec.n_agents, *actions.shape[3:])
    inputs, logps = _inputs_and_logp(policy, flat_obs, flat_act)  # per agent [B*H, K], [B*H]
    spaces = _episode_spaces(spec)  # built once: a gym space per episode cost as much as a step
    return [
        _episode(
            obs[i],
            actions[i],
            trajectories,
            i,
            inputs,
            logps,
            spec,
            spaces,
            shared_planner,
            weights_seq_no,
            termination_threshold,
            bootstrap_truncated,
        )
        for i in range(b)
    ]


def _episode_spaces(spec: EnvSpec) -> tuple[gym.spaces.Dict, gym.spaces.Dict]:
    """The per-agent observation and action spaces of an imagined episode."""
    agents = spec.agent_ids
    return (
        gym.spaces.Dict({a: _box(spec.obs_dims[i]) for i, a in enumerate(agents)}),
        gym.spaces.Dict({a: _action_space(spec, i) for i, a in enumerate(agents)}),
    )


def _inputs_and_logp(policy: TeamPolicy, obs: np.ndarray, actions: np.ndarray):
    """Per agent: dist inputs [M, K] and log-prob [M] of ``actions`` under the policy."""
    inputs, logps = [], []
    with torch.no_grad():
        for i, dist in enumerate(policy.distributions(obs)):
            a = (
                actions[:, i]
                if policy.spec.action_kind == "discrete"
                else actions[:, i, : policy.spec.action_dims[i]]
            )
            logps.append(dist.logp(torch.as_tensor(a, device=policy._device())).cpu().numpy())
        inputs = [x.cpu().numpy() for x in policy.dist_inputs(obs)]
    return inputs, logps


def _episode(
    obs, actions, trajs, b, inputs, logps, spec, spaces, shared, seq_no, threshold, bootstrap
) -> MultiAgentEpisode:
    """One imagined trajectory (obs [H + 1, N, D], actions [H, N, ...]) -> MultiAgentEpisode
    of its first ``length`` steps."""
    h = trajs.horizon  # rows of the flat [B * H] inputs and log-probs
    steps = int(trajs.lengths()[b])
    agents = spec.agent_ids
    episode = MultiAgentEpisode(
        id_=f"{IMAGINED_PREFIX}{uuid.uuid4().hex}",
        observation_space=spaces[0],
        action_space=spaces[1],
        agent_to_module_mapping_fn=lambda agent_id, ep, _s=shared: planner_id(agent_id, _s),
    )
    episode.add_env_reset(observations=_per_agent_obs(obs[0], spec))
    for t in range(steps):
        terminated = bool(np.max(trajs.terminated[b, t]) >= threshold)
        truncated = (t == steps - 1) and not terminated  # RLlib terminates it too: see below
        row = b * h + t
        episode.add_env_step(
            observations=_per_agent_obs(obs[t + 1], spec),
            actions={a: _agent_action(actions[t], i, spec) for i, a in enumerate(agents)},
            rewards={a: float(trajs.reward[b, t, i]) for i, a in enumerate(agents)},
            terminateds={**{a: terminated for a in agents}, "__all__": terminated},
            truncateds={**{a: truncated for a in agents}, "__all__": truncated},
            extra_model_outputs={
                a: {
                    Columns.ACTION_DIST_INPUTS: inputs[i][row],
                    Columns.ACTION_LOGP: np.float32(logps[i][row]),
                    WEIGHTS_SEQ_NO: seq_no,
                }
                for i, a in enumerate(agents)
            },
        )
        if terminated:
            break
    if bootstrap:
        restore_truncation(episode)
    episode.validate()
    return episode.to_numpy()


def _per_agent_obs(obs: np.ndarray, spec: EnvSpec) -> dict[str, np.ndarray]:
    return {a: obs[i, : spec.obs_dims[i]].copy() for i, a in enumerate(spec.agent_ids)}


def _agent_action(actions_t: np.ndarray, i: int, spec: EnvSpec) -> Any:
    if spec.action_kind == "discrete":
        return np.int64(actions_t[i])
    return actions_t[i, : spec.action_dims[i]].astype(np.float32)


def _box(dim: int) -> gym.spaces.Box:
    return gym.spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)


def _action_space(spec: EnvSpec, i: int) -> gym.Space:
    if spec.action_kind == "discrete":
        return gym.spaces.Discrete(spec.action_dims[i])
    return gym.spaces.Box(-1.0, 1.0, shape=(spec.action_dims[i],), dtype=np.float32)


def sample_start_obs(
    episodes: list[MultiAgentEpisode], spec: EnvSpec, n: int, rng: np.random.Generator
) -> np.ndarray:
    """n observations of real states, drawn uniformly from the episodes -> [n, N, D]."""
    candidates = [(e, len(e.agent_episodes[spec.agent_ids[0]])) for e in episodes]
    candidates = [(e, length) for e, length in candidates if length > 0]
    if not candidates:
        raise ValueError("no real episode has steps to branch imagination from")
    lengths = np.array([length for _, length in candidates], dtype=np.float64)
    picks = rng.choice(len(candidates), size=n, p=lengths / lengths.sum())
    out = np.zeros((n, spec.n_agents, spec.obs_dim), dtype=np.float32)
    for row, k in enumerate(picks):
        episode, length = candidates[k]
        t = int(rng.integers(0, length))
        out[row] = spec.stack_obs(
            {a: episode.agent_episodes[a].get_observations(t) for a in spec.agent_ids}
        )
    return out


class EnvReplayImaginer:
    """Imagination stand-in that steps copies of the REAL env (not a world model).

    It keeps ``B`` env copies that advance along real episodes under the current planner and
    returns H-step branches of them, so ``start_obs`` only sets how many branches to return
    (real states cannot be restored from observations). All its steps are real env steps,
    counted in ``env_steps_taken``. The gate approves every finite trajectory.
    """

    def __init__(
        self,
        env_name: str,
        env_options: dict[str, Any] | None = None,
        *,
        horizon: int = 10,
        seed: int = 0,
    ):
        self.env_name, self.env_options = env_name, dict(env_options or {})
        self.horizon = int(horizon)
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.env_steps_taken = 0
        self._envs: list[Any] = []
        self._obs: list[dict | None] = []
        self._t: list[int] = []
        self._spec: EnvSpec | None = None
        self.episode_limit = episode_limit(env_name, **self.env_options) or 10**9

    def imagine(self, start_obs: np.ndarray, policy: TeamPolicy) -> Trajectories:
        b, h, spec = start_obs.shape[0], self.horizon, policy.spec
        self._ensure_envs(b)
        obs = np.zeros((b, h + 1, spec.n_agents, spec.obs_dim), dtype=np.float32)
        reward = np.zeros((b, h, spec.n_agents), dtype=np.float32)
        terminated = np.zeros((b, h, spec.n_agents), dtype=np.float32)
        encoded = np.zeros((b, h, spec.n_agents, _encoded_size(spec)), dtype=np.float32)
        alive = np.ones(b, dtype=bool)
        for i in range(b):
            if self._obs[i] is None or self._t[i] + h > self.episode_limit:
                self._reset(i)
            obs[i, 0] = spec.stack_obs(self._obs[i])
        for t in range(h):
            actions = policy.act(obs[:, t])  # [B, N] or [B, N, A]
            encoded[:, t] = spec.encode_actions(actions)
            for i in range(b):
                if alive[i]:
                    alive[i] = self._step(i, actions[i], t, obs, reward, terminated, spec)
                else:  # after a true termination: repeat the last obs, terminated, no reward
                    obs[i, t + 1], terminated[i, t] = obs[i, t], 1.0
        return Trajectories(obs=obs, action=encoded, reward=reward, terminated=terminated)

    def gate(self, trajectories: Trajectories) -> GateDecision:
        finite = np.isfinite(trajectories.obs).all(axis=(1, 2, 3)) & np.isfinite(
            trajectories.reward
        ).all(axis=(1, 2))
        return GateDecision.from_result(finite)

    def get_state(self) -> dict[str, Any]:
        return {"env_steps_taken": self.env_steps_taken}

    def set_state(self, state: dict[str, Any]) -> None:
        self.env_steps_taken = int(state.get("env_steps_taken", 0))

    def _ensure_envs(self, b: int) -> None:
        while len(self._envs) < b:
            self._envs.append(make_env(self.env_name, **self.env_options))
            self._obs.append(None)
            self._t.append(0)

    def _reset(self, i: int) -> None:
        obs, _ = self._envs[i].reset(seed=int(self.rng.integers(2**31)))
        self._obs[i], self._t[i] = obs, 0

    def _step(self, i, actions, t, obs, reward, terminated, spec) -> bool:
        """Step env i with its joint action; fill row t; return whether it is still alive."""
        env_actions = spec.unstack_actions(actions)
        if spec.action_kind == "continuous":
            env_actions = {a: np.clip(v, -1.0, 1.0) for a, v in env_actions.items()}
        next_obs, rew, term, trunc, _ = self._envs[i].step(env_actions)
        self.env_steps_taken += 1
        self._t[i] += 1
        obs[i, t + 1] = spec.stack_obs(next_obs)
        reward[i, t] = [float(rew[a]) for a in spec.agent_ids]
        done_term = any(bool(term[a]) for a in spec.agent_ids)
        terminated[i, t] = 1.0 if done_term else 0.0
        self._obs[i] = (
            None if (done_term or any(bool(trunc[a]) for a in spec.agent_ids)) else next_obs
        )
        return not done_term


def _encoded_size(spec: EnvSpec) -> int:
    return spec.action_dim


@dataclasses.dataclass
class EnvReplayImaginerFactory:
    """Picklable factory, so the provider can be built inside the algorithm (Tune trials)."""

    env_name: str
    env_options: dict[str, Any]

    def __call__(self, config: Any) -> EnvReplayImaginer:
        """Build from the algorithm config (its ``imagination.horizon`` and ``seed``)."""
        return EnvReplayImaginer(
            self.env_name,
            self.env_options,
            horizon=config.imagination.horizon,
            seed=config.seed or 0,
        )
