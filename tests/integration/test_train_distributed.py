"""Distributed world-model training on the shared local Ray cluster: expert-parallel workers
compute what the single-process model computes (native and DeepSpeed engines), a 2-worker run
learns, survives an injected worker failure by resuming from its latest checkpoint, and
continues from a checkpoint with --resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moedream.config import ConfigError
from moedream.data import collect_episodes
from moedream.platform.train import (
    DistributedTrainConfig,
    build_trainer,
    preflight,
    run_distributed,
)
from moedream.platform.train.check import (
    NOISE_SEED,
    backbone_features,
    fixed_batch,
    parallel_check_loop,
    rank_slice,
    reference_model,
)
from moedream.platform.train.loop import PROGRESS_FILE
from moedream.world_model.model import WorldModel
from moedream.world_model.train_local import lr_schedule

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def episodes(tmp_path_factory) -> str:
    """4 shards x 3 episodes x 30 steps of 2-agent HalfCheetah (random policy)."""
    folder = tmp_path_factory.mktemp("episodes")
    for shard in range(4):
        collect_episodes(
            "mamujoco", {"max_episode_steps": 30}, 3, folder / f"shard-{shard}.parquet", seed=shard
        )
    return str(folder)


def tiny_config(data: str, storage: str, **changes) -> DistributedTrainConfig:
    engine = changes.pop("engine", "native")
    train = {"steps": 12, "batch_size": 8, "window": 4, "lr": 3e-3, "warmup": 2, "log_every": 4,
             "eval_every": 12, "eval_windows": 16, "holdout": 0.25, "precision": "fp32"}  # fmt: skip
    train.update(changes.pop("train", {}))
    base = {
        "name": "tiny",
        "data": data,
        "storage_path": storage,
        "num_workers": 2,
        "expert_parallel_size": 2,
        "engine": engine,
        "checkpoint_every": 4,
        "progress": False,
        "train": train,
        "model": {
            "d_model": 32,
            "cond_dim": 32,
            "moe": {"d_hidden": 32, "num_experts": 4, "backend": engine},
            "diffusion": {"hidden": 32, "layers": 1},
        },
    }
    base.update(changes)
    return DistributedTrainConfig.from_dict(base)


# ------------------------------------------------------------------ errors before any worker


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"model": {"moe": {"num_experts": 3}}}, "model.moe.num_experts"),
        ({"num_workers": 3}, "num_workers"),
        ({"engine": "deepspeed", "zero_stage": 3}, "zero_stage"),
        ({"engine": "native", "zero_stage": 1}, "zero_stage"),
        ({"storage_path": ""}, "storage_path"),
        ({"model": {"moe": {"backend": "dense"}}}, "expert_parallel_size"),  # P = 2: no experts
    ],
)
def test_impossible_settings_are_refused(tmp_path, changes, field):
    data = {
        "name": "x",
        "data": str(tmp_path),
        "storage_path": str(tmp_path),
        "expert_parallel_size": 2,
    }
    engine = changes.get("engine", "native")
    data.update({"model": {"moe": {"backend": engine}}}, **changes)
    if "model" in changes:
        data["model"] = {"moe": {"backend": engine, **changes["model"]["moe"]}}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        DistributedTrainConfig.from_dict(data)


def test_cluster_capacity_and_data_are_checked_first(ray_cluster, episodes, tmp_path):
    cpus = ray_cluster.cluster_resources()["CPU"]
    too_big = tiny_config(episodes, str(tmp_path), num_workers=2, cpus_per_worker=cpus)
    with pytest.raises(ConfigError, match="cannot hold 2 workers"):
        preflight(too_big)
    custom = tiny_config(episodes, str(tmp_path), resources_per_worker={"moedream_train": 1})
    with pytest.raises(ConfigError, match="moedream_train"):
        preflight(custom)
    preflight(custom.replace(autoscaling=True))  # nodes with it may appear on demand
    with pytest.raises(ConfigError, match="data"):
        preflight(tiny_config(str(tmp_path / "missing"), str(tmp_path)))


# ---------------------------------------------------------------- equivalence with 1 process


@pytest.mark.slow
def test_expert_parallel_matches_single_process(ray_cluster, episodes, tmp_path):
    """Native and DeepSpeed engines and the dense FFN (native, data parallel), one worker-group
    start: outputs, losses, gradients and the first AdamW step equal the single-process
    model's."""
    configs = {
        e: tiny_config(episodes, str(tmp_path / "ray"), engine=e, name="check")
        for e in ("native", "deepspeed")
    }
    # the dense-FFN ablation: data parallel only, through the same native engine
    dense = configs["native"].to_dict()
    dense["expert_parallel_size"] = 1
    dense["model"]["moe"]["backend"] = "dense"
    configs["dense"] = DistributedTrainConfig.from_dict(dense)
    checks = [
        {"train_config": c.to_dict(), "out_dir": str(tmp_path / e)} for e, c in configs.items()
    ]
    result = build_trainer(
        configs["native"], loop=parallel_check_loop, loop_config={"checks": checks}
    ).fit()
    assert result.error is None, result.error
    for engine, cfg in configs.items():
        records = [
            torch.load(tmp_path / engine / f"rank{r}.pt", weights_only=False) for r in range(2)
        ]
        compare_with_single_process(cfg, records, engine)


def compare_with_single_process(
    cfg: DistributedTrainConfig, records: list[dict], engine: str
) -> None:
    spec, batch = fixed_batch(cfg)
    reference = reference_model(cfg, spec, batch)
    losses = []
    for rank, record in enumerate(records):
        mine = rank_slice(batch, rank, 2)
        torch.testing.assert_close(record["features"], backbone_features(reference, mine), **TOL)
        reference.train()
        torch.manual_seed(cfg.train.seed + NOISE_SEED + rank)
        loss, _ = reference.loss(mine)
        assert record["loss"] == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-5), engine
        losses.append(loss)
    torch.stack(losses).mean().backward()  # the objective: the mean of the ranks' losses

    grads, params = records[0]["grads"], records[0]["params"]
    assert grads is not None
    layer = ".dense." if cfg.model.moe.backend == "dense" else ".experts."
    assert any(layer in name for name in grads), f"the model has no {layer} parameters"
    for name, param in reference.named_parameters():
        torch.testing.assert_close(
            grads[name], param.grad, **TOL, msg=lambda m, n=name: f"{engine} grad {n}: {m}"
        )
    optimizer = torch.optim.AdamW(
        reference.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    lr_schedule(optimizer, cfg.train)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.train.grad_clip)
    optimizer.step()
    for name, param in reference.named_parameters():
        # Adam's first step is lr * g / (|g| + eps): where |g| ~ eps (1e-8) float noise in g
        # flips it, so compare the update where the gradient is well above eps.
        clear = param.grad.abs() > 1e-6
        torch.testing.assert_close(
            params[name][clear],
            param.detach()[clear],
            **TOL,
            msg=lambda m, n=name: f"{engine} param {n}: {m}",
        )


# ---------------------------------------------------------- learning, failure, resumption


def progress(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / PROGRESS_FILE).read_text().splitlines()]


@pytest.mark.slow
def test_two_workers_learn_recover_and_resume(ray_cluster, episodes, tmp_path):
    storage = tmp_path / "ray"
    every, fail_at = 4, 10
    cfg = tiny_config(episodes, str(storage), name="learn", fail_at_step=fail_at, max_failures=1)
    result = run_distributed(cfg)
    run_dir = storage / "learn"
    assert (run_dir / ".injected_failure").exists(), "the failure was not injected"

    events = progress(run_dir)
    # A report (and checkpoint) every 4 steps; rank 1 fails at step 10; the restarted workers
    # resume from the checkpoint of step 8, so only steps 9-10 run twice (< the interval).
    resumed = [e["step"] for e in events if e["event"] == "resumed"]
    assert resumed == [8], events
    assert fail_at - resumed[0] < every
    records = [e for e in events if e["event"] == "report"]
    steps = [r["step"] for r in records]
    assert steps == [0, 4, 8, 12], steps
    held = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert held[-1] < 0.8 * held[0], f"held-out loss did not fall: {held}"
    assert records[-1]["perf/tokens_per_s"] > 0 and 0 <= records[-1]["perf/all_to_all_share"] < 1
    assert any(k.startswith("moe/load_l0_e") for k in records[-1])
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    checkpoint = Path(result.checkpoint.path)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == cfg.train.steps
    assert sorted(p.name for p in checkpoint.glob("optimizer_rank*.pt")) == [
        "optimizer_rank0.pt",
        "optimizer_rank1.pt",
    ]
    model = WorldModel.load(checkpoint / "world_model.safetensors", expected_config=cfg.model)
    assert model.spec.n_agents == 2
    kept = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    assert len(kept) == cfg.keep_checkpoints

    # --resume: a new run continues the step count from the checkpoint.
    more = cfg.replace(name="resumed", resume_from=str(checkpoint), fail_at_step=0,
                       train=cfg.train.replace(steps=cfg.train.steps + every))  # fmt: skip
    run_distributed(more)
    events = progress(storage / "resumed")
    assert [e["step"] for e in events if e["event"] == "resumed"] == [cfg.train.steps]
    assert [e["step"] for e in events if e["event"] == "report"] == [cfg.train.steps + every]
