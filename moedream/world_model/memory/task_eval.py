"""Memory experts on the memory task (``moedream.envs.memory_task``): data, training, metrics.

Shared by ``tests/unit/test_memory.py`` and ``benchmarks/memory_experts.py``. Protocol per
evaluation episode of T steps: the first ``prefix`` steps are observed (they fill the spatial
memory and finetune the episode's LoRA adapter); the rest is predicted from them:

- recall error: one-step predictions (true past as context) of the tile colour of cells that an
  agent re-enters after seeing them before, outside the short-term context window: mean
  squared error on the tile one-hot, and the fraction of wrong tiles (argmax);
- cue recall: whether the cue revealed in the last observation is predicted (argmax);
- long-horizon error: autoregressive imagination of the remaining steps with the true actions;
  mean squared error of each imagined observation against the real one, per horizon.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from moedream.envs.memory_task import MemoryTaskConfig, ObsLayout, random_episodes
from moedream.world_model.diffusion import DiffusionConfig, DiffusionSampler, SamplerConfig
from moedream.world_model.memory.config import MemoryConfig
from moedream.world_model.memory.long_term import MemoryStore
from moedream.world_model.memory.network import (
    EpisodeHistory,
    MemoryBatch,
    MemoryDenoiserNet,
    train_memory_net,
    transitions,
)
from moedream.world_model.memory.predictor import ComposedPredictor
from moedream.world_model.memory.rollout import EpisodeMemory, imagine


def episode_history(
    ep: dict[str, np.ndarray], task: MemoryTaskConfig, device="cpu"
) -> EpisodeHistory:
    actions = np.eye(5 + task.n_cues, dtype=np.float32)[ep["actions"]]  # [T, N, A]
    return EpisodeHistory.from_arrays(ep["obs"], actions, ep["positions"], device=device)


@dataclasses.dataclass
class Trained:
    """A trained shared network with what evaluation needs."""

    task: MemoryTaskConfig
    memory: MemoryConfig
    net: MemoryDenoiserNet
    sampler: DiffusionSampler
    losses: list[float]


def train_on_task(
    task: MemoryTaskConfig,
    memory: MemoryConfig,
    diffusion: DiffusionConfig,
    sampler: SamplerConfig,
    *,
    episodes: int,
    steps: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    device="cpu",
    writer=None,
    progress: bool = False,
) -> Trained:
    """Train the shared network on ``episodes`` random-policy episodes (seeds from ``seed``)."""
    torch.manual_seed(seed)
    eps = random_episodes(task, episodes, seed=seed)
    data = MemoryBatch.cat([transitions(episode_history(e, task, device), memory) for e in eps])
    n_actions = 5 + task.n_cues
    net = MemoryDenoiserNet(
        memory, diffusion, n_agents=2, obs_dim=task.obs_dim, action_dim=n_actions
    ).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    losses = train_memory_net(
        net,
        data,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        generator=gen,
        writer=writer,
        progress=progress,
    )
    return Trained(task, memory, net, DiffusionSampler(diffusion, sampler), losses)


def revisit_targets(
    ep: dict[str, np.ndarray], prefix: int, context_len: int
) -> list[tuple[int, int]]:
    """(step j, agent) with j > prefix where the agent enters a cell seen before step j - K
    (by any agent) and not seen within the context window [j - K, j - 1]."""
    pos = ep["positions"]  # [T + 1, N, 2]
    out = []
    for j in range(prefix + 1, pos.shape[0]):
        for agent in range(pos.shape[1]):
            seen = np.all(pos[:j] == pos[j, agent], axis=-1).any(axis=-1)  # [j]
            window = seen[max(0, j - context_len) :]
            if seen[: max(0, j - context_len)].any() and not window.any():
                out.append((j, agent))
    return out


@dataclasses.dataclass
class EvalResult:
    recall_mse: float
    recall_error_rate: float
    n_recall: int
    cue_accuracy: float
    horizon_mse: np.ndarray  # [H] mean over episodes
    one_step_mse: float

    @property
    def long_horizon_mse(self) -> float:
        return float(self.horizon_mse.mean())


def evaluate(
    trained: Trained,
    memory: MemoryConfig,
    episodes: list[dict[str, np.ndarray]],
    *,
    prefix: int,
    store: MemoryStore | None = None,
    seed: int = 0,
    imagine_steps: int | None = None,
) -> EvalResult:
    """Metrics of the experts enabled in ``memory`` (same network, its alphas/form/experts).

    With the long-term expert on, each episode's adapter is finetuned on its prefix first
    (once per episode id: a ``store`` shared across calls reuses them).
    """
    task, net = trained.task, trained.net
    device = next(net.parameters()).device
    lay = ObsLayout.of(task)
    if memory.long_term and store is None:
        store = MemoryStore(net, memory)
    predictor = ComposedPredictor(net, memory, store if memory.long_term else None)
    gen = torch.Generator(device=device).manual_seed(seed)
    hists = [episode_history(e, task, device) for e in episodes]
    ids = [f"eval-{i}" for i in range(len(episodes))]
    if memory.long_term:
        for eid, hist in zip(ids, hists, strict=True):
            if eid not in store:
                store.finetune(eid, hist.prefix(prefix), generator=gen)
    one_step = _one_step(
        predictor, trained.sampler, hists, ids, prefix, gen
    )  # list of [T-prefix, N, D]
    rec_sq, rec_wrong, n_rec, cue_ok, one_mse = [], [], 0, [], []
    for ep, hist, pred in zip(episodes, hists, one_step, strict=True):
        truth = hist.obs[prefix + 1 :]  # [T - prefix, N, D]
        one_mse.append(((pred - truth) ** 2).mean().item())
        for j, agent in revisit_targets(ep, prefix, memory.context_len):
            p, y = pred[j - prefix - 1, agent, lay.tile], truth[j - prefix - 1, agent, lay.tile]
            rec_sq.append(((p - y) ** 2).mean().item())
            rec_wrong.append(float(p.argmax() != y.argmax()))
            n_rec += 1
        cue_ok.append(float(pred[-1, :, lay.cue].argmax(-1).eq(ep["cue"]).float().mean()))
    horizon = _imagine(predictor, trained.sampler, hists, ids, prefix, imagine_steps, gen, task)
    return EvalResult(
        recall_mse=float(np.mean(rec_sq)) if rec_sq else float("nan"),
        recall_error_rate=float(np.mean(rec_wrong)) if rec_wrong else float("nan"),
        n_recall=n_rec,
        cue_accuracy=float(np.mean(cue_ok)),
        horizon_mse=horizon,
        one_step_mse=float(np.mean(one_mse)),
    )


def _one_step(predictor, sampler, hists, ids, prefix, gen) -> list[Tensor]:
    """Teacher-forced predictions of o_{prefix+1}..o_T per episode: [T - prefix, N, D] each."""
    batches, row_ids = [], []
    for eid, hist in zip(ids, hists, strict=True):
        b = transitions(hist, predictor.cfg).index(torch.arange(prefix + 1, hist.steps + 1))
        batches.append(b)
        row_ids += [eid] * len(b)
    batch = MemoryBatch.cat(batches)
    x0 = predictor.sample(sampler, batch, row_ids, generator=gen)  # [sum rows, X]
    n, d = hists[0].obs.shape[1:]
    return list(x0.reshape(-1, n, d).split([len(b) for b in batches]))


def _imagine(predictor, sampler, hists, ids, prefix, steps, gen, task) -> np.ndarray:
    """Autoregressive imagination from each prefix with the true actions: MSE per horizon [H]."""
    n, d = hists[0].obs.shape[1:]
    a = hists[0].actions.shape[-1]
    memories = []
    for eid, hist in zip(ids, hists, strict=True):
        m = EpisodeMemory(
            predictor.cfg,
            n_agents=n,
            obs_dim=d,
            action_dim=a,
            episode_id=eid,
            device=hist.obs.device,
        )
        m.reset(hist.obs[0], hist.positions[0])
        for s in range(prefix):
            m.observe(hist.actions[s], hist.obs[s + 1], hist.positions[s + 1])
        memories.append(m)
    h = min(h.steps for h in hists) - prefix if steps is None else steps
    actions = torch.stack([hist.actions[prefix : prefix + h] for hist in hists])  # [B, H, N, A]
    positions = torch.stack([hist.positions[prefix + 1 : prefix + 1 + h] for hist in hists])
    imagined = imagine(
        predictor, sampler, memories, actions, positions, generator=gen
    )  # [B, H, N, D]
    truth = torch.stack([hist.obs[prefix + 1 : prefix + 1 + h] for hist in hists])
    return ((imagined - truth) ** 2).mean(dim=(0, 2, 3)).cpu().numpy()  # [H]
