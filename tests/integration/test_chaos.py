"""Faults injected into a running model-based training (MBMAPPO + Serve world model + gate).

One setup for the module: a tiny world model served by Ray Serve, the coherence gate actor and
ONE MBMAPPO algorithm (one remote env runner, restart_failed_env_runners, a world-model
retrain every 2 iterations). Each test injects one fault into its next iterations, then checks
from the counters' deltas that the run went on: every real step counted once, imagined rows
either judged by the gate or counted as dropped, imagined steps learnt exactly once, and the
failure logged with its cause. The tests run in file order on the same algorithm, so counters
must also continue across them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from moedream.data import collect_episodes
from moedream.platform.agents import AgentsConfig, build_algo_config
from moedream.platform.model_based import ServedWorldModelImaginerFactory
from moedream.platform.serve.deploy import push_checkpoint, served_checkpoint
from moedream.policies.algorithm import METRICS
from moedream.policies.metrics import iteration_metrics
from moedream.world_model.train_local import TrainConfig, train_local
from tests.world_models import served_config

# slow as a whole: the shared setup (train + serve a world model, a gate, an MBMAPPO run with
# a remote env runner) dominates, and the tests run in order on that one run
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

APP, DEPLOYMENT, NAMESPACE = "chaos_wm", "WorldModelDeployment", "moedream_test"
ENV_OPTIONS = {"layout": "cramped_room", "horizon": 100, "shaped_reward_weight": 1.0}
BATCH, HORIZON, RATIO = 200, 4, 0.2
ROWS = math.ceil(RATIO * BATCH / HORIZON)  # imagined rollouts per round
RETRY = {"attempts": 4, "timeout_s": 90.0, "backoff_s": 0.5, "max_backoff_s": 2.0}
REPORT_ENV = "MOEDREAM_CHAOS_REPORT"
"""If set: a JSON file the module writes the suite's table to (benchmarks/chaos_suite.py)."""


@pytest.fixture(scope="module")
def loop(serve_on_loopback, tmp_path_factory):
    """Served tiny world model + gate actor + one MBMAPPO run, shared by every test."""
    from ray import serve

    from moedream.coherence.gate import GateActorConfig, get_or_create_gate
    from moedream.coherence.kernel import Normalizer
    from moedream.data import load_windows
    from moedream.platform.serve import build_app

    root = tmp_path_factory.mktemp("chaos")
    data = root / "data"
    collect_episodes("overcooked", ENV_OPTIONS, 3, data / "shard_0.parquet", seed=0)
    train = TrainConfig(steps=10, batch_size=8, window=4, warmup=2, eval_every=10,
                        checkpoint_every=10, log_every=5, holdout=0.0)  # fmt: skip
    train_local(train, data, root / "base_model", model_config=served_config(), progress=False)
    checkpoint = str(root / "base_model" / "world_model.safetensors")
    args = {"checkpoint": checkpoint, "num_threads": 1, "max_batch": 256, "max_horizon": 8}
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    push_checkpoint(checkpoint, app_name=APP, deployment_name=DEPLOYMENT)  # declarative once

    gate_cfg = GateActorConfig(actor_name=f"chaos_gate_{uuid.uuid4().hex[:6]}",
                               namespace=NAMESPACE, reimaginer_app=APP,
                               reimaginer_deployment=DEPLOYMENT)  # fmt: skip
    phi = Normalizer.fit(load_windows(data, HORIZON)[1]["obs"], gate_cfg.kernel)
    state_dir = root / "gate_state"
    gate = get_or_create_gate(gate_cfg, phi, state_dir)

    algo = algo_config(root, data, gate_cfg.actor_name).build_algo()
    env = {"root": root, "data": data, "gate_name": gate_cfg.actor_name, "algo": algo,
           "checkpoint": checkpoint, "history": [], "table": [],
           "make_gate": lambda: get_or_create_gate(gate_cfg, phi, state_dir),
           "gate": gate}  # fmt: skip
    yield env
    if os.environ.get(REPORT_ENV):
        Path(os.environ[REPORT_ENV]).write_text(json.dumps(env["table"], indent=1))
    algo.stop()
    import ray

    ray.kill(env["gate"], no_restart=True)
    serve.delete(APP)


def algo_config(root: Path, data: Path, gate_name: str, *, runners: int = 1, retrain: int = 2):
    cfg = AgentsConfig.from_dict(
        {
            "env": "overcooked",
            "env_options": ENV_OPTIONS,
            "num_env_runners": runners,
            "train_batch_size": BATCH,
            "minibatch_size": 100,
            "num_epochs": 1,
            "team": {"embedding_dim": 16, "perceiver_hidden": [16], "planner_hidden": [16],
                     "reflector_hidden": [16]},
            "imagination": {"enabled": True, "provider": "world_model", "horizon": HORIZON,
                            "imagined_ratio": RATIO, "serve_app_name": APP, "gate": True},
        }
    )  # fmt: skip
    factory = ServedWorldModelImaginerFactory(
        "overcooked",
        app_name=APP,
        checkpoint_dir=str(root / "world_model"),
        base_data_path=str(data),
        retrain_steps=2,
        retrain_batch_size=8,
        retrain_warmup=0,
        eval_rows=32,
        swap_timeout_s=240.0,
        gate_actor_name=gate_name,
        gate_namespace=NAMESPACE,
        retry=RETRY,
    )
    config = build_algo_config(cfg, logdir_root=str(root / "rllib"))
    config.fault_tolerance(restart_failed_env_runners=True)
    return config.model_based(
        imagination=config.imagination.replace(world_model_retrain_every=retrain),
        imagination_provider=factory,
    )


# ---------------------------------------------------------------------------------------------
# helpers: train, counters, deltas


COUNTERS = ("real_env_steps_lifetime", "imagined_env_steps_lifetime", "imagination_skipped_total",
            "imagined_rows_dropped_total", "gate_approve_total", "gate_refine_total",
            "gate_reject_total", "provider_failures_imagine_total",
            "provider_failures_gate_total", "provider_failures_observe_total",
            "provider_failures_evaluate_total", "provider_failures_retrain_total")  # fmt: skip


def counters(loop) -> dict[str, float]:
    """The run's lifetime counters after its last iteration (0 before any)."""
    if not loop["history"]:
        return dict.fromkeys(COUNTERS, 0.0)
    md = loop["history"][-1][METRICS]
    return {k: float(md.get(k, 0.0)) for k in COUNTERS}


def train(loop, iterations: int = 1) -> list[dict]:
    out = []
    for _ in range(iterations):
        result = loop["algo"].train()
        loop["history"].append(result)
        out.append(result)
    return out


def deltas(before: dict[str, float], loop) -> dict[str, float]:
    after = counters(loop)
    return {k: after[k] - before[k] for k in COUNTERS}


def verdicts(d: dict[str, float]) -> float:
    return d["gate_approve_total"] + d["gate_refine_total"] + d["gate_reject_total"]


def assert_accounted(results: list[dict], d: dict[str, float], *, sampled: int) -> None:
    """Real steps counted once per sampling iteration; every imagined row judged or counted
    dropped; imagined steps learnt exactly once (both agents); RLlib agrees on real steps."""
    assert d["real_env_steps_lifetime"] == BATCH * sampled
    rounds_imagined = len(results) - d["imagination_skipped_total"]  # one round per iteration
    skipped_with_rows = d["imagined_rows_dropped_total"] / ROWS
    assert verdicts(d) == ROWS * rounds_imagined
    assert verdicts(d) + d["imagined_rows_dropped_total"] == ROWS * (
        rounds_imagined + skipped_with_rows
    )
    imagined = sum(iteration_metrics(r)["charts/imagined_env_steps_iter"] for r in results)
    learnt = sum(iteration_metrics(r)["learner/imagined_agent_steps"] for r in results)
    assert d["imagined_env_steps_lifetime"] == imagined
    assert learnt == 2 * imagined  # each kept imagined step learnt once, for both agents
    md = results[-1][METRICS]
    assert (
        md["real_env_steps_lifetime"]
        == results[-1]["env_runners"]["num_env_steps_sampled_lifetime"]
    )


def note(loop, fault: str, did: str, results: list[dict], *, repeated: int = 0) -> None:
    """A row of the suite's table. Time lost: the wall-clock of ``results`` minus that of as
    many fault-free iterations of the same kind (with or without a retrain, from the first
    test) as sampled real steps; an iteration that sampled nothing is lost whole."""
    base = {r["training_iteration"] % 2: r["time_this_iter_s"] for r in loop["history"][:2]}
    lost = sum(r["time_this_iter_s"] - base[r["training_iteration"] % 2] * _sampled(r)
               for r in results)  # fmt: skip
    loop["table"].append({"fault": fault, "did": did, "real_steps_repeated": repeated,
                          "time_lost_s": round(lost, 1)})  # fmt: skip


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ---------------------------------------------------------------------------------------------
# the faults (in file order, on one run)


def test_the_run_imagines_and_retrains_without_faults(loop):
    before = counters(loop)
    results = train(loop, 2)
    d = deltas(before, loop)
    assert_accounted(results, d, sampled=2)
    assert d["imagination_skipped_total"] == 0 and verdicts(d) == 2 * ROWS
    assert results[-1][METRICS]["provider_wm_checkpoint_version"] == 1  # retrained at it. 1


REPEATED = ("charts/team_return", "imagination/real_reward_per_step",
            "imagination/imagined_reward_per_step", "gate/approve_rate", "gate/refine_rate",
            "provider/wm_eval_reward_mae", "provider/wm_eval_obs_rel_err",
            "provider/wm_retrain_loss", "losses/planner/total_loss",
            "losses/reflector/total_loss")  # fmt: skip


def test_same_seed_repeats_real_returns_and_imagined_rewards(loop):
    """A second run with the same config and seed (PYTHONHASHSEED=0, from the same served
    checkpoint and gate) repeats the first test's run exactly: real returns, imagined rewards,
    the served model's held-out scores, gate verdicts, losses and the retrained checkpoint."""
    first = [iteration_metrics(r) for r in loop["history"][:2]]
    push_checkpoint(loop["checkpoint"], app_name=APP, deployment_name=DEPLOYMENT)
    algo = algo_config(loop["root"], loop["data"], loop["gate_name"]).build_algo()
    try:
        second = [iteration_metrics(algo.train()) for _ in range(2)]
    finally:
        algo.stop()
    for it, (a, b) in enumerate(zip(first, second, strict=True)):
        keys = [k for k in REPEATED if k in a or k in b]  # the retrain loss: iteration 1 only
        differ = {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}
        assert not differ, f"iteration {it}: {differ}"
        assert all(math.isfinite(a[k]) for k in keys), a
    assert "provider/wm_retrain_loss" in second[1]
    ours = loop["algo"].provider.retrainer.checkpoint_id
    assert served_checkpoint(APP, DEPLOYMENT)["id"] == ours  # the same retrained weights


def test_serve_replica_killed_during_imagination(loop, caplog):
    """The replica dies between two steps of an imagination round: the step's request is
    retried (same seed) on the replica Serve starts instead, and the round completes."""
    import ray
    from ray import serve

    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)
    victim = handle.stats.remote().result(timeout_s=60)
    provider = loop["algo"].provider
    original = provider.imagine

    def imagine_and_kill(start_obs, policy):
        act, calls = policy.act, []

        def act_then_kill(obs):
            calls.append(1)
            if len(calls) == 2:  # after the first imagined step's request
                ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
            return act(obs)

        policy.act = act_then_kill
        return original(start_obs, policy)

    provider.imagine = imagine_and_kill
    before = counters(loop)
    try:
        with caplog.at_level(logging.WARNING):
            results = train(loop, 1)
    finally:
        del provider.imagine
    d = deltas(before, loop)
    assert_accounted(results, d, sampled=1)
    assert d["imagination_skipped_total"] == 0 and verdicts(d) == ROWS  # nothing lost
    assert d["provider_failures_imagine_total"] == 0
    after = handle.stats.remote().result(timeout_s=60)
    assert after["actor_id"] != victim["actor_id"]  # a new replica answered
    assert after["checkpoint_id"] == victim["checkpoint_id"]  # serving the same model
    retried = warnings_of(caplog).count("imagine request: attempt")
    note(loop, "Serve replica killed between two imagination steps",
         f"round completed on the new replica ({retried} request attempts retried), 0 rounds "
         "skipped, all rows judged", results)  # fmt: skip


def test_gate_actor_killed_during_a_judge_call_restarts_and_counts_once(loop):
    """ray.kill(no_restart=False) just before the round's first judge call is sent: the actor
    restarts (max_restarts -1), reloads its persisted counters and Ray runs the call on the new
    actor; the round is not lost. (Killed once, synchronously: a kill on a timer raced the
    call and sometimes landed after it.)"""
    import ray

    provider = loop["algo"].provider
    original = provider.gate
    gate = loop["gate"]
    starts = ray.get(gate.ping.remote())
    killed = []

    def gate_and_kill(trajs):
        if not killed:
            killed.append(True)
            ray.kill(gate, no_restart=False)
        return original(trajs)

    provider.gate = gate_and_kill
    before = counters(loop)
    stats_before = ray.get(gate.stats.remote())
    try:
        results = train(loop, 1)
    finally:
        del provider.gate
    d = deltas(before, loop)
    assert_accounted(results, d, sampled=1)
    assert d["imagination_skipped_total"] == 0 and verdicts(d) == ROWS
    assert ray.get(gate.ping.remote()) > starts  # it did restart
    judged = ray.get(gate.stats.remote())["gate/overcooked/team/judged"]
    # counters continue from the persisted state; at-least-once: a call killed between its
    # write and its reply may be counted twice by the gate (never by MBMAPPO)
    assert stats_before["gate/overcooked/team/judged"] + ROWS <= judged
    assert judged <= stats_before["gate/overcooked/team/judged"] + 2 * ROWS
    counted = judged - stats_before["gate/overcooked/team/judged"]
    note(loop, "gate actor killed (restartable) as a judge call is sent",
         f"actor restarted, call retried by Ray; 0 rounds skipped; the gate counted {counted:.0f} "
         f"judgements for {ROWS} rows", results)  # fmt: skip


def test_gate_actor_gone_skips_imagination_counted_then_resumes(loop, caplog):
    """The gate is killed for good as it judges: the round's imagined rows are dropped and
    counted, the failure is logged with its cause; a new gate (same state folder) continues
    the counters and imagination resumes."""
    import ray

    provider = loop["algo"].provider
    original = provider.gate
    gate = loop["gate"]
    judged_before = ray.get(gate.stats.remote())["gate/overcooked/team/judged"]

    def kill_then_gate(trajs):
        ray.kill(gate, no_restart=True)
        time.sleep(0.5)  # the kill is asynchronous
        return original(trajs)

    provider.gate = kill_then_gate
    before = counters(loop)
    try:
        with caplog.at_level(logging.WARNING):
            results = train(loop, 1)
    finally:
        del provider.gate
    d = deltas(before, loop)
    assert_accounted(results, d, sampled=1)
    assert d["imagination_skipped_total"] == 1 and d["imagined_rows_dropped_total"] == ROWS
    assert d["provider_failures_gate_total"] == 1 and verdicts(d) == 0
    assert iteration_metrics(results[0])["charts/imagined_env_steps_iter"] == 0
    log = warnings_of(caplog)
    assert (
        "provider gate failed (" in log and f"gate actor {provider.factory.gate_actor_name}" in log
    )
    note(loop, "gate actor killed for good during a judge call",
         f"round skipped after {RETRY['attempts']} attempts, {ROWS} imagined rows dropped and "
         "counted; real batch learnt; new gate continues its counters", results)  # fmt: skip

    # a new gate actor (same name and state folder) takes over for the next iteration
    loop["gate"] = loop["make_gate"]()
    before = counters(loop)
    results = train(loop, 1)
    d = deltas(before, loop)
    assert_accounted(results, d, sampled=1)
    assert d["imagination_skipped_total"] == 0 and verdicts(d) == ROWS
    judged = ray.get(loop["gate"].stats.remote())["gate/overcooked/team/judged"]
    assert judged == judged_before + ROWS  # the new actor continued the persisted counters


def test_env_runner_killed_is_restarted_and_no_step_counted_twice(loop):
    """RLlib's restart_failed_env_runners: Ray restarts the SIGKILLed runner process; the
    iterations before it is back sample nothing (so learn and imagine nothing) and count no
    real step; then sampling, imagination and the counters go on."""
    import os
    import signal

    import ray

    algo = loop["algo"]
    [runner] = algo.env_runner_group._worker_manager.actors().values()
    pid = ray.get(runner.__ray_call__.remote(lambda _: os.getpid()))
    os.kill(pid, signal.SIGKILL)  # the process dies as in a crash
    before, results, start = counters(loop), [], time.monotonic()
    while not results or not _sampled(results[-1]):  # until the restarted runner samples
        assert time.monotonic() - start < 300, "the env runner never came back"
        results += train(loop, 1)
    results += train(loop, 1)
    d = deltas(before, loop)
    empty = [r for r in results if not _sampled(r)]
    assert empty, "the kill went unnoticed"
    assert d["real_env_steps_lifetime"] == BATCH * 2  # only the two sampling iterations
    assert algo.env_runner_group.num_healthy_remote_workers() == 1
    assert verdicts(d) == 2 * ROWS and d["imagination_skipped_total"] == 0
    full = [r for r in results if _sampled(r)]
    imagined = sum(iteration_metrics(r)["charts/imagined_env_steps_iter"] for r in full)
    assert d["imagined_env_steps_lifetime"] == imagined
    note(loop, "env runner process SIGKILLed",
         f"{len(empty)} iteration(s) sampled nothing while Ray restarted the runner (no update, "
         "no imagination, no step counted); then sampling went on", results)  # fmt: skip


def _sampled(result: dict) -> bool:
    """The iteration sampled real steps (an iteration without a healthy runner logs none)."""
    value = result[METRICS].get("real_env_steps", float("nan"))
    return math.isfinite(value) and value > 0


def test_a_retrain_that_raises_keeps_the_served_model(loop, caplog, tmp_path):
    """The retrain's checkpoint folder cannot be created (a file is in the way): the failure is
    logged and counted, the old checkpoint keeps serving and imagination goes on."""
    provider = loop["algo"].provider
    served_before = served_checkpoint(APP, DEPLOYMENT)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    good_dir = provider.factory.checkpoint_dir
    provider.factory.checkpoint_dir = str(blocker / "world_model")
    before = counters(loop)
    try:
        with caplog.at_level(logging.WARNING):
            results = train(loop, 2)  # the second iteration retrains
    finally:
        provider.factory.checkpoint_dir = good_dir
    d = deltas(before, loop)
    assert_accounted(results, d, sampled=2)
    assert d["provider_failures_retrain_total"] == 1 and d["imagination_skipped_total"] == 0
    assert verdicts(d) == 2 * ROWS
    assert served_checkpoint(APP, DEPLOYMENT)["id"] == served_before["id"]
    assert "provider retrain failed (NotADirectoryError)" in warnings_of(caplog)
    note(loop, "world-model retrain raises (checkpoint folder cannot be created)",
         "retrain counted failed, the old checkpoint kept serving, imagination went on",
         results)  # fmt: skip


def test_a_hot_swap_to_a_corrupt_checkpoint_is_refused(loop, caplog, monkeypatch):
    """The retrained checkpoint's bytes change after it was written (its sha256 no longer
    matches): the swap is refused before any replica loads it; the old model keeps serving."""
    from moedream.platform import served_retrain

    provider = loop["algo"].provider
    version = provider.retrainer.version
    served_before = served_checkpoint(APP, DEPLOYMENT)
    write = served_retrain.write_versioned_checkpoint

    def write_then_corrupt(*args, **kwargs):
        path = write(*args, **kwargs)
        raw = bytearray(path.read_bytes())
        raw[-4] ^= 0xFF  # a tensor byte (the header comes first)
        path.write_bytes(bytes(raw))
        return path

    monkeypatch.setattr(served_retrain, "write_versioned_checkpoint", write_then_corrupt)
    before = counters(loop)
    with caplog.at_level(logging.WARNING):
        results = train(loop, 2)
    d = deltas(before, loop)
    assert_accounted(results, d, sampled=2)
    assert d["provider_failures_retrain_total"] == 1 and d["imagination_skipped_total"] == 0
    log = warnings_of(caplog)
    assert "provider retrain failed (CheckpointError)" in log and "sha256" in log
    assert served_checkpoint(APP, DEPLOYMENT)["id"] == served_before["id"]
    assert provider.retrainer.version == version  # the refused checkpoint is not ours
    note(loop, "hot swap to a checkpoint with a bad sha256",
         "swap refused before any replica loaded it; retrain counted failed; old model kept "
         "serving; the next retrain swapped", results)  # fmt: skip

    monkeypatch.undo()  # the next retrain swaps again
    results = train(loop, 2)
    assert provider.retrainer.version == version + 1
    assert served_checkpoint(APP, DEPLOYMENT)["id"] != served_before["id"]
    assert np.isfinite(results[-1][METRICS]["provider_wm_retrain_loss"])


def test_driver_sigterm_then_resume_from_the_last_checkpoint(loop, tmp_path):
    """A driver process trains and checkpoints every iteration; SIGTERM arrives once it has
    announced its second checkpoint. Restored from the last checkpoint it announced, the run
    continues: iteration, real steps and every counter go on from the checkpoint (the killed
    iteration's steps are sampled again, once), and the provider's retrain state is back."""
    import os
    import signal
    import subprocess
    import sys

    import ray

    from moedream.policies.algorithm import MBMAPPO

    address = ray.get_runtime_context().gcs_address
    out = tmp_path / "checkpoints"
    args = [sys.executable, "-m", "tests.integration.chaos_driver", address, str(loop["root"]),
            str(loop["data"]), loop["gate_name"], str(out)]  # fmt: skip
    root = Path(__file__).resolve().parents[2]
    driver = subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    try:
        saved = [driver.stdout.readline().split() for _ in range(2)]
        assert [line[:2] for line in saved] == [["saved", "1"], ["saved", "2"]], saved
        killed_at = time.monotonic()
        driver.send_signal(signal.SIGTERM)  # during the third iteration (or its save)
        assert driver.wait(timeout=120) != 0
        saved += [line.split() for line in driver.stdout.read().splitlines() if line.strip()]
    finally:
        driver.kill()
    last = int(saved[-1][1])  # the last checkpoint the driver announced as complete
    restored = MBMAPPO.from_checkpoint(str(out / f"iter_{last}"))
    try:
        saved_state = restored.provider.get_state()
        result = restored.train()
        resumed_s = time.monotonic() - killed_at
    finally:
        restored.stop()
    md = result[METRICS]
    assert restored.iteration == last + 1
    assert md["real_env_steps_lifetime"] == (last + 1) * BATCH == float(saved[-1][2]) + BATCH
    verdict_total = md["gate_approve_total"] + md["gate_refine_total"] + md["gate_reject_total"]
    assert verdict_total == (last + 1) * ROWS
    assert md["imagination_skipped_total"] == 0
    assert saved_state["checkpoint_version"] == last // 2  # retrains at iterations 1, 3, ...
    base = {r["training_iteration"] % 2: r["time_this_iter_s"] for r in loop["history"][:2]}
    loop["table"].append({
        "fault": "SIGTERM of the driver after its 2nd checkpoint",
        "did": f"restored from the iteration-{last} checkpoint; iteration, real steps and "
               "counters continued; the killed iteration re-run",
        "real_steps_repeated": f"<= {BATCH} (the killed iteration's, sampled again)",
        "time_lost_s": round(resumed_s - base[(last + 1) % 2], 1),
    })  # fmt: skip
