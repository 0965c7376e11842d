"""The per-worker training loop of a distributed world-model run (runs inside Ray Train).

Data: worker r of W reads shards r, r+W, r+2W, ... of the episode folder (every worker reads
all and keeps every W-th window if there are fewer shards than workers); its episodes are
split into train / held-out windows. ``WindowSampler`` draws epoch-shuffled batches; its
(epoch, position) is the worker's data position saved in every checkpoint.

Checkpoint folder (``ray.train.report`` merges the workers' files into one folder)::

    world_model.safetensors   full model (experts gathered), readable by WorldModel.load
    trainer_state.json        step, world size, expert-parallel size, engine (rank 0)
    data_rank<r>.json         worker r's data position
    optimizer_rank<r>.pt      native engine: worker r's optimizer + scheduler state
    deepspeed/                DeepSpeed engine: its own checkpoint (ZeRO partitions, experts)
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moedream.platform.train import parallel as par
from moedream.platform.train.config import DistributedTrainConfig
from moedream.world_model.model import WEIGHTS_FILE, WorldModel
from moedream.world_model.train_local import evaluate
from moedream.world_model.trajectory import WINDOW_KEYS

PROGRESS_FILE = "progress.jsonl"
FAILURE_MARKER = ".injected_failure"


class InjectedFailure(RuntimeError):
    """Raised once by ``fail_at_step`` to test recovery."""


# ---------------------------------------------------------------------------------------- data


class WindowSampler:
    """Epoch-shuffled batches of window indices; ``state_dict`` is the data position."""

    def __init__(self, count: int, batch_size: int, seed: int) -> None:
        if count < 1:
            raise ValueError("this worker has no training windows; collect more episodes")
        self.count, self.batch_size, self.seed = count, batch_size, seed
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.count)

    def next_indices(self) -> np.ndarray:
        picked: list[np.ndarray] = []
        need = self.batch_size
        while need:
            order = self._order()[self.position :]
            take = order[:need]
            picked.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position >= self.count:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(picked)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("count") != self.count:
            print(
                f"[moedream] data changed since the checkpoint ({state.get('count')} -> {self.count} windows): restarting the epoch"
            )
            return
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def worker_windows(cfg: DistributedTrainConfig, rank: int, world_size: int):
    """(spec, train windows, held-out windows) of this worker."""
    from moedream.data import load_windows, shard_paths

    files = shard_paths(cfg.data)
    mine = files[rank::world_size] if len(files) >= world_size else files
    spec, train, holdout = load_windows(
        mine, cfg.train.window, holdout=cfg.train.holdout, seed=cfg.train.seed + rank
    )
    if len(files) < world_size:
        train = {k: v[rank::world_size] for k, v in train.items()}
        holdout = {k: v[rank::world_size] for k, v in holdout.items()} if holdout else holdout
    return spec, train, holdout


def pick(windows: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {k: windows[k][index] for k in WINDOW_KEYS}


# ------------------------------------------------------------------------------------- worker


class Worker:
    """One rank's state: layout, model, engine, data, and the chief's writers."""

    def __init__(self, cfg: DistributedTrainConfig) -> None:
        self.cfg = cfg
        self.device = _device(cfg.use_gpu)
        if cfg.engine == "deepspeed" and dist.is_initialized():
            par.init_deepspeed_comm()
        self.layout = par.build_layout(cfg.expert_parallel_size)
        lay = self.layout
        self.spec, self.train_windows, holdout = worker_windows(cfg, lay.rank, lay.world_size)
        self.full_model, self.model = par.build_models(
            cfg.model, self.spec, lay, seed=cfg.train.seed, device=self.device
        )
        if lay.is_chief:
            self.model.fit_normalization(self.train_windows)
        par.broadcast_buffers(self.model, lay)
        self.engine = par.make_engine(
            self.model,
            lay,
            cfg.train,
            engine=cfg.engine,
            zero_stage=cfg.zero_stage,
            micro_batch=cfg.per_worker_batch,
        )
        self.sampler = WindowSampler(
            len(self.train_windows["obs"]), cfg.per_worker_batch, cfg.train.seed * 7919 + lay.rank
        )
        self.eval_batch = self._eval_batch(holdout)
        self.run_dir = Path(cfg.storage_path) / cfg.name
        self.tokens_per_step = cfg.train.batch_size * cfg.train.window * self.spec.n_agents
        self.writer = None

    def _eval_batch(self, holdout: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The same number of held-out windows on every rank (all must join the all-to-alls),
        or None everywhere if some rank has none."""
        count = len(holdout["obs"]) if holdout else 0
        per_rank = max(1, self.cfg.train.eval_windows // self.layout.world_size)
        count = min(per_rank, int(-par.max_over_ranks(-float(count), self.layout, self.device)))
        if count < 1:
            return None
        return {k: holdout[k][:count] for k in WINDOW_KEYS}

    # ------------------------------------------------------------------------------- steps

    def train_step(self) -> dict[str, float]:
        batch = pick(self.train_windows, self.sampler.next_indices())
        par.reset_comm_timers()
        start = time.perf_counter()
        logs = self.engine.step(batch)
        seconds = time.perf_counter() - start
        logs["perf/step_s"] = seconds
        logs["perf/all_to_all_s"] = par.comm_seconds()
        logs["perf/all_to_all_share"] = par.comm_seconds() / max(seconds, 1e-9)
        return logs

    @torch.no_grad()
    def heldout_metrics(self) -> dict[str, float]:
        """eval/loss (the training loss on held-out windows, fixed noise) and the one-step
        errors of train_local.evaluate, averaged over ranks."""
        if self.eval_batch is None:
            return {}
        self.model.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed + 17)
        loss, _ = self.model.loss(self.eval_batch, generator=generator)
        metrics = {"eval/loss": float(loss)}
        metrics.update(evaluate(self.model, self.eval_batch, generator=generator))
        self.model.train()
        return par.mean_over_ranks(metrics, self.layout, self.device)

    # ------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, folder: Path, step: int) -> None:
        """Collective: every rank writes its part of the checkpoint into ``folder``."""
        lay = self.layout
        full_state = par.gather_state(self.model.state_dict(), lay, self.cfg.model.moe.num_experts)
        if lay.is_chief:
            self.full_model.load_state_dict(
                {k: v.cpu() for k, v in full_state.items()}, strict=True
            )
            self.full_model.save(folder / WEIGHTS_FILE)
            state = {
                "step": step,
                "world_size": lay.world_size,
                "expert_parallel_size": lay.ep_size,
                "engine": self.cfg.engine,
                "name": self.cfg.name,
            }
            (folder / "trainer_state.json").write_text(json.dumps(state, indent=2))
        (folder / f"data_rank{lay.rank}.json").write_text(json.dumps(self.sampler.state_dict()))
        if isinstance(self.engine, par.DeepSpeedEngine):
            self.engine.save(str(folder / "deepspeed"))
        else:
            torch.save(self.engine.state_dict(), folder / f"optimizer_rank{lay.rank}.pt")

    def load_checkpoint(self, folder: Path) -> int:
        """Restore from a checkpoint folder; returns the step it was taken at. Weights always;
        optimizer and data position only if the layout matches."""
        lay = self.layout
        state = json.loads((folder / "trainer_state.json").read_text())
        full = WorldModel.load(folder / WEIGHTS_FILE, expected_config=self.cfg.model)
        shard = par.shard_state(
            full.state_dict(), lay.ep_rank, lay.ep_size, self.cfg.model.moe.num_experts
        )
        same_layout = (
            state["world_size"] == lay.world_size
            and state["expert_parallel_size"] == lay.ep_size
            and state["engine"] == self.cfg.engine
        )
        if isinstance(self.engine, par.DeepSpeedEngine) and same_layout:
            self.engine.load(str(folder / "deepspeed"))
        else:
            self.model.load_state_dict(shard, strict=True)
            if same_layout:
                self.engine.load_state_dict(
                    torch.load(folder / f"optimizer_rank{lay.rank}.pt", weights_only=True)
                )
        data_file = folder / f"data_rank{lay.rank}.json"
        if same_layout and data_file.exists():
            self.sampler.load_state_dict(json.loads(data_file.read_text()))
        if not same_layout and lay.is_chief:
            print(
                f"[moedream] {folder}: layout differs from this run's: loaded the weights only (fresh optimizer and data order)"
            )
        return int(state["step"])

    # ---------------------------------------------------------------------------- logging

    def log(self, step: int, logs: dict[str, float]) -> None:
        """Rank 0: TensorBoard scalars, a progress line, a line of progress.jsonl."""
        if not self.layout.is_chief:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        for key, value in logs.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()
        with open(self.run_dir / PROGRESS_FILE, "a") as f:
            f.write(json.dumps({"event": "report", **logs}) + "\n")
        if self.cfg.progress:
            held = f" eval/loss {logs['eval/loss']:.4f}" if "eval/loss" in logs else ""
            print(
                f"[moedream] step {step}/{self.cfg.train.steps} loss {logs.get('wm/loss', float('nan')):.4f}{held} "
                f"tokens/s {logs.get('perf/tokens_per_s', 0):.0f} all-to-all {100 * logs.get('perf/all_to_all_share', 0):.1f}%",
                flush=True,
            )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


# --------------------------------------------------------------------------------------- loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function: config = {"train_config": DistributedTrainConfig.to_dict()}."""

    cfg = DistributedTrainConfig.from_dict(config["train_config"])
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    worker = Worker(cfg)
    worker.run_dir.mkdir(parents=True, exist_ok=True)
    start_step = _restore(worker, cfg)
    every = cfg.resolved_checkpoint_every
    if start_step == 0:
        _report(worker, 0, worker.heldout_metrics(), checkpoint=False)
    window: list[dict[str, float]] = []
    for step in range(start_step + 1, cfg.train.steps + 1):
        _maybe_fail(worker, step)
        window.append(worker.train_step())
        last = step == cfg.train.steps
        checkpoint = step % every == 0 or last
        if step % cfg.train.log_every == 0 or checkpoint:
            logs = _summarise(worker, window)
            window = []
            if step % cfg.train.eval_every == 0 or last:
                logs.update(worker.heldout_metrics())
            _report(worker, step, logs, checkpoint=checkpoint)
    worker.close()


def _restore(worker: Worker, cfg: DistributedTrainConfig) -> int:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step = worker.load_checkpoint(Path(folder))
        source = "latest checkpoint of this run"
    elif cfg.resume_from:
        step = worker.load_checkpoint(Path(cfg.resume_from))
        source = cfg.resume_from
    else:
        return 0
    if worker.layout.is_chief:
        print(f"[moedream] resumed at step {step} from {source}", flush=True)
        with open(worker.run_dir / PROGRESS_FILE, "a") as f:
            f.write(json.dumps({"event": "resumed", "step": step, "source": source}) + "\n")
    return step


def _summarise(worker: Worker, window: list[dict[str, float]]) -> dict[str, float]:
    """Mean of the steps since the last report, averaged over ranks; tokens/s of the slowest
    rank (the step time every rank waits for)."""
    keys = sorted(set.intersection(*(set(w) for w in window)))
    local = {k: float(np.mean([w[k] for w in window])) for k in keys}
    logs = par.mean_over_ranks(local, worker.layout, worker.device)
    slowest = par.max_over_ranks(local["perf/step_s"], worker.layout, worker.device)
    logs["perf/tokens_per_s"] = worker.tokens_per_step / max(slowest, 1e-9)
    return logs


def _report(worker: Worker, step: int, logs: dict[str, float], *, checkpoint: bool) -> None:
    import ray.train
    from ray.train import Checkpoint

    logs = {**logs, "step": step}
    worker.log(step, logs)
    if not checkpoint:
        ray.train.report(logs)
        return
    with tempfile.TemporaryDirectory(prefix="moedream_ckpt_") as tmp:
        worker.save_checkpoint(Path(tmp), step)
        ray.train.report(logs, checkpoint=Checkpoint.from_directory(tmp))


def _maybe_fail(worker: Worker, step: int) -> None:
    cfg, lay = worker.cfg, worker.layout
    if not cfg.fail_at_step or step != cfg.fail_at_step or lay.rank != min(1, lay.world_size - 1):
        return
    marker = worker.run_dir / FAILURE_MARKER
    if marker.exists():
        return
    marker.write_text(f"failed once at step {step}\n")
    raise InjectedFailure(
        f"fail_at_step={step}: injected worker failure (rank {lay.rank}) to test recovery"
    )
