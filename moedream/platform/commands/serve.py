"""`moedream serve`: serve a world-model checkpoint with Ray Serve over HTTP.

Starts a local Ray cluster (or joins RAY_ADDRESS), starts Serve's HTTP proxy on --host/--port
(127.0.0.1:8000 by default) and deploys the application of --config (deployment options and
user_config) with --checkpoint, then prints the URL. On a local cluster started here it keeps
running until Ctrl-C (the cluster ends with this process); with RAY_ADDRESS it returns unless
--blocking is given (the app lives on in the cluster).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

HELP = "serve a world-model checkpoint with Ray Serve over HTTP"
DEFAULT_CONFIG = "cluster/serve/world_model_local.yaml"
DEPLOYMENT_OPTIONS = ("num_replicas", "autoscaling_config", "max_ongoing_requests",
                      "ray_actor_options", "health_check_period_s", "health_check_timeout_s",
                      "graceful_shutdown_timeout_s")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="world-model .safetensors file or folder"
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help="Serve config YAML (serve deploy form)"
    )
    parser.add_argument(
        "--blocking", action="store_true", help="stay in the foreground until Ctrl-C"
    )


def run(args: argparse.Namespace) -> int:
    from ray import serve

    from moedream.platform.ray_setup import init_ray
    from moedream.platform.serve.app import WorldModelDeployment
    from moedream.platform.serve.names import APP_NAME
    from moedream.platform.serve.runner import weights_file

    if not weights_file(args.checkpoint).is_file():
        print(f"error: --checkpoint {args.checkpoint!r}: no world-model checkpoint there")
        return 2
    options, user_config = deployment_settings(Path(args.config), args.checkpoint)
    joined = bool(os.environ.get("RAY_ADDRESS"))
    init_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    app = WorldModelDeployment.options(user_config=user_config, **options).bind()
    serve.run(app, name=APP_NAME, route_prefix="/")
    print(f"world model {args.checkpoint} served at http://{args.host}:{args.port}/ "
          f"(docs: /docs, schema: /openapi.json)", flush=True)  # fmt: skip
    if args.blocking or not joined:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(APP_NAME)
    return 0


def deployment_settings(config_path: Path, checkpoint: str) -> tuple[dict, dict]:
    """(deployment options, user_config) of the single deployment in a Serve config YAML,
    with the checkpoint replaced; the user_config is validated as a ServeConfig."""
    from moedream.config import load_yaml
    from moedream.platform.serve.schemas import ServeConfig

    config = load_yaml(config_path)
    try:
        (app,) = config["applications"]
        (deployment,) = app["deployments"]
    except (KeyError, ValueError, TypeError):
        raise SystemExit(f"{config_path}: expected one application with one deployment") from None
    options = {k: deployment[k] for k in DEPLOYMENT_OPTIONS if k in deployment}
    user_config = ServeConfig.from_dict(
        {**deployment.get("user_config", {}), "checkpoint": checkpoint}
    )
    return options, user_config.to_dict()
