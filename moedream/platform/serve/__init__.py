"""Serving the world model with Ray Serve: deployment + FastAPI ingress (``app``), request
schemas (``schemas``), the served model's OpenAPI schema (``openapi``), building the requests
(``request``), job execution without ray (``runner``), per-episode memory experts in a bounded
LRU cache (``episodes``), an HTTP client (``client``), hot-swapping the served checkpoint
(``deploy``) and the app's names (``names``).

``build_app`` is the ``serve run`` / ``serve deploy`` entry (import_path
``moedream.platform.serve:build_app``). Attributes load lazily so that the client works
without importing ray.
"""

from __future__ import annotations

from moedream.lazy import lazy_getattr

_EXPORTS = {
    "build_app": "app",
    "WorldModelDeployment": "app",
    "APP_NAME": "names",
    "DEPLOYMENT_NAME": "names",
    "ServeConfig": "schemas",
    "RequestError": "schemas",
    "random_plan": "schemas",
    "imagine_request": "request",
    "episode_request": "request",
    "push_checkpoint": "deploy",
    "served_checkpoint": "deploy",
    "WorldModelClient": "client",
    "ServeRequestError": "client",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
