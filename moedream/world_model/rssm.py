"""Recurrent latent state (RSSM, as in DreamerV3) over the backbone's joint features.

Shape legend: (B)atch, (T)ime, (E) backbone embedding (agents pooled), (A) joint action size,
(H) deterministic state, (Z) stochastic latent size, (G)roups x (C)lasses for categorical
latents (Z = G * C).

    h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}])         deterministic recurrence
    p(z_t | h_t)                                    prior (what the dynamics alone expect)
    q(z_t | h_t, e_t)                               posterior (e_t = backbone features at t)

Latents are diagonal Gaussians or DreamerV3's one-hot categoricals (1% uniform mix,
straight-through gradients). The balanced KL (DreamerV3, eq. 5) trains the prior towards the
posterior (dyn) and regularises the posterior towards the prior (rep), each floored at
``free_bits`` nats so that neither collapses.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moedream.config import ConfigBase, check, check_choice, check_positive, check_positive_ints
from moedream.world_model.layers import mlp


@dataclasses.dataclass
class RSSMConfig(ConfigBase):
    deter: int = 64
    """Size of the deterministic GRU state h."""
    hidden: int = 128
    """Width of the prior/posterior MLPs."""
    latent: Literal["gaussian", "categorical"] = "gaussian"
    stoch: int = 16
    """Gaussian latent size (latent="gaussian")."""
    groups: int = 8
    """Categorical latent: number of one-hot groups (latent="categorical")."""
    classes: int = 8
    """Categorical latent: classes per group."""
    unimix: float = 0.01
    """Categorical latent: mix of the uniform distribution into every group's probabilities."""
    min_std: float = 0.1
    """Gaussian latent: lower bound of the standard deviation."""
    free_bits: float = 1.0
    """KL (nats per step) below which the KL terms give no gradient."""
    dyn_weight: float = 0.5
    rep_weight: float = 0.1

    @property
    def latent_dim(self) -> int:
        return self.stoch if self.latent == "gaussian" else self.groups * self.classes

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check_choice(f"{prefix}latent", self.latent, ("gaussian", "categorical"))
        check_positive_ints(self, prefix, ("deter", "hidden", "stoch", "groups", "classes"))
        check(0.0 <= self.unimix < 1.0, f"{prefix}unimix", self.unimix, "must be in [0, 1)")
        check_positive(f"{prefix}min_std", self.min_std)
        for name in ("free_bits", "dyn_weight", "rep_weight"):
            check_positive(f"{prefix}{name}", getattr(self, name), allow_zero=True)


# ---------------------------------------------------------------------------------------------
# Latent distributions as plain tensors of parameters (pure functions)
# ---------------------------------------------------------------------------------------------


def gaussian_params(raw: Tensor, min_std: float) -> Tensor:
    """[..., 2Z] network output -> [..., 2Z] (mean, std) with std >= min_std."""
    mean, std = raw.chunk(2, dim=-1)
    return torch.cat([mean, min_std + F.softplus(std)], dim=-1)


def categorical_logits(raw: Tensor, groups: int, unimix: float) -> Tensor:
    """[..., G*C] network output -> [..., G, C] log-probabilities mixed with 1% uniform."""
    logits = raw.unflatten(-1, (groups, -1)).float()  # [..., G, C]
    probs = torch.softmax(logits, -1)
    probs = (1.0 - unimix) * probs + unimix / probs.shape[-1]
    return probs.log()


def sample_latent(
    params: Tensor,
    cfg: RSSMConfig,
    *,
    sample: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A latent z [..., Z] from parameters (the mode when ``sample`` is False)."""
    if cfg.latent == "gaussian":
        mean, std = params.chunk(2, dim=-1)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise  # reparameterised
    log_probs = params  # [..., G, C]
    if sample:
        u = torch.rand(log_probs.shape, generator=generator, device=log_probs.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-9, 1.0 - 1e-9)))
        index = (log_probs + gumbel).argmax(-1)
    else:
        index = log_probs.argmax(-1)
    one_hot = F.one_hot(index, log_probs.shape[-1]).to(log_probs.dtype)  # [..., G, C]
    probs = log_probs.exp()
    return (one_hot + probs - probs.detach()).flatten(-2)  # straight-through, [..., Z]


def latent_kl(p: Tensor, q: Tensor, cfg: RSSMConfig) -> Tensor:
    """KL(p || q) in nats, summed over the latent: [...] (params as from the RSSM)."""
    if cfg.latent == "gaussian":
        p_mean, p_std = p.chunk(2, dim=-1)
        q_mean, q_std = q.chunk(2, dim=-1)
        kl = torch.log(q_std / p_std) + (p_std**2 + (p_mean - q_mean) ** 2) / (2 * q_std**2) - 0.5
        return kl.sum(-1)
    return (p.exp() * (p - q)).sum((-2, -1))


def balanced_kl(post: Tensor, prior: Tensor, cfg: RSSMConfig) -> tuple[Tensor, dict[str, float]]:
    """DreamerV3's KL balancing with free bits:

    L = dyn_weight * max(free, KL(sg(q) || p)) + rep_weight * max(free, KL(q || sg(p)))

    post, prior: parameters [B, T, ...]; returns (scalar loss, logs).
    """
    dyn = latent_kl(post.detach(), prior, cfg)  # [B, T]
    rep = latent_kl(post, prior.detach(), cfg)  # [B, T]
    loss = cfg.dyn_weight * dyn.clamp_min(cfg.free_bits).mean()
    loss = loss + cfg.rep_weight * rep.clamp_min(cfg.free_bits).mean()
    return loss, {"wm/kl": float(dyn.detach().mean()), "wm/kl_loss": float(loss.detach())}


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


class RSSM(nn.Module):
    """Recurrent state-space model over joint backbone features and joint actions."""

    def __init__(self, *, cfg: RSSMConfig, embed_dim: int, action_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        z = cfg.latent_dim
        param_dim = 2 * z if cfg.latent == "gaussian" else z
        self.action_dim = action_dim
        self.input_proj = nn.Sequential(nn.Linear(z + action_dim, cfg.hidden), nn.SiLU())
        self.gru = nn.GRUCell(cfg.hidden, cfg.deter)
        self.prior_net = mlp(cfg.deter, cfg.hidden, param_dim, hidden_layers=1)
        self.post_net = mlp(cfg.deter + embed_dim, cfg.hidden, param_dim, hidden_layers=1)

    @property
    def feature_dim(self) -> int:
        return self.cfg.deter + self.cfg.latent_dim

    def initial(self, batch: int, device: torch.device) -> dict[str, Tensor]:
        """The state before the first step: h, z, a all zero."""
        return {
            "h": torch.zeros(batch, self.cfg.deter, device=device),
            "z": torch.zeros(batch, self.cfg.latent_dim, device=device),
            "a": torch.zeros(batch, self.action_dim, device=device),
        }

    def _params(self, raw: Tensor) -> Tensor:
        if self.cfg.latent == "gaussian":
            return gaussian_params(raw.float(), self.cfg.min_std)  # [..., 2Z]
        return categorical_logits(raw, self.cfg.groups, self.cfg.unimix)  # [..., G, C]

    def step(
        self,
        *,
        prev: dict[str, Tensor],
        embed: Tensor,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One filter step: (h_{t-1}, z_{t-1}, a_{t-1}), e_t -> (h_t, z_t, prior_t, post_t)."""
        x = self.input_proj(torch.cat([prev["z"], prev["a"]], -1))  # [B, hidden]
        h = self.gru(x.float(), prev["h"].float())  # [B, H]: h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}])
        prior = self._params(self.prior_net(h))  # p(z_t | h_t)
        post = self._params(
            self.post_net(torch.cat([h, embed.to(h.dtype)], -1))
        )  # q(z_t | h_t, e_t)
        z = sample_latent(post, self.cfg, sample=sample, generator=generator)  # [B, Z]
        return h, z, prior, post

    def observe(
        self,
        *,
        embed: Tensor,
        action: Tensor,
        prev: dict[str, Tensor] | None = None,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Filter a sequence: embed [B, T, E], action [B, T, A] -> h [B, T, H], z [B, T, Z],
        prior/post params [B, T, ...], and ``last`` (the state to continue from)."""
        b, t, _ = embed.shape
        prev = prev or self.initial(b, embed.device)
        hs, zs, priors, posts = [], [], [], []
        for i in range(t):
            h, z, prior, post = self.step(
                prev=prev, embed=embed[:, i], sample=sample, generator=generator
            )
            hs.append(h)
            zs.append(z)
            priors.append(prior)
            posts.append(post)
            prev = {"h": h, "z": z, "a": action[:, i].to(h.dtype)}
        return {
            "h": torch.stack(hs, 1),
            "z": torch.stack(zs, 1),
            "prior": torch.stack(priors, 1),
            "post": torch.stack(posts, 1),
            "last": prev,
        }
