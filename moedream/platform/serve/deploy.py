"""Which world-model checkpoint a Serve deployment serves, and hot-swapping a new one in.

``push_checkpoint`` changes only the deployment's ``user_config.checkpoint`` through Serve's
declarative deploy, so the live replicas ``reconfigure`` in place (see its docstring).
"""

from __future__ import annotations

import time
from typing import Any

from moedream.platform.ray_setup import job_runtime_env
from moedream.platform.serve.runner import checkpoint_fingerprint, weights_file
from moedream.world_model.model import FORMAT
from moedream.world_model.safetensors_file import read_checkpoint

BUILD_APP_IMPORT_PATH = "moedream.platform.serve:build_app"


def served_checkpoint(app_name: str, deployment_name: str) -> dict[str, Any]:
    """``{"id", "path", ...}`` of the checkpoint the deployment serves (its ``info``)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment_name, app_name=app_name)
    return handle.info.remote().result(timeout_s=60)["checkpoint"]


def push_checkpoint(
    checkpoint: str, *, app_name: str, deployment_name: str, timeout_s: float = 180.0
) -> str:
    """Make the deployment serve ``checkpoint``; returns its checkpoint id once served.

    Only the deployment's ``user_config.checkpoint`` changes, through Serve's declarative
    deploy (what ``serve deploy`` sends): with the application's code version (import path,
    args, runtime env) unchanged, Serve calls ``reconfigure`` on the live replicas, which swap
    the model in place without dropping requests. ``serve.run`` cannot do that: it gives every
    run a new code version and so replaces the replicas. An application first deployed with
    ``serve.run`` is converted once (``build_app`` with its current user_config as args: one
    replacement of the replicas), after which every push is an in-place reconfigure. Other
    applications deployed from a config are kept as they are. A checkpoint whose tensors
    do not match their stored sha256 raises CheckpointError before anything is deployed.
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    # A corrupt file would fail in the replicas' reconfigure and take the deployment down:
    # refuse it here (CheckpointError naming the file) while the old model keeps serving.
    read_checkpoint(weights_file(checkpoint), kind="world-model", fmt=FORMAT)
    expected = checkpoint_fingerprint(checkpoint)[0]
    client = _get_global_client()
    details = client.get_serve_details()
    apps = details.get("applications", {})
    if app_name not in apps:
        raise RuntimeError(
            f"Serve application {app_name!r} is not running (running: {sorted(apps)}); deploy "
            "the world model first (moedream serve / the quickstart)"
        )
    configs = [
        dict(app["deployed_app_config"])
        for name, app in apps.items()
        if name != app_name and app.get("deployed_app_config")
    ]
    configs.append(_app_config(apps[app_name], deployment_name, checkpoint))
    http = details.get("http_options") or {}
    schema = ServeDeploySchema.model_validate(
        {
            "applications": configs,
            "http_options": {k: http[k] for k in ("host", "port") if k in http},
        }
    )
    client.deploy_apps(schema, _blocking=False)
    return _wait_served(app_name, deployment_name, expected, timeout_s)


def _app_config(app: dict[str, Any], deployment_name: str, checkpoint: str) -> dict[str, Any]:
    """The application's declarative config with the deployment's checkpoint replaced."""
    current = app["deployments"][deployment_name]["deployment_config"]
    user_config = {**(current.get("user_config") or {}), "checkpoint": checkpoint}
    deployed = app.get("deployed_app_config")
    if deployed:  # already declarative: change only the user_config (same code version)
        config = dict(deployed)
        entries = [dict(d) for d in config.get("deployments", [])]
        mine = [d for d in entries if d.get("name") == deployment_name]
        if mine:
            mine[0]["user_config"] = user_config
        else:
            entries.append({"name": deployment_name, "user_config": user_config})
        config["deployments"] = entries
        return config
    options = {
        "name": deployment_name,
        "user_config": user_config,
        "max_ongoing_requests": current.get("max_ongoing_requests"),
        "ray_actor_options": {
            k: v
            for k, v in (current.get("ray_actor_options") or {}).items()
            if k in ("num_cpus", "num_gpus", "memory", "resources") and v is not None
        },
    }
    if current.get("autoscaling_config") is None and current.get("num_replicas") is not None:
        options["num_replicas"] = current["num_replicas"]
    config = {
        "name": app["name"],
        "route_prefix": app.get("route_prefix") or "/",
        "import_path": BUILD_APP_IMPORT_PATH,
        # The args stay fixed from now on (their change would rebuild the app).
        "args": {**(current.get("user_config") or {})},
        "deployments": [{k: v for k, v in options.items() if v is not None}],
    }
    runtime_env = job_runtime_env()
    if runtime_env:
        config["runtime_env"] = runtime_env
    return config


def _wait_served(app_name: str, deployment_name: str, expected: str, timeout_s: float) -> str:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(
                f"Serve application {app_name!r} failed to deploy the new checkpoint: "
                f"{status.message}"
            )
        if status is not None and status.status == "RUNNING":
            try:
                last = served_checkpoint(app_name, deployment_name)["id"]
            except Exception as err:  # noqa: BLE001 - replicas restarting: poll again
                last = repr(err)[:200]
            if last == expected:
                return expected
        time.sleep(0.5)
    raise TimeoutError(
        f"the Serve deployment {app_name}/{deployment_name} did not serve checkpoint "
        f"{expected} within timeout_s = {timeout_s} s (last seen: {last}); raise it (during "
        "agent training: ServedWorldModelImaginerFactory.swap_timeout_s) or check `serve status`"
    )
