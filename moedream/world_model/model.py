"""The world model: MoE transformer backbone + RSSM latent + diffusion head + reward,
termination and ensemble heads.

Shape legend: (B)atch, (T)ime steps of a training window, (H)orizon, (N) agents,
(D) padded observation size, (A) encoded action size, (d) model width, (F) per-agent
conditioning features = d + rssm.deter + rssm.latent_dim, (C) diffusion condition size,
(K) ensemble members, (L) MoE layers, (E) experts.

One transition (o_t, a_t) -> o_{t+1}, r_t, term_t:

    f_{t,i}       = Backbone(o_{<=t}, a_{<=t})_{t,i}                  [B, N, d]
    h_t, z_t      = RSSM(h_{t-1}, z_{t-1}, a_{t-1}; e_t = [f_{t,1..N}])
    c_{t,i}       = [f_{t,i}, h_t, z_t]                                [B, N, F]
    cond_t        = LN(W [c_{t,1}, ..., c_{t,N}])                      [B, C]
    x_0           = normalised o_{t+1} - o_t (all agents jointly)     [B, N*D]
    x_0 ~ Diffusion(. | cond_t)   (around a regression mean m(cond_t) if
                                   diffusion_target == "residual", CorrDiff-style; divided
                                   by a predicted scale for "scaled_residual")
    r_{t,i}       = RewardHead(c_{t,i}),  term_{t,i} = TerminationHead(c_{t,i})
    sigma_t       = std over K ensemble members of [delta, r] predictions

The backbone's tokens come from a tokenizer chosen by ``tokenizer`` (tokenizers.py: one token
per agent-step, or Overcooked grid cells + agent-state + action tokens); f_{t,i} is the output
of agent i's summary token. With ``obs_head: discrete`` the features that take few values are
predicted by a categorical head over each feature's observed values (discrete_head.py), from
the observation tokens' outputs; the rest keep the diffusion sample above.

Observations are normalised with statistics kept as buffers (fitted from data with
``fit_normalization``, or from the first training batch), so the model works on any scale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moedream.config import (
    ConfigBase,
    ConfigError,
    check,
    check_choice,
    check_positive,
    check_positive_ints,
)
from moedream.envs.spec import EnvSpec
from moedream.world_model.backbone import Backbone, BackboneConfig
from moedream.world_model.diffusion import (
    Denoiser,
    DiffusionConfig,
    DiffusionSampler,
    SamplerConfig,
    check_compatible,
)
from moedream.world_model.diffusion.sampler import PredictFn
from moedream.world_model.discrete_head import DiscreteObsHead, nearest_index, value_vocabulary
from moedream.world_model.heads import (
    AgentScalarHead,
    Ensemble,
    HeadsConfig,
    member_std,
    mlp,
)
from moedream.world_model.moe import MoEConfig, MoEStats
from moedream.world_model.rssm import RSSM, RSSMConfig, balanced_kl
from moedream.world_model.safetensors_file import (
    CheckpointError,
    read_checkpoint,
    write_checkpoint,
)
from moedream.world_model.tokenizers import TOKENIZER_KINDS, TokenizerKind, tokenizer_for
from moedream.world_model.trajectory import WINDOW_KEYS, Trajectories

FORMAT = "moedream.world_model"
FORMAT_VERSION = "4"  # 2: support bounds (obs_low/obs_high); 3: obs/action skip into heads;
# 4: the backbone's token embeddings live in backbone.tokenizer (version 3 is read, renamed)
READABLE_VERSIONS = ("3", FORMAT_VERSION)
DiscreteLoss = Literal["cross_entropy", "change_weighted", "expected_error"]
DISCRETE_LOSSES = ("cross_entropy", "change_weighted", "expected_error")
REWARD_PREDICTIONS = ("mean", "nearest_value")
RENAMED_IN_4 = {"backbone.obs_embed.": "backbone.tokenizer.obs_embed.",
                "backbone.action_embed.": "backbone.tokenizer.action_embed."}  # fmt: skip
WEIGHTS_FILE = "world_model.safetensors"


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LossWeights(ConfigBase):
    diffusion: float = 1.0
    mean: float = 1.0
    """Regression of the next-observation mean (the residual diffusion's centre)."""
    scale: float = 1.0
    """Gaussian NLL of the predicted residual scale (diffusion_target 'scaled_residual')."""
    reward: float = 1.0
    termination: float = 1.0
    kl: float = 1.0
    moe: float = 1.0
    """Multiplies the MoE layers' aux losses (already weighted by moe.balance_loss_weight and
    moe.z_loss_weight)."""
    ensemble: float = 1.0
    discrete: float = 1.0
    """Cross-entropy of the discrete next-observation head (obs_head 'discrete')."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        for f in dataclasses.fields(self):
            check_positive(f"{prefix}{f.name}", getattr(self, f.name), allow_zero=True)


def _default_moe() -> MoEConfig:
    return MoEConfig(d_model=64, d_hidden=128, num_experts=4, top_k=2)


def _default_diffusion() -> DiffusionConfig:
    return DiffusionConfig(hidden=128, layers=2)


@dataclasses.dataclass
class WorldModelConfig(ConfigBase):
    d_model: int = 64
    """Transformer width, shared with moe.d_model (wired here; do not set moe.d_model)."""
    cond_dim: int = 128
    """Size of the joint condition the diffusion head and ensemble receive."""
    diffusion_target: Literal["delta", "residual", "scaled_residual"] = "scaled_residual"
    """delta: diffuse the normalised o_{t+1} - o_t; residual: diffuse it minus a regressed mean;
    scaled_residual: diffuse that residual divided by a predicted per-feature, per-state scale,
    so that the sample's spread follows the model's own confidence (a transition the model
    knows well gets a sample near its mean; with plain residuals every feature gets the
    denoiser's imperfection at the data-wide scale)."""
    residual_std_floor: float = 0.05
    """Lower bound of the predicted residual scale (normalised units): bounds the diffusion
    target when the scale head is over-confident."""
    norm_std_floor: float = 1e-3
    """Features whose std is below this are constant in the fitted data: observations and
    rewards then keep their raw scale (std 1), delta stds are floored at it. A floor of 1e-3
    for a constant observation (a pot that never cooked in random data) made its first real
    value 1000 standard deviations away, and a reward-free random collection made every later
    reward a 1000-sigma target."""
    delta_std_floor_ratio: float = 0.5
    """Lower bound of each feature's delta std as a fraction of the mean delta std over
    features: rarely changing features (std near 0) would otherwise get huge normalised
    targets that dominate the loss."""
    tokenizer: TokenizerKind = "flat"
    """How an agent-step becomes tokens (tokenizers.py): flat (one token), grid (Overcooked
    grid cells + agent-state + action tokens) or auto (chosen by the env spec)."""
    obs_head: Literal["diffusion", "discrete"] = "diffusion"
    """diffusion: every next-observation feature from the diffusion head; discrete: features
    with at most ``discrete_values`` distinct values in the fitted data (one-hots, counts,
    grid positions) from a categorical head (discrete_head.py), the others from diffusion."""
    discrete_values: int = 24
    """Vocabulary size per feature of the discrete head."""
    discrete_target: Literal["value", "delta"] = "value"
    """What the discrete head's classes are: value: the feature's next value; delta: its
    change o_{t+1} - o_t (a countdown's tick is then one class, -1, at every count, where
    the value classes need a different target for each count)."""
    discrete_loss: DiscreteLoss = "cross_entropy"
    """The discrete head's loss per feature. cross_entropy: every feature's next class counts
    alike, so a missed jump (a countdown starting: 0 -> 19) costs like a missed one-cell move,
    where its squared error is hundreds of times larger. change_weighted: the cross-entropy
    weighted by 1 + (the feature's real change)^2, the squared error of predicting "no
    change". expected_error: the cross-entropy plus the expected squared error (raw units) of
    a value drawn from the head, which also charges a predicted jump where none happens."""
    reward_prediction: Literal["mean", "nearest_value"] = "mean"
    """mean: the reward head's regressed expectation; nearest_value: where an agent's reward
    takes at most ``discrete_values`` distinct values in the fitted data (Overcooked: 0 and a
    soup's reward), that expectation snapped to the nearest of them. For two values this is
    the likelier one: the expectation of a sparse reward is a small nonzero value on every step
    without one, an error the absolute error counts on hundreds of steps per event.
    ``predict_windows`` also returns the expectation (reward_mean)."""
    support_margin: float | None = 0.0
    """Imagined observations are clamped to the per-feature [min, max] of the data the
    normalisation was fitted on, widened by this many feature stds (None: no clamp). Sampled
    noise would otherwise leave features that real data never moves (walls, one-hot flags)."""
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    moe: MoEConfig = dataclasses.field(default_factory=_default_moe)
    rssm: RSSMConfig = dataclasses.field(default_factory=RSSMConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=_default_diffusion)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    heads: HeadsConfig = dataclasses.field(default_factory=HeadsConfig)
    loss_weights: LossWeights = dataclasses.field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        # Cross-field wiring, in one place: the MoE layers run at the transformer's width.
        if isinstance(self.moe, MoEConfig) and isinstance(self.d_model, int):
            self.moe.d_model = self.d_model

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, prefix: str = "") -> WorldModelConfig:
        data = dict(data or {})
        moe = data.get("moe") or {}
        d_model = data.get("d_model", cls.d_model)
        if isinstance(moe, dict) and "d_model" in moe and moe["d_model"] != d_model:
            raise ConfigError(
                f"config field `{prefix}moe.d_model` = {moe['d_model']!r} differs from "
                f"`{prefix}d_model` = {d_model!r}: remove moe.d_model, it is set from d_model"
            )
        return super().from_dict(data, prefix=prefix)

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check_positive_ints(self, prefix, ("d_model", "cond_dim", "discrete_values"))
        check_choice(f"{prefix}tokenizer", self.tokenizer, TOKENIZER_KINDS)
        check_choice(f"{prefix}obs_head", self.obs_head, ("diffusion", "discrete"))
        check_choice(f"{prefix}discrete_target", self.discrete_target, ("value", "delta"))
        check_choice(f"{prefix}discrete_loss", self.discrete_loss, DISCRETE_LOSSES)
        check_choice(f"{prefix}reward_prediction", self.reward_prediction, REWARD_PREDICTIONS)
        check(
            self.d_model % self.backbone.num_heads == 0,
            f"{prefix}d_model",
            self.d_model,
            f"must be divisible by backbone.num_heads ({self.backbone.num_heads})",
        )
        check(
            self.moe.d_model == self.d_model,
            f"{prefix}moe.d_model",
            self.moe.d_model,
            f"must equal d_model ({self.d_model}); leave it unset",
        )
        check_positive(f"{prefix}norm_std_floor", self.norm_std_floor)
        check_positive(f"{prefix}residual_std_floor", self.residual_std_floor)
        check_positive(
            f"{prefix}delta_std_floor_ratio", self.delta_std_floor_ratio, allow_zero=True
        )
        try:
            check_compatible(self.diffusion, self.sampler)
        except ConfigError as err:
            raise ConfigError(f"{prefix}diffusion/sampler: {err}") from None


# ---------------------------------------------------------------------------------------------
# Imagination state and policies
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class WorldModelState:
    """Where imagination continues from.

    obs     [B, C, N, D] raw context observations; the last one is the current observation
    action  [B, C - 1, N, A] encoded actions taken between them
    rssm    {"h": [B, H], "z": [B, Z], "a": [B, N*A]}: the latent state before the current step
    step    [B] long: steps observed or imagined before the current observation (its episode
            step when ``observe`` was given the episode from its start); memory experts use it
            to leave out what the short context already holds
    """

    obs: Tensor
    action: Tensor
    rssm: dict[str, Tensor]
    step: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.obs.shape[0])

    @property
    def current_obs(self) -> Tensor:
        return self.obs[:, -1]  # [B, N, D]


Policy = Callable[[Tensor], Any]


class Memory(Protocol):
    """What :meth:`WorldModel.transition` asks of a ``memory`` argument (e.g. the
    ``MemoryExperts.recall`` of moedream.world_model.memory): the predict_fn to sample one
    step's diffusion head with, or None for the model's own denoiser."""

    def predict_fn(
        self, model: WorldModel, state: WorldModelState, action: Tensor, cond: Tensor
    ) -> PredictFn | None:
        """state: where the step starts, action [B, N, A] encoded, cond [B, C] its condition."""
        ...


class ActionPlan:
    """A fixed plan [B, H, N, A] as a policy: the k-th call returns plan[:, k]."""

    def __init__(self, plan: Tensor) -> None:
        self.plan = plan
        self.step = 0

    def __call__(self, obs: Tensor) -> Tensor:
        if self.step >= self.plan.shape[1]:
            raise ValueError(
                f"the action plan has {self.plan.shape[1]} steps, fewer than the horizon; "
                "pass a plan of shape [B, horizon, N, A]"
            )
        action = self.plan[:, self.step]
        self.step += 1
        return action


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class WorldModel(nn.Module):
    """MoE-diffusion world model of one multi-agent env (``spec``)."""

    def __init__(
        self, config: WorldModelConfig, spec: EnvSpec, *, ep_group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        config.validate()
        self.config, self.spec = config, spec
        n, d_obs, d_act = spec.n_agents, spec.obs_dim, spec.action_dim
        tokenizer = tokenizer_for(config.tokenizer, spec, config.d_model)
        self.backbone = Backbone(
            cfg=config.backbone, moe=config.moe, tokenizer=tokenizer, n_agents=n,
            ep_group=ep_group,
        )  # fmt: skip
        self.rssm = RSSM(cfg=config.rssm, embed_dim=n * config.d_model, action_dim=n * d_act)
        # F: backbone features + latent + a skip of the agent's own normalised observation and
        # action (d_model may be narrower than the observation: the heads must see it whole)
        feature_dim = config.d_model + self.rssm.feature_dim + d_obs + d_act
        self.cond_proj = nn.Sequential(
            nn.Linear(n * feature_dim, config.cond_dim), nn.LayerNorm(config.cond_dim)
        )
        self.denoiser = Denoiser(config.diffusion, x_dim=n * d_obs, cond_dim=config.cond_dim)
        self.mean_head = mlp(config.cond_dim, config.heads.hidden, n * d_obs)
        # log of the residual's scale per feature [M, N*D] (only for 'scaled_residual')
        self.scale_head = (
            mlp(config.cond_dim, config.heads.hidden, n * d_obs)
            if config.diffusion_target == "scaled_residual"
            else None
        )
        self.discrete_head = (
            DiscreteObsHead(
                d_model=config.d_model,
                latent_dim=self.rssm.feature_dim,
                obs_dim=d_obs,
                tokens=tokenizer.obs_tokens,
                n_agents=n,
                action_dim=d_act,
                hidden=config.heads.hidden,
                values=config.discrete_values,
            )
            if config.obs_head == "discrete"
            else None
        )
        self.reward_head = AgentScalarHead(feature_dim, config.heads.hidden)
        self.termination_head = AgentScalarHead(feature_dim, config.heads.hidden)
        self.ensemble = Ensemble(
            members=config.heads.ensemble_size,
            d_in=config.cond_dim + n * (d_obs + d_act),
            hidden=config.heads.ensemble_hidden,
            d_out=n * d_obs + n,
            bootstrap=config.heads.bootstrap,
        )
        self._register_normalization(spec)

    # ----------------------------------------------------------------------- normalisation

    def _register_normalization(self, spec: EnvSpec) -> None:
        n, d = spec.n_agents, spec.obs_dim
        mask = torch.zeros(n, d)
        for i, dim in enumerate(spec.obs_dims):
            mask[i, :dim] = 1.0
        self.register_buffer("obs_mask", mask)  # [N, D], 0 on padding
        for name, shape in (("obs", (n, d)), ("delta", (n, d)), ("reward", (n,))):
            self.register_buffer(f"{name}_mean", torch.zeros(shape))
            self.register_buffer(f"{name}_std", torch.ones(shape))
        self.register_buffer("obs_low", torch.full((n, d), -torch.inf))  # [N, D] support
        self.register_buffer("obs_high", torch.full((n, d), torch.inf))
        self.register_buffer("normalization_fitted", torch.zeros((), dtype=torch.bool))
        if self.config.obs_head == "discrete":  # the discrete head's value vocabulary
            size = self.config.discrete_values
            # [N, D, V] the classes of each feature: its values or deltas (discrete_target)
            self.register_buffer("obs_values", torch.zeros(n, d, size))
            # distinct values per feature, V + 1 = continuous (until fitted: all continuous)
            self.register_buffer("obs_value_count", torch.full((n, d), size + 1))
        if self.config.reward_prediction == "nearest_value":
            size = self.config.discrete_values
            self.register_buffer("reward_values", torch.zeros(n, size))  # [N, V] seen rewards
            self.register_buffer("reward_value_count", torch.full((n,), size + 1))  # V+1: many

    @torch.no_grad()
    def fit_normalization(self, windows: dict[str, Any]) -> None:
        """Fit observation, delta and reward statistics from training windows (numpy or torch:
        obs [B, T+1, N, D], reward [B, T, N])."""
        device = self.obs_mean.device
        obs = torch.as_tensor(np.asarray(windows["obs"]), dtype=torch.float32, device=device)
        reward = torch.as_tensor(np.asarray(windows["reward"]), dtype=torch.float32, device=device)
        floor = self.config.norm_std_floor
        flat_obs = obs.flatten(0, 1)  # [B*(T+1), N, D]
        delta = (obs[:, 1:] - obs[:, :-1]).flatten(0, 1)  # [B*T, N, D]
        flat_reward = reward.flatten(0, 1)  # [B*T, N]
        for name, values in (("obs", flat_obs), ("reward", flat_reward)):
            getattr(self, f"{name}_mean").copy_(values.mean(0))
            getattr(self, f"{name}_std").copy_(_std_or_unit(values, floor))
        self.delta_mean.copy_(delta.mean(0))
        self.delta_std.copy_(delta.std(0, correction=0).clamp_min(floor))
        real = self.obs_mask.bool()
        relative_floor = self.config.delta_std_floor_ratio * self.delta_std[real].mean()
        self.delta_std.copy_(self.delta_std.clamp_min(float(relative_floor)))
        self.obs_low.fill_(torch.inf)  # the support of these windows alone
        self.obs_high.fill_(-torch.inf)
        self.widen_support({"obs": obs})
        if self.discrete_head is not None:  # the classes: values or deltas of each feature
            target = flat_obs if self.config.discrete_target == "value" else delta
            vocab, counts = value_vocabulary(target, self.config.discrete_values)
            self.obs_values.copy_(vocab)
            self.obs_value_count.copy_(counts)
        if self.config.reward_prediction == "nearest_value":
            self._fit_reward_values(flat_reward)
        self.normalization_fitted.fill_(True)

    def _fit_reward_values(self, rewards: Tensor) -> None:
        """The distinct rewards per agent of rewards [R, N] (at most ``discrete_values``, else
        the agent's reward counts as continuous and keeps the regressed expectation)."""
        vocab, counts = value_vocabulary(rewards[..., None], self.config.discrete_values)
        self.reward_values.copy_(vocab[:, 0])  # [N, V]
        self.reward_value_count.copy_(counts[:, 0])

    @torch.no_grad()
    def refit_reward_normalization(self, windows: dict[str, Any]) -> None:
        """Refit the reward statistics to ``windows`` (reward [B, T, N]) and rescale the last
        layers of the reward head and of the ensemble's reward outputs so that predictions in
        raw reward units stay the same (PopArt, van Hasselt et al. 2016).

        Statistics fitted on a random policy's rewards are far too narrow for a trained team's
        (a soup delivery is then a 100-sigma target and the reward loss swamps the rest). The
        reward head is shared by all agents, so its rescale uses the agents' mean statistics
        (exact when the team shares one reward, as on Overcooked and MaMuJoCo).
        """
        device = self.reward_mean.device
        reward = torch.as_tensor(np.asarray(windows["reward"]), dtype=torch.float32, device=device)
        flat = reward.flatten(0, 1)  # [B*T, N]
        old_mean, old_std = self.reward_mean.clone(), self.reward_std.clone()  # [N]
        new_mean, new_std = flat.mean(0), _std_or_unit(flat, self.config.norm_std_floor)
        last = self.reward_head.net[-1]  # Linear(hidden, 1), shared over agents
        scale = float((old_std / new_std).mean())
        shift = float(((old_mean - new_mean) / new_std).mean())
        last.weight.mul_(scale)
        last.bias.mul_(scale).add_(shift)
        n = reward.shape[-1]
        out = self.ensemble.layers[-1]  # BatchedLinear [K, hidden, n*D + n]: rewards last
        out.weight[..., -n:].mul_(old_std / new_std)
        out.bias[..., -n:].mul_(old_std / new_std).add_((old_mean - new_mean) / new_std)
        self.reward_mean.copy_(new_mean)
        self.reward_std.copy_(new_std)
        if self.config.reward_prediction == "nearest_value":  # the old values and the new ones
            was_continuous = self.reward_value_count > self.config.discrete_values  # [N]
            self._fit_reward_values(torch.cat([self.reward_values.t(), flat]))
            self.reward_value_count.masked_fill_(was_continuous, self.config.discrete_values + 1)

    @torch.no_grad()
    def widen_support(self, windows: dict[str, Any]) -> None:
        """Grow the imagined-observation bounds to also cover ``windows`` (obs [B, T+1, N, D]).

        The bounds come from the data of the first fit (often a random policy's); a better
        policy's real data reaches states it never showed (a cooking pot, a held soup, a faster
        run), and imagination clamped to the old bounds could never show them. The statistics
        the network was trained with are left as they are."""
        if self.config.support_margin is None:
            self.obs_low.fill_(-torch.inf)
            self.obs_high.fill_(torch.inf)
            return
        device = self.obs_low.device
        obs = torch.as_tensor(windows["obs"], dtype=torch.float32, device=device)  # numpy/torch
        flat_obs = obs.flatten(0, 1)  # [B*(T+1), N, D]
        margin = self.config.support_margin * self.obs_std
        self.obs_low.copy_(torch.minimum(self.obs_low, flat_obs.amin(0) - margin))
        self.obs_high.copy_(torch.maximum(self.obs_high, flat_obs.amax(0) + margin))

    def normalize_obs(self, obs: Tensor) -> Tensor:
        return (obs - self.obs_mean) / self.obs_std  # [..., N, D]

    # ----------------------------------------------------------------------- conditioning

    def _condition(
        self, features: Tensor, h: Tensor, z: Tensor, obs_norm: Tensor, action: Tensor
    ) -> tuple[Tensor, Tensor]:
        """features [..., N, d], h [..., H], z [..., Z], obs_norm [..., N, D] (current step),
        action [..., N, A] -> (per-agent c [..., N, F], joint cond [..., C])."""
        latent = (
            torch.cat([h, z], -1).unsqueeze(-2).expand(*features.shape[:-1], -1)
        )  # [..., N, H+Z]
        per_agent = torch.cat(
            [features.float(), latent.float(), obs_norm.float(), action.float()], -1
        )  # [..., N, F]
        joint = self.cond_proj(per_agent.flatten(-2))  # [..., C]
        return per_agent, joint

    def _ensemble_input(self, cond: Tensor, obs_norm: Tensor, action: Tensor) -> Tensor:
        """[M, C], [M, N, D], [M, N, A] -> [M, C + N*(D+A)]. The condition is detached: the
        ensemble measures uncertainty, it does not shape the backbone."""
        return torch.cat([cond.detach(), obs_norm.flatten(-2), action.flatten(-2)], -1)

    # ----------------------------------------------------------------------- training loss

    def forward(
        self, batch: dict[str, Any], *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Same as :meth:`loss`, so that a DistributedDataParallel wrapper can call it."""
        return self.loss(batch, generator=generator)

    def _encode_windows(
        self, batch: dict[str, Tensor], generator: torch.Generator | None, *, sample: bool = True
    ) -> dict[str, Any]:
        """The teacher-forced pass over windows: every step t sees the real o_{<=t}, a_{<=t}.
        ``sample`` False uses the posterior's mode instead of a sample of z."""
        obs, action = batch["obs"], batch["action"]  # [B, T+1, N, D], [B, T, N, A]
        b, t, n, d = obs.shape[0], action.shape[1], obs.shape[2], obs.shape[3]
        obs_norm = self.normalize_obs(obs[:, :t])  # [B, T, N, D]
        out = self.backbone.encode(obs=obs_norm, action=action)
        features, stats = out.features, out.stats  # [B, T, N, d], per layer
        latent = self.rssm.observe(
            embed=features.flatten(-2),
            action=action.flatten(-2),
            sample=sample,
            generator=generator,
        )  # h [B, T, H], z [B, T, Z]
        per_agent, cond = self._condition(
            features, latent["h"], latent["z"], obs_norm, action
        )  # [B, T, N, F], [B, T, C]
        m = b * t
        discrete = None
        if self.discrete_head is not None:
            discrete = self._discrete_logits(
                out.tokens.reshape(m, n, *out.tokens.shape[3:]),
                torch.cat([latent["h"], latent["z"]], -1).reshape(m, -1),
                obs_norm.reshape(m, n, d),
                action.reshape(m, n, -1),
                obs[:, :t].reshape(m, n, d),
            )  # [M, N, D, V]
        return {
            "latent": latent,
            "stats": stats,
            "discrete_logits": discrete,
            "per_agent": per_agent.reshape(m, n, -1),  # [M, N, F]
            "cond": cond.reshape(m, -1),  # [M, C]
            "ensemble_in": self._ensemble_input(
                cond.reshape(m, -1), obs_norm.reshape(m, n, d), action.reshape(m, n, -1)
            ),  # [M, C + N*(D+A)]
        }

    def loss(
        self, batch: dict[str, Any], *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Training loss on a batch of windows (see trajectory.py) -> (scalar, logs)."""
        batch = self._batch_tensors(batch)
        if not bool(self.normalization_fitted):
            self.fit_normalization(batch)
        obs, t = batch["obs"], batch["action"].shape[1]
        b, n, d = obs.shape[0], obs.shape[2], obs.shape[3]
        enc = self._encode_windows(batch, generator)
        cond, per_agent = enc["cond"], enc["per_agent"]  # [M, C], [M, N, F]
        delta = (obs[:, 1:] - obs[:, :t] - self.delta_mean) / self.delta_std  # [B, T, N, D]
        delta = (delta * self.obs_mask).reshape(b * t, n * d)  # x_0 [M, N*D]
        reward = ((batch["reward"] - self.reward_mean) / self.reward_std).reshape(
            b * t, n
        )  # [M, N]

        terms = {}
        mean = self.mean_head(cond).float()  # [M, N*D]
        terms["mean"] = F.mse_loss(mean, delta)
        x0 = delta - mean.detach() if self.config.diffusion_target != "delta" else delta
        if self.scale_head is not None:
            log_std = self.scale_head(cond).float()  # [M, N*D]
            # Gaussian NLL of the residual under the predicted scale (up to a constant)
            terms["scale"] = (0.5 * x0.pow(2) * torch.exp(-2 * log_std) + log_std).mean()
            x0 = x0 / self._residual_std(log_std).detach()
        terms["diffusion"], diff_logs = self.denoiser.loss(x0, cond, generator=generator)
        if enc["discrete_logits"] is not None:
            terms["discrete"] = self._discrete_loss(
                enc["discrete_logits"],
                obs[:, :t].reshape(b * t, n, d),
                obs[:, 1:].reshape(b * t, n, d),
            )
        terms["reward"] = F.mse_loss(self.reward_head(per_agent), reward)  # [M, N] vs [M, N]
        terms["termination"] = F.binary_cross_entropy_with_logits(
            self.termination_head(per_agent), batch["terminated"].reshape(b * t, n)
        )
        latent = enc["latent"]
        terms["kl"], kl_logs = balanced_kl(latent["post"], latent["prior"], self.config.rssm)
        terms["moe"] = torch.stack([s.aux_loss for s in enc["stats"]]).sum()
        terms["ensemble"] = self.ensemble.loss(enc["ensemble_in"], torch.cat([delta, reward], -1))

        weights = self.config.loss_weights
        total = sum(getattr(weights, k) * v for k, v in terms.items())
        logs = {f"wm/{k}": float(v.detach()) for k, v in terms.items() if k != "moe"}
        logs.update(kl_logs)
        logs.update(diff_logs)
        logs.update(moe_logs(enc["stats"]))
        logs["wm/loss"] = float(total.detach())
        return total, logs

    @torch.no_grad()
    def predict_windows(
        self,
        batch: dict[str, Any],
        *,
        sampler: SamplerConfig | None = None,
        noise_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """One-step predictions at every step of real windows (teacher forcing):
        next_obs [B, T, N, D] (diffusion head; ``noise_scale`` 0 gives its deterministic
        prediction), next_obs_mean [B, T, N, D] (the regressed mean alone),
        reward [B, T, N], terminated [B, T, N] probabilities, and the ensemble's outputs
        (see :meth:`_ensemble_outputs`) [B, T, ...]."""
        batch = self._batch_tensors(batch)
        obs, t = batch["obs"], batch["action"].shape[1]
        b, n, d = obs.shape[0], obs.shape[2], obs.shape[3]
        with self._eval_mode():
            enc = self._encode_windows(batch, generator, sample=False)
            cond, per_agent = enc["cond"], enc["per_agent"]
            x0 = self._sample_delta(
                cond, self._sampler(sampler), noise_scale, generator
            )  # [M, N*D]
            mean = self.mean_head(cond).float()
            ens = self.ensemble(enc["ensemble_in"])  # [K, M, O]
            term = torch.sigmoid(self.termination_head(per_agent))  # [M, N]
            reward_mean = self.reward_head(per_agent) * self.reward_std + self.reward_mean
        current = obs[:, :t]  # [B, T, N, D]
        to_obs = lambda x: (
            (current + x.view(b, t, n, d) * self.delta_std + self.delta_mean) * self.obs_mask
        )  # noqa: E731
        ensemble = self._ensemble_outputs(ens, current.reshape(b * t, n, d))
        next_obs, next_mean = to_obs(x0), to_obs(mean)
        if enc["discrete_logits"] is not None:
            logits = enc["discrete_logits"].view(b, t, n, d, -1)  # [B, T, N, D, V]
            next_obs = self._with_discrete(next_obs, current, logits, noise_scale, generator)
            next_mean = self._with_discrete(next_mean, current, logits, 0.0, None)
        return {
            "next_obs": next_obs,
            "next_obs_mean": next_mean,
            "reward": self._predicted_reward(reward_mean).view(b, t, n),
            "reward_mean": reward_mean.view(b, t, n),
            "terminated": term.view(b, t, n),
            **{k: v.view(b, t, *v.shape[1:]) for k, v in ensemble.items()},
        }

    def _predicted_reward(self, expectation: Tensor) -> Tensor:
        """The reward head's expectation [..., N] in raw units, or with ``reward_prediction``
        nearest_value the nearest reward seen in the fitted data, for agents whose reward
        takes few values."""
        if self.config.reward_prediction == "mean":
            return expectation
        vocab = self.reward_values[:, None]  # [N, 1, V]
        index = nearest_index(expectation[..., None], vocab)  # [..., N, 1]
        nearest = vocab.expand(*index.shape, -1).gather(-1, index[..., None])[..., 0, 0]
        few = self.reward_value_count <= self.config.discrete_values  # [N]
        return torch.where(few, nearest, expectation)

    def _ensemble_outputs(self, ens: Tensor, current: Tensor) -> dict[str, Tensor]:
        """The ensemble's view of one step, in raw units, for the coherence gate: ens
        [K, M, N*D + N] (normalised delta then reward), current obs [M, N, D] ->
        uncertainty [M] (spread in normalised units), obs_std [M, N, D] (std of the next obs
        across members), ensemble_obs [M, N, D] (their mean next obs, clamped to the support
        as imagined obs are), ensemble_reward [M, N] and reward_spread [M, N]."""
        m, n, d = current.shape
        delta = ens[..., : n * d].reshape(-1, m, n, d) * self.delta_std + self.delta_mean
        mean_obs = current + delta.mean(0)  # [M, N, D]
        mean_obs = torch.maximum(torch.minimum(mean_obs, self.obs_high), self.obs_low)
        reward = ens[..., n * d :] * self.reward_std + self.reward_mean  # [K, M, N]
        return {
            "uncertainty": Ensemble.spread(ens),
            "obs_std": member_std(delta) * self.obs_mask,
            "ensemble_obs": mean_obs * self.obs_mask,
            "ensemble_reward": reward.mean(0),
            "reward_spread": member_std(reward),
        }

    def _sample_delta(
        self,
        cond: Tensor,
        sampler: DiffusionSampler,
        noise_scale: float | None,
        generator: torch.Generator | None,
        predict_fn: PredictFn | None = None,
    ) -> Tensor:
        """Normalised next-observation deltas x0 [M, N*D] drawn by the diffusion head, or by
        ``predict_fn`` in its place (e.g. a PoCE composition of memory experts)."""
        x_dim = self.denoiser.x_dim
        scale = sampler.cfg.noise_scale if noise_scale is None else noise_scale
        noise = torch.randn(
            cond.shape[0], x_dim, generator=generator, device=cond.device, dtype=cond.dtype
        )
        x0 = sampler.sample(
            predict_fn or self.denoiser,
            cond,
            x_dim,
            generator=generator,
            noise_scale=scale,
            x_init=scale * noise,
        )  # every scheduler here starts from unit-variance noise
        if self.scale_head is not None:
            x0 = x0 * self._residual_std(self.scale_head(cond).float())
        if self.config.diffusion_target != "delta":
            x0 = x0 + self.mean_head(cond).float()
        return x0

    def _residual_std(self, log_std: Tensor) -> Tensor:
        # exp(log_std) floored (bounds x0 when over-confident) and capped (a finite sample)
        return torch.exp(log_std.clamp(max=4.0)).clamp_min(self.config.residual_std_floor)

    # ----------------------------------------------------------------------- discrete head

    def discrete_features(self) -> Tensor:
        """[N, D] bool: the features the discrete head predicts (at most ``discrete_values``
        distinct values, or deltas, in the fitted data, not padding); none without a discrete
        head."""
        if self.discrete_head is None:
            return torch.zeros_like(self.obs_mask, dtype=torch.bool)
        return (self.obs_value_count <= self.config.discrete_values) & self.obs_mask.bool()

    def _discrete_logits(
        self, tokens: Tensor, latent: Tensor, obs_norm: Tensor, action: Tensor, current: Tensor
    ) -> Tensor:
        """tokens [M, N, S, d] (backbone outputs of one step), latent [M, H+Z], obs_norm and
        raw current obs [M, N, D], action [M, N, A] -> logits [M, N, D, V]."""
        obs_tokens = tokens[:, :, : self.backbone.tokenizer.obs_tokens]  # [M, N, C, d]
        stay = current if self.config.discrete_target == "value" else torch.zeros_like(current)
        index = nearest_index(stay, self.obs_values)  # [M, N, D]: the "no change" class
        return self.discrete_head(obs_tokens, latent, obs_norm, action, index)

    def _discrete_loss(self, logits: Tensor, obs: Tensor, next_obs: Tensor) -> Tensor:
        """Cross-entropy of the next values' (or deltas') indices, summed over an agent's
        discrete features and averaged over rows and agents: logits [M, N, D, V], obs and
        next_obs [M, N, D] raw. Summed, not averaged over features: a step changes a few of hundreds of features
        (a player's two cells), and a per-feature mean divides their signal by the hundreds
        that never change (the head then learnt 'nothing changes' and nothing else)."""
        chosen = self.discrete_features()  # [N, D]
        if not bool(chosen.any()):
            return logits.sum() * 0.0
        value = next_obs if self.config.discrete_target == "value" else next_obs - obs
        target = nearest_index(value, self.obs_values)  # [M, N, D]
        ce = F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none")
        per_feature = ce.view_as(target)  # [M, N, D]
        if self.config.discrete_loss == "change_weighted":
            per_feature = per_feature * (1.0 + (next_obs - obs).pow(2))
        elif self.config.discrete_loss == "expected_error":
            per_feature = per_feature + self._expected_error(logits, obs, next_obs)
        return (per_feature * chosen).sum(-1).mean()

    def _expected_error(self, logits: Tensor, obs: Tensor, next_obs: Tensor) -> Tensor:
        """E_{v ~ softmax(logits)} (next value v - real next value)^2 in raw units, the one-step
        error a draw from the head makes: logits [M, N, D, V], obs and next_obs [M, N, D] raw
        -> [M, N, D]."""
        error = (self._class_values(obs) - next_obs[..., None]).pow(2)  # [M, N, D, V]
        return (torch.softmax(logits.float(), -1) * error).sum(-1)

    def _class_values(self, current: Tensor) -> Tensor:
        """The next value each class of the discrete head stands for, from current [..., N, D]
        raw: [..., N, D, V], clamped to the support as decoded values are."""
        classes = self.obs_values  # [N, D, V] values, or deltas added to the current value
        values = classes if self.config.discrete_target == "value" else current[..., None] + classes
        return torch.maximum(
            torch.minimum(values, self.obs_high[..., None]), self.obs_low[..., None]
        )

    def _decoding_logits(self, logits: Tensor, current: Tensor) -> Tensor:
        """The head's logits [..., N, D, V] as probabilities of the real data: a head trained
        with change_weighted learnt p(c) w_c / Z, so log w_c = log(1 + change_c^2) comes off
        (logit adjustment), or its mode would be the costliest class rather than the likeliest
        (a cook start predicted wherever one is barely possible). current [..., N, D] raw."""
        if self.config.discrete_loss != "change_weighted":
            return logits
        change = self._class_values(current) - current[..., None]  # [..., N, D, V]
        return logits - torch.log1p(change.pow(2))

    def _with_discrete(
        self,
        next_obs: Tensor,
        current: Tensor,
        logits: Tensor,
        noise_scale: float | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        """next_obs [..., N, D] with its discrete features replaced by the head's values
        (current [..., N, D] plus the head's delta with discrete_target 'delta', clamped to
        the data's support like every imagined observation): the mode at
        ``noise_scale`` 0, else a sample at temperature ``noise_scale`` (None: the sampler's
        default, 1)."""
        temperature = 1.0 if noise_scale is None else float(noise_scale)
        logits = self._decoding_logits(logits, current)
        if temperature > 0:
            probs = torch.softmax(logits / temperature, -1)  # [..., N, D, V]
            flat = probs.reshape(-1, probs.shape[-1])
            index = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
        else:
            index = logits.argmax(-1)  # [..., N, D]
        values = self.obs_values.expand(*index.shape, -1).gather(-1, index.unsqueeze(-1))
        values = values.squeeze(-1)  # [..., N, D]
        if self.config.discrete_target == "delta":  # inside the support: a one-hot stays 0/1
            values = torch.maximum(torch.minimum(current + values, self.obs_high), self.obs_low)
        return torch.where(self.discrete_features(), values, next_obs)

    def _batch_tensors(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        missing = [k for k in WINDOW_KEYS if k not in batch]
        if missing:
            raise ValueError(
                f"world-model batch lacks {missing}; a training window has {list(WINDOW_KEYS)}"
            )
        out = {k: self._tensor(batch[k]).float() for k in WINDOW_KEYS}
        self._check_window(out["obs"], out["action"], "batch")
        return out

    def _check_window(self, obs: Tensor, action: Tensor, name: str) -> None:
        n, d, a = self.spec.n_agents, self.spec.obs_dim, self.spec.action_dim
        ok = obs.dim() == 4 and obs.shape[2:] == (n, d) and action.dim() == 4
        ok = (
            ok
            and action.shape[2:] == (n, a)
            and action.shape[:2] == (obs.shape[0], obs.shape[1] - 1)
        )
        if not ok:
            raise ValueError(
                f"{name}: expected obs [B, T+1, {n}, {d}] and encoded action [B, T, {n}, {a}] "
                f"(one observation more than actions), got {tuple(obs.shape)} and {tuple(action.shape)}"
            )

    # ----------------------------------------------------------------------- imagination

    @torch.no_grad()
    def observe(
        self, obs: Any, action: Any | None = None, *, generator: torch.Generator | None = None
    ) -> WorldModelState:
        """Build the state from real context: obs [B, T+1, N, D] (o_0 .. o_T, the last is the
        current one) and encoded actions [B, T, N, A] taken between them (T may be 0). The
        posterior latents are drawn from ``generator`` (None: torch's global RNG, whose state
        depends on every earlier draw in the process, so a seeded imagine/step passes theirs)."""
        device = self.obs_mean.device
        obs = self._tensor(obs).float()
        if obs.dim() != 4:
            raise ValueError(f"observe: obs must be [B, T+1, N, D], got shape {tuple(obs.shape)}")
        lead = (obs.shape[0], obs.shape[1] - 1)
        if action is None:
            action = obs.new_zeros(*lead, self.spec.n_agents, self.spec.action_dim)
        action = self._encode_action(action, lead)
        self._check_window(obs, action, "observe(obs, action)")
        keep = self.config.backbone.max_context
        step = torch.full((obs.shape[0],), action.shape[1], dtype=torch.long, device=device)
        obs, action = obs[:, -keep:], action[:, action.shape[1] - (min(obs.shape[1], keep) - 1) :]
        b, t = obs.shape[0], action.shape[1]
        with self._eval_mode():
            prev = self.rssm.initial(b, device)
            if t > 0:
                features, _ = self.backbone(obs=self.normalize_obs(obs[:, :t]), action=action)
                prev = self.posterior_latent(features, action, generator)
        return WorldModelState(obs=obs, action=action, rssm=prev, step=step)

    def posterior_latent(
        self, features: Tensor, action: Tensor, generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        """The RSSM's latent after the context whose backbone features are [B, T, N, d] (T >= 1)
        and encoded actions [B, T, N, A], its posterior latents drawn from ``generator``."""
        return self.rssm.observe(
            embed=features.flatten(-2),
            action=action.flatten(-2),
            prev=self.rssm.initial(features.shape[0], features.device),
            generator=generator,
        )["last"]

    def _tensor(self, x: Any) -> Tensor:
        """numpy / list / tensor -> tensor on the model's device (dtype kept)."""
        return torch.as_tensor(
            x if torch.is_tensor(x) else np.asarray(x), device=self.obs_mean.device
        )

    def _encode_action(self, action: Any, lead: tuple[int, ...]) -> Tensor:
        """Encoded actions [*lead, N, A] (discrete indices [*lead, N] are one-hot encoded)."""
        action = self._tensor(action)
        n, a = self.spec.n_agents, self.spec.action_dim
        if self.spec.action_kind == "discrete" and tuple(action.shape) == (*lead, n):
            action = F.one_hot(action.long(), a)
        if tuple(action.shape) != (*lead, n, a):
            raise ValueError(
                f"actions of shape {tuple(action.shape)}: expected encoded actions "
                f"{[*lead, n, a]} (or indices {[*lead, n]} for discrete actions)"
            )
        return action.float()

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        if not self.training:  # already (a loaded model): train() walks every submodule
            yield
            return
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def _sampler(self, sampler: SamplerConfig | None) -> DiffusionSampler:
        scfg = sampler or self.config.sampler
        check_compatible(self.config.diffusion, scfg)
        return DiffusionSampler(self.config.diffusion, scfg)

    @torch.no_grad()
    def transition(
        self,
        state: WorldModelState,
        action: Tensor,
        *,
        sampler: DiffusionSampler,
        noise_scale: float | None = None,
        generator: torch.Generator | None = None,
        memory: Memory | None = None,
        prediction: Prediction = "sample",
    ) -> tuple[dict[str, Tensor], WorldModelState]:
        """One imagined joint step from ``state`` with encoded actions [B, N, A]; ``memory``
        (optional) supplies the diffusion head's predict_fn (e.g. memory experts composed
        with the denoiser). ``prediction`` "mean": the next observation is the regressed mean
        (the mean head's expected delta; the discrete head's mode) instead of a diffusion
        sample, the ablation of the diffusion head."""
        check_prediction(prediction, memory)
        keep = self.config.backbone.max_context
        ctx_obs = state.obs[:, -keep:]  # [B, c, N, D]
        ctx_act = torch.cat(
            [state.action[:, state.action.shape[1] - (ctx_obs.shape[1] - 1) :], action[:, None]], 1
        )
        encoded = self.backbone.encode(obs=self.normalize_obs(ctx_obs), action=ctx_act)
        return self.transition_from(
            state, action, encoded.tokens[:, -1],
            torch.stack([s.expert_load.float() for s in encoded.stats]),
            sampler=sampler, noise_scale=noise_scale, generator=generator, memory=memory,
            prediction=prediction,
        )  # fmt: skip

    def transition_from(
        self,
        state: WorldModelState,
        action: Tensor,
        tokens: Tensor,
        expert_load: Tensor,
        *,
        sampler: DiffusionSampler,
        noise_scale: float | None = None,
        generator: torch.Generator | None = None,
        memory: Memory | None = None,
        prediction: Prediction = "sample",
    ) -> tuple[dict[str, Tensor], WorldModelState]:
        """:meth:`transition` after its backbone pass: tokens [B, N, S, d] are the backbone's
        outputs for the current step (after the context of ``state``, with ``action``),
        expert_load [L, E] what that pass reports. The latent, the heads and every random
        draw (in the same order) follow from them."""
        keep = self.config.backbone.max_context
        f_t = tokens[:, :, self.backbone.tokenizer.summary_token]  # [B, N, d]
        h, z, _, _ = self.rssm.step(prev=state.rssm, embed=f_t.flatten(-2), generator=generator)
        current = state.obs[:, -1]  # [B, N, D]
        per_agent, cond = self._condition(
            f_t, h, z, self.normalize_obs(current), action
        )  # [B, N, F], [B, C]
        b, n, d = current.shape
        predict_fn = None if memory is None else memory.predict_fn(self, state, action, cond)
        if prediction == "mean":  # E[x_0 | cond]: no diffusion draw
            x0 = self.mean_head(cond).float()  # [B, N*D]
            noise_scale = 0.0  # ... and the discrete head's mode
        else:
            x0 = self._sample_delta(cond, sampler, noise_scale, generator, predict_fn)
        delta = x0.view(b, n, d) * self.delta_std + self.delta_mean  # [B, N, D]
        next_obs = torch.maximum(torch.minimum(current + delta, self.obs_high), self.obs_low)
        next_obs = next_obs * self.obs_mask  # [B, N, D], inside the data's support
        if self.discrete_head is not None:
            logits = self._discrete_logits(
                tokens, torch.cat([h, z], -1), self.normalize_obs(current),
                action, current,
            )  # fmt: skip
            next_obs = self._with_discrete(next_obs, current, logits, noise_scale, generator)
        ens = self.ensemble(
            self._ensemble_input(cond, self.normalize_obs(current), action)
        )  # [K, B, O]
        out = {
            "next_obs": next_obs,
            "reward": self._predicted_reward(
                self.reward_head(per_agent) * self.reward_std + self.reward_mean
            ),  # [B, N]
            "terminated": torch.sigmoid(self.termination_head(per_agent)),  # [B, N]
            **self._ensemble_outputs(ens, current),
            "expert_load": expert_load,  # [L, E]
        }
        new_state = WorldModelState(
            obs=torch.cat([state.obs, next_obs[:, None]], 1)[:, -keep:],
            action=torch.cat([state.action, action[:, None]], 1)[:, -(keep - 1) :]
            if keep > 1
            else state.action[:, :0],
            rssm={"h": h, "z": z, "a": action.flatten(-2)},
            step=None if state.step is None else state.step + 1,
        )
        return out, new_state

    @torch.no_grad()
    def step(
        self,
        obs: Any,
        action: Any,
        *,
        state: WorldModelState | None = None,
        sampler: SamplerConfig | None = None,
        noise_scale: float | None = None,
        generator: torch.Generator | None = None,
        memory: Memory | None = None,
        prediction: Prediction = "sample",
    ) -> dict[str, Any]:
        """One joint transition (used by Serve): obs [B, N, D] (ignored when ``state`` is
        given), encoded actions [B, N, A] -> next_obs, reward, terminated, uncertainty (numpy)
        and the ``state`` to continue from. ``memory``, ``prediction``: as in
        :meth:`transition`."""
        state = state or self.observe(self._tensor(obs)[:, None], generator=generator)
        action = self._encode_action(action, (state.batch_size,))
        with self._eval_mode():
            out, new_state = self.transition(
                state,
                action,
                sampler=self._sampler(sampler),
                noise_scale=noise_scale,
                generator=generator,
                memory=memory,
                prediction=prediction,
            )
        result: dict[str, Any] = {k: v.cpu().numpy() for k, v in out.items()}
        result["state"] = new_state
        return result

    @torch.no_grad()
    def imagine(
        self,
        start: WorldModelState | Any,
        policy: Policy | Any,
        horizon: int,
        *,
        context: dict[str, Any] | None = None,
        sampler: SamplerConfig | None = None,
        noise_scale: float | None = None,
        generator: torch.Generator | None = None,
        memory: Memory | None = None,
        prediction: Prediction = "sample",
    ) -> Trajectories:
        """Roll the model forward ``horizon`` steps.

        start    a state from :meth:`observe`, or raw observations [B, N, D] (optionally after
                 ``context`` = {"obs": [B, T, N, D], "action": [B, T, N, A]}: earlier steps)
        policy   callable obs [B, N, D] tensor -> encoded actions [B, N, A] (or indices [B, N]
                 for discrete actions), or an action plan [B, horizon, N, A]
        memory   supplies every step's predict_fn (see :meth:`transition`); None: the denoiser
        prediction  "sample" (the diffusion head) or "mean" (the regressed mean; see
                 :meth:`transition`)
        """
        if not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"imagine: horizon = {horizon!r} must be an integer >= 1")
        state = (
            start
            if isinstance(start, WorldModelState)
            else self._start_state(start, context, generator)
        )
        policy = self._as_policy(policy, state.batch_size, horizon)
        run_sampler = self._sampler(sampler)
        obs, actions, outs = [state.current_obs], [], []
        with self._eval_mode():
            for _ in range(horizon):
                action = self._encode_action(policy(state.current_obs), (state.batch_size,))
                out, state = self.transition(
                    state, action, sampler=run_sampler, noise_scale=noise_scale,
                    generator=generator, memory=memory, prediction=prediction,
                )  # fmt: skip
                obs.append(out["next_obs"])
                actions.append(action)
                outs.append(out)
        stack = lambda key: torch.stack([o[key] for o in outs], 1).cpu().numpy()  # noqa: E731
        return Trajectories(
            obs=torch.stack(obs, 1).cpu().numpy(),  # [B, H+1, N, D]
            action=torch.stack(actions, 1).cpu().numpy(),  # [B, H, N, A]
            reward=stack("reward"),  # [B, H, N]
            terminated=stack("terminated"),  # [B, H, N]
            uncertainty=stack("uncertainty"),  # [B, H]
            obs_std=stack("obs_std"),  # [B, H, N, D]
            ensemble_obs=stack("ensemble_obs"),  # [B, H, N, D]
            ensemble_reward=stack("ensemble_reward"),  # [B, H, N]
            reward_spread=stack("reward_spread"),  # [B, H, N]
            expert_load=torch.stack([o["expert_load"] for o in outs])
            .mean(0)
            .cpu()
            .numpy(),  # [L, E]
        )

    def _start_state(
        self, start: Any, context: dict[str, Any] | None, generator: torch.Generator | None
    ) -> WorldModelState:
        start = self._tensor(start).float()
        if start.dim() != 3:
            raise ValueError(
                f"imagine: start must be a WorldModelState or observations [B, N, D], got shape {tuple(start.shape)}"
            )
        if context is None:
            return self.observe(start[:, None], generator=generator)
        ctx_obs = self._tensor(context["obs"]).float()
        return self.observe(
            torch.cat([ctx_obs, start[:, None]], 1), context["action"], generator=generator
        )

    def _as_policy(self, policy: Any, batch: int, horizon: int) -> Policy:
        if callable(policy):
            return policy
        plan = self._tensor(policy)
        if plan.dim() < 3 or plan.shape[0] != batch or plan.shape[1] < horizon:
            raise ValueError(
                f"imagine: an action plan must have shape [B={batch}, H>={horizon}, N, A] (or [B, H, N] "
                f"indices for discrete actions), got {tuple(plan.shape)}"
            )
        return ActionPlan(plan)

    # ----------------------------------------------------------------------- checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to rebuild the model: for a trainer saving optimizer state next to
        it with torch.save (plain types and tensors: loadable with weights_only=True)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "env_spec": self.spec.to_json(),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }

    @classmethod
    def from_checkpoint_state(
        cls,
        state: dict[str, Any],
        *,
        expected_config: WorldModelConfig | None = None,
        source: str = "<checkpoint state>",
    ) -> WorldModel:
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(
                f"{source} is not a moedream world-model checkpoint (no format {FORMAT!r})"
            )
        if state.get("format_version") not in READABLE_VERSIONS:
            raise CheckpointError(
                f"{source} has world-model format version {state.get('format_version')!r}; this "
                f"moedream reads versions {list(READABLE_VERSIONS)}: retrain or convert it"
            )
        try:
            config = WorldModelConfig.from_dict(json.loads(state["config"]))
            spec = EnvSpec.from_json(state["env_spec"])
        except (ConfigError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{source}: stored config or env spec is unreadable ({err})"
            ) from None
        if expected_config is not None:
            _check_same_config(config, expected_config, source)
        model = cls(config, spec)
        weights = state["state_dict"]
        if state.get("format_version") == "3":
            weights = _renamed(weights, RENAMED_IN_4)
        try:
            model.load_state_dict(weights, strict=True)
        except (RuntimeError, KeyError) as err:
            raise CheckpointError(
                f"{source}: weights do not fit the stored config ({err})"
            ) from None
        return model

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (weights + config + env spec + format version + sha256 of
        the weights). A directory path gets ``world_model.safetensors`` inside it."""
        path = Path(path)
        if path.is_dir():
            path = path / WEIGHTS_FILE
        state = self.checkpoint_state()
        tensors = state.pop("state_dict")
        return write_checkpoint(path, tensors, {k: str(v) for k, v in state.items()})

    @classmethod
    def load(
        cls,
        path: str | Path,
        expected_config: WorldModelConfig | None = None,
        *,
        map_location: str | torch.device = "cpu",
    ) -> WorldModel:
        """Rebuild a saved model; raises CheckpointError naming the path and the problem."""
        path = Path(path)
        if path.is_dir():
            path = path / WEIGHTS_FILE
        metadata, tensors = read_checkpoint(path, kind="world-model", fmt=FORMAT)
        state = {**metadata, "state_dict": tensors}
        model = cls.from_checkpoint_state(
            state, expected_config=expected_config, source=repr(str(path))
        )
        return model.to(map_location)

    # ----------------------------------------------------------------------- introspection

    def param_counts(self) -> dict[str, int]:
        """Parameters per top-level component, and the total."""
        counts = {
            name: sum(p.numel() for p in child.parameters())
            for name, child in self.named_children()
        }
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts


Prediction = Literal["sample", "mean"]
PREDICTIONS = ("sample", "mean")
"""What an imagined next observation is: a draw of the diffusion head ("sample") or the
regressed mean of the mean head ("mean", the ablation of diffusion)."""


def check_prediction(prediction: str, memory: Any = None) -> None:
    """ValueError naming the setting unless ``prediction`` is one of PREDICTIONS (and "mean"
    comes without memory experts, which compose into the diffusion head only)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction = {prediction!r} must be one of {list(PREDICTIONS)}")
    if prediction == "mean" and memory is not None:
        raise ValueError(
            "prediction 'mean' takes the regressed mean, which memory experts do not change "
            "(they compose into the diffusion head); use prediction 'sample' with memory"
        )


def moe_logs(stats: list[MoEStats]) -> dict[str, float]:
    """moe/balance, moe/z_loss, moe/dropped and moe/load_l{i}_e{j} of every layer."""
    logs = {
        "moe/balance": float(sum(float(s.balance_loss.detach()) for s in stats)),
        "moe/z_loss": float(sum(float(s.z_loss.detach()) for s in stats)),
        "moe/aux_loss": float(sum(float(s.aux_loss.detach()) for s in stats)),
        "moe/dropped": sum(float(s.dropped_tokens) for s in stats)
        / max(1, sum(s.tokens for s in stats)),
    }
    for i, s in enumerate(stats):
        for j, load in enumerate(s.expert_load.tolist()):
            logs[f"moe/load_l{i}_e{j}"] = float(load)
    return logs


def _check_same_config(found: WorldModelConfig, expected: WorldModelConfig, source: str) -> None:
    a, b = _flatten(found.to_dict()), _flatten(expected.to_dict())
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        shown = ", ".join(
            f"{k}: checkpoint {a.get(k)!r} vs expected {b.get(k)!r}" for k in diff[:8]
        )
        raise CheckpointError(
            f"{source} was saved with a different world-model config ({len(diff)} field(s) differ: "
            f"{shown}); load it without expected_config or use the matching config"
        )


def _renamed(weights: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    """``weights`` with every key starting with an old prefix moved to its new prefix."""
    out = {}
    for key, value in weights.items():
        old = next((p for p in renames if key.startswith(p)), None)
        out[key if old is None else renames[old] + key[len(old) :]] = value
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _std_or_unit(values: Tensor, floor: float) -> Tensor:
    """Per-feature std over dim 0, with 1 (the raw scale) where the feature is constant."""
    std = values.std(0, correction=0)
    return torch.where(std < floor, torch.ones_like(std), std)
