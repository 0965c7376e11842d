"""``moedream.platform.client``: the world-model HTTP client (see moedream.platform.serve.client)."""

from moedream.platform.serve.client import ServeRequestError, WorldModelClient

__all__ = ["ServeRequestError", "WorldModelClient"]
