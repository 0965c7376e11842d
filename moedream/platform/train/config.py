"""The typed config of a distributed world-model run, and the checks made before any worker
starts (cluster capacity, data path, parallel layout).

YAML layout (configs/world_model_distributed.yaml)::

    name: world_model_distributed
    data: runs/quickstart/data         # folder of Parquet episode shards
    storage_path: runs/ray_results     # required: checkpoints, TensorBoard, progress.jsonl
    num_workers: 2
    expert_parallel_size: 2            # P: each worker holds num_experts / P experts
    engine: native                     # or deepspeed (then model.moe.backend: deepspeed); a
                                       # dense FFN (moe.backend: dense) trains natively, P = 1
    train: {...}                       # TrainConfig (train.batch_size is the GLOBAL batch)
    model: {...}                       # WorldModelConfig
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from moedream.config import (
    ConfigBase,
    ConfigError,
    check,
    check_choice,
    check_positive,
    is_int,
)
from moedream.world_model.model import WorldModelConfig
from moedream.world_model.train_local import TrainConfig, warn_untrained_context

ENGINES = ("native", "deepspeed")


@dataclasses.dataclass
class DistributedTrainConfig(ConfigBase):
    name: str = "world_model_distributed"
    """Run name: the run's folder is <storage_path>/<name>."""
    data: str = ""
    """Folder (or file) of Parquet episode shards; each worker reads its own part."""
    storage_path: str = ""
    """Where Ray Train persists checkpoints (a shared filesystem path or a cloud URI on a
    multi-node cluster). Required: moedream never writes to ~/ray_results."""
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    """Logical CPUs per worker (fractions fit several workers on a laptop's local cluster)."""
    resources_per_worker: dict[str, float] = dataclasses.field(default_factory=dict)
    """Extra custom resources per worker, e.g. {moedream_train: 1} on the cluster/ YAMLs' GPU
    training nodes. Empty by default, so local runs fit a plain local cluster."""
    autoscaling: bool = False
    """The cluster adds nodes on demand: skip the check that it holds every worker right now."""
    expert_parallel_size: int = 2
    """P: ranks [kP, (k+1)P) form one expert-parallel group; groups are data parallel."""
    engine: Literal["native", "deepspeed"] = "native"
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0, 1 or 2; engine deepspeed only). ZeRO-3 does not support MoE."""
    max_failures: int = 1
    """Worker-group failures Ray Train recovers from (restarting from the latest checkpoint)."""
    checkpoint_every: int = 50
    """K: a checkpoint every K steps (and at the last step). train.checkpoint_every is the
    local trainer's and is ignored here."""
    keep_checkpoints: int = 2
    resume_from: str | None = None
    """A checkpoint folder of an earlier run to start from (weights, optimizer, step, data)."""
    fail_at_step: int = 0
    """Testing only: rank 1 raises once at this step (a marker file in the run folder keeps the
    restarted worker from failing again). 0 disables."""
    progress: bool = True
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    model: WorldModelConfig = dataclasses.field(default_factory=WorldModelConfig)

    # ------------------------------------------------------------------------------ validation

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check(bool(self.name) and "/" not in self.name, f"{prefix}name", self.name,
              "must be a non-empty folder name without '/'")  # fmt: skip
        check(bool(self.storage_path), f"{prefix}storage_path", self.storage_path,
              "is required: set it (or pass --storage-path) to a shared folder or URI; "
              "moedream never writes to ~/ray_results")  # fmt: skip
        for name in ("num_workers", "expert_parallel_size", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            check(is_int(value) and value > 0, f"{prefix}{name}", value, "must be an integer > 0")
        check(is_int(self.max_failures) and self.max_failures >= -1, f"{prefix}max_failures",
              self.max_failures, "must be an integer >= 0 (or -1: retry forever)")  # fmt: skip
        check(is_int(self.fail_at_step) and self.fail_at_step >= 0, f"{prefix}fail_at_step",
              self.fail_at_step, "must be an integer >= 0 (0 disables)")  # fmt: skip
        check_positive(f"{prefix}cpus_per_worker", self.cpus_per_worker, allow_zero=True)
        for key, amount in self.resources_per_worker.items():
            check_positive(f"{prefix}resources_per_worker.{key}", amount)
        check_choice(f"{prefix}engine", self.engine, ENGINES)
        self._validate_layout(prefix)
        self._validate_engine(prefix)

    def _validate_layout(self, prefix: str) -> None:
        p, n, e = self.expert_parallel_size, self.num_workers, self.model.moe.num_experts
        check(n % p == 0, f"{prefix}num_workers", n,
              f"must be a multiple of expert_parallel_size ({p}): workers form groups of P "
              f"consecutive ranks; use {max(p, n - n % p)} workers or a P that divides {n}")  # fmt: skip
        check(e % p == 0, f"{prefix}model.moe.num_experts", e,
              f"must be divisible by expert_parallel_size ({p}) so every rank holds "
              f"num_experts / P experts; change num_experts or expert_parallel_size")  # fmt: skip
        batch = self.train.batch_size
        check(batch % n == 0, f"{prefix}train.batch_size", batch,
              f"is the global batch and must be divisible by num_workers ({n})")  # fmt: skip
        warn_untrained_context(self.model.backbone.max_context, self.train.window)
        check(self.train.window <= self.model.backbone.max_context, f"{prefix}train.window",
              self.train.window, f"must be <= model.backbone.max_context "
              f"({self.model.backbone.max_context})")  # fmt: skip

    def _validate_engine(self, prefix: str) -> None:
        backend = self.model.moe.backend
        if self.engine == "native":
            check(self.zero_stage == 0, f"{prefix}zero_stage", self.zero_stage,
                  "applies to engine: deepspeed only; set it to 0 or use engine: deepspeed")  # fmt: skip
            check(backend in ("native", "dense"), f"{prefix}model.moe.backend", backend,
                  "must be 'native' or 'dense' with engine: native (DeepSpeed MoE layers need the "
                  "DeepSpeed engine to reduce their gradients); set engine: deepspeed to use them")  # fmt: skip
            # a dense FFN has no experts to shard: its workers are data parallel only
            check(backend != "dense" or self.expert_parallel_size == 1,
                  f"{prefix}expert_parallel_size", self.expert_parallel_size,
                  "must be 1 with model.moe.backend: dense (a dense FFN has no experts to "
                  "shard; every worker holds the whole model); set expert_parallel_size: 1")  # fmt: skip
            return
        check(backend == "deepspeed", f"{prefix}model.moe.backend", backend,
              "must be 'deepspeed' with engine: deepspeed (the engine reduces expert gradients "
              "of DeepSpeed MoE layers only); set model.moe.backend: deepspeed")  # fmt: skip
        check(self.zero_stage in (0, 1, 2), f"{prefix}zero_stage", self.zero_stage,
              "must be 0, 1 or 2: DeepSpeed ZeRO-3 does not partition MoE expert parameters")  # fmt: skip
        check(self.train.precision != "bf16", f"{prefix}train.precision", self.train.precision,
              "the DeepSpeed path trains in fp32 here; set train.precision: fp32 (or auto)")  # fmt: skip

    # ----------------------------------------------------------------------------- derived

    @property
    def per_worker_batch(self) -> int:
        return self.train.batch_size // self.num_workers

    @property
    def data_parallel_size(self) -> int:
        return self.num_workers // self.expert_parallel_size

    @property
    def resolved_checkpoint_every(self) -> int:
        return min(self.checkpoint_every, self.train.steps)

    def worker_resources(self) -> dict[str, float]:
        """What each worker asks Ray for (ScalingConfig.resources_per_worker)."""
        resources: dict[str, float] = {"CPU": float(self.cpus_per_worker)}
        if self.use_gpu:
            resources["GPU"] = 1.0
        resources.update({k: float(v) for k, v in self.resources_per_worker.items()})
        return resources

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> DistributedTrainConfig:
        """From YAML, with command-line overrides (None values are ignored) applied before
        validation, so a missing storage_path in the file can come from --storage-path."""
        from moedream.config import load_yaml

        data = load_yaml(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None


# --------------------------------------------------------------------------------- preflight


def check_data(cfg: DistributedTrainConfig) -> list[Path]:
    """The episode shards at cfg.data, or a ConfigError naming the field and the fix."""
    from moedream.data import EpisodeDataError, read_spec, shard_paths

    check(bool(cfg.data), "data", cfg.data, "is required: a folder of episode shards "
          "(`moedream collect --out DIR`), or pass --data")  # fmt: skip
    try:
        files = shard_paths(cfg.data)
        read_spec(files[0])
    except EpisodeDataError as err:
        raise ConfigError(f"config field `data` = {cfg.data!r} is invalid: {err}") from None
    return files


def check_cluster(cfg: DistributedTrainConfig, cluster: dict[str, float]) -> None:
    """Raise a ConfigError if ``cluster`` (ray.cluster_resources()) cannot hold the workers."""
    if cfg.autoscaling:
        return
    for key, per_worker in cfg.worker_resources().items():
        need = per_worker * cfg.num_workers
        have = float(cluster.get(key, 0.0))
        if need > have + 1e-9:
            fits = int(have // per_worker) if per_worker else cfg.num_workers
            raise ConfigError(
                f"the cluster cannot hold {cfg.num_workers} workers: they need {need:g} {key} "
                f"({per_worker:g} each) but the cluster has {have:g}. Lower num_workers (to at "
                f"most {fits}), lower cpus_per_worker / resources_per_worker, add nodes, or set "
                "autoscaling: true if the cluster scales up on demand"
            )
