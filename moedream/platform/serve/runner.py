"""Running validated jobs on a loaded world model (plain PyTorch: no ray here).

Seeding and batching (why results never depend on what else is in the batch)
-----------------------------------------------------------------------------
Every request carries a seed, and the deployment must give exactly what

    model.imagine(start, plan, horizon, generator=torch.Generator().manual_seed(seed))

gives in-process. Fusing several requests into one ``imagine`` call cannot keep that promise
with today's model: (1) every random draw (RSSM latent, diffusion start noise, DDPM step noise)
takes one generator for the whole batch, so row r's noise depends on the rows before it; (2)
MoE capacity (``moe.capacity_factor``, not dropless) is sized from the number of tokens in the
call, so which tokens are dropped depends on the batch. So ``execute_batch`` runs the requests
that Serve collected in one ``@serve.batch`` call one after another, each with its own
generator: results are bit-identical to the direct call, and the batch still saves the
per-request dispatch. A request's own rows (batch x num_samples) always run as one tensor batch.

Extension point: ``fuse_imagine_jobs`` is where requests with equal (horizon, sampler,
noise_scale, context length) would be concatenated into one call, once the model can take
per-row noise (see the report: a ``generator`` that may be a list of (torch.Generator, rows)
used by every draw, and dropless or per-request MoE capacity in inference).
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moedream.platform.serve.episodes import EpisodeCache, EpisodeError
from moedream.platform.serve.schemas import ImagineJob, StepJob
from moedream.world_model.model import WEIGHTS_FILE, WorldModel, WorldModelState


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model and where it came from; swapped as a whole on reconfigure."""

    model: WorldModel
    path: str
    checkpoint_id: str
    """First 16 hex digits of the weights' sha256 (stored in the safetensors metadata)."""
    mtime: float
    loaded_at: str

    @property
    def device(self) -> torch.device:
        return self.model.obs_mean.device

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.checkpoint_id,
            "path": self.path,
            "mtime": self.mtime,
            "loaded_at": self.loaded_at,
        }


def weights_file(path: str | Path) -> Path:
    path = Path(path)
    return path / WEIGHTS_FILE if path.is_dir() else path


def checkpoint_fingerprint(path: str | Path) -> tuple[str, float]:
    """(checkpoint id, mtime) read from the file's metadata without loading the weights."""
    from safetensors import safe_open

    file = weights_file(path)
    with safe_open(str(file), framework="pt") as f:
        sha = (f.metadata() or {}).get("sha256", "")
    return sha[:16], file.stat().st_mtime


def load_checkpoint(path: str, device: str | None = None) -> LoadedModel:
    """Load, move to ``device`` (default: cuda if visible, else cpu), eval mode, one check step."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = WorldModel.load(path, map_location=device).eval()
    checkpoint_id, mtime = checkpoint_fingerprint(path)
    loaded = LoadedModel(
        model=model,
        path=str(path),
        checkpoint_id=checkpoint_id,
        mtime=mtime,
        loaded_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    smoke_test(loaded)
    return loaded


def smoke_test(loaded: LoadedModel) -> None:
    """A one-row, one-step transition; raises RuntimeError unless it is finite."""
    spec = loaded.model.spec
    obs = np.zeros((1, spec.n_agents, spec.obs_dim), np.float32)
    action = np.zeros((1, spec.n_agents, spec.action_dim), np.float32)
    out = loaded.model.step(obs, action, generator=_generator(0, loaded.device))
    for key in ("next_obs", "reward", "terminated", "uncertainty"):
        if not np.isfinite(out[key]).all():
            raise RuntimeError(
                f"world model {loaded.path!r} gives non-finite {key} on a zero input"
            )


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def run_imagine(
    loaded: LoadedModel, job: ImagineJob, episodes: EpisodeCache | None = None
) -> dict[str, Any]:
    if job.episode_id is not None:
        return _run_imagine_with_memory(loaded, job, episodes)
    traj = loaded.model.imagine(
        job.start,
        job.plan,
        job.horizon,
        context=job.context,
        sampler=job.sampler,
        noise_scale=job.noise_scale,
        generator=_generator(job.seed, loaded.device),
        prediction=job.prediction,
    )
    out = dataclasses.asdict(traj)  # numpy arrays (Trajectories fields)
    return _tag(out, loaded, job.seed)


def _run_imagine_with_memory(
    loaded: LoadedModel, job: ImagineJob, episodes: EpisodeCache | None
) -> dict[str, Any]:
    """Every row composes the memory of ``job.episode_id``; the context (if any) starts at
    the episode's step ``entry.steps`` (its latest posted observation), so memory answers
    only from real transitions the short context does not already hold."""
    if episodes is None:
        raise EpisodeError("episode_id", "this replica has no episode memory (no model loaded)")
    model = loaded.model
    with episodes.reading(job.episode_id, model) as (memory, entry):
        state = start_state(model, job.start, job.context, entry.steps)
        traj = model.imagine(
            state,
            job.plan,
            job.horizon,
            sampler=job.sampler,
            noise_scale=job.noise_scale,
            generator=_generator(job.seed, loaded.device),
            memory=memory.recall([job.episode_id] * job.rows),
        )
    out = dataclasses.asdict(traj)
    return _tag(out, loaded, job.seed)


def start_state(
    model: WorldModel, start: np.ndarray, context: dict[str, np.ndarray] | None, step: int
) -> WorldModelState:
    """The state ``model.imagine`` would build from start [B, N, D] after ``context``, with
    the context's first observation at episode step ``step`` (the episode's latest posted
    one) and so the current observation at ``step`` + T, T the context's steps: a caller
    that imagines step by step sends the steps imagined since the branch as context, and
    the memory experts may answer from every real transition older than the short context."""
    obs = torch.as_tensor(start, device=model.obs_mean.device)[:, None]  # [B, 1, N, D]
    action = None
    if context is not None:
        ctx_obs = torch.as_tensor(context["obs"], device=obs.device)  # [B, T, N, D]
        obs, action = torch.cat([ctx_obs, obs], 1), context["action"]
    state = model.observe(obs, action)  # state.step [B]: T, the context's steps
    return dataclasses.replace(state, step=state.step + step)


def run_step(loaded: LoadedModel, job: StepJob) -> dict[str, Any]:
    out = loaded.model.step(
        job.obs,
        job.action,
        sampler=job.sampler,
        noise_scale=job.noise_scale,
        generator=_generator(job.seed, loaded.device),
        prediction=job.prediction,
    )
    out.pop("state", None)  # the latent state stays in the replica: steps are stateless
    return _tag(out, loaded, job.seed)


def _tag(out: dict[str, Any], loaded: LoadedModel, seed: int) -> dict[str, Any]:
    out["agent_ids"] = list(loaded.model.spec.agent_ids)
    out["checkpoint_id"] = loaded.checkpoint_id
    out["seed"] = seed
    return out


@dataclasses.dataclass
class Failure:
    """A per-request error inside a batch (serve.batch sets results, it does not raise them)."""

    error: BaseException


def execute_batch(
    loaded: LoadedModel,
    jobs: list[ImagineJob | StepJob],
    num_threads: int | None = None,
    episodes: EpisodeCache | None = None,
) -> list[Any]:
    """Run every job on the same model snapshot; one job's error never fails the others.

    ``num_threads`` is set here, in the thread that runs the model: with OpenMP the intra-op
    thread count is per calling thread, so setting it elsewhere (the event loop) has no effect."""
    if num_threads:
        torch.set_num_threads(num_threads)
    results: list[Any] = []
    for job in fuse_imagine_jobs(jobs):
        try:
            if isinstance(job, ImagineJob):
                results.append(run_imagine(loaded, job, episodes))
            else:
                results.append(run_step(loaded, job))
        except Exception as err:  # noqa: BLE001 - returned to that request's caller only
            results.append(Failure(err))
    return results


def fuse_imagine_jobs(jobs: list[ImagineJob | StepJob]) -> list[ImagineJob | StepJob]:
    """Extension point for fused execution (see the module docstring). Today: identity, so
    every request runs with its own generator and matches the direct call exactly."""
    return jobs


class BatchStats:
    """How many requests each executed batch held (a histogram), and how long batches took."""

    def __init__(self) -> None:
        self.sizes: Counter[int] = Counter()
        self.rows = 0
        self.failed = 0
        self.busy_s = 0.0
        self.started = time.time()

    def record(self, size: int, rows: int, failed: int, seconds: float) -> None:
        self.sizes[size] += 1
        self.rows += rows
        self.failed += failed
        self.busy_s += seconds

    def summary(self) -> dict[str, Any]:
        batches = sum(self.sizes.values())
        requests = sum(size * count for size, count in self.sizes.items())
        return {
            "batches": batches,
            "requests": requests,
            "rows": self.rows,
            "failed_requests": self.failed,
            "batch_size_histogram": {str(k): v for k, v in sorted(self.sizes.items())},
            "max_batch_size_seen": max(self.sizes, default=0),
            "mean_batch_size": requests / batches if batches else 0.0,
            "busy_s": self.busy_s,
            "uptime_s": time.time() - self.started,
        }
