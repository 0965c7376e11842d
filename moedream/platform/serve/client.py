"""A small HTTP client of the world-model endpoint (JSON over ``requests``; no ray, no torch).

    client = WorldModelClient("http://127.0.0.1:8000")
    traj = client.imagine(start_obs, actions=plan, horizon=10, seed=0)   # Trajectories
    out = client.step(obs, action, seed=0)                                # dict of numpy arrays
    client.post_episode("ep-7", obs_history, action_history)              # build its memory
    traj = client.imagine(last_obs, actions=plan, horizon=40, episode_id="ep-7")

A 4xx answer raises :class:`ServeRequestError` carrying the server's message, which names the
offending field (``start_obs[0][1][3]: is nan: send finite numbers``). With ``retry`` (a
:class:`~moedream.platform.retry.RetryConfig`), a connection error, a timeout or a 5xx answer
(e.g. a replica that died with the request) is retried with backoff; a 4xx never is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import requests

from moedream.platform.retry import RetryConfig, call_with_retries
from moedream.platform.serve.request import episode_request, imagine_request, jsonable
from moedream.world_model.trajectory import Trajectories

JSON = dict[str, Any]


class ServeRequestError(RuntimeError):
    """The server refused a request (4xx) or failed (5xx)."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.field, self.message = status, field, message


class ClientRequestError(ServeRequestError):
    """A 4xx answer: the request itself is wrong (sending it again fails again)."""


class WorldModelClient:
    """HTTP client; one keep-alive session per client (not shared across threads).

    ``timeout`` bounds one attempt; with ``retry`` its ``timeout_s`` does (and ``timeout`` is
    ignored). ``failed_attempts`` counts the attempts that failed in a retryable way."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 60.0,
        retry: RetryConfig | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = retry
        self.failed_attempts = 0
        self.session = requests.Session()

    # ------------------------------------------------------------------ raw JSON

    def request(self, method: str, path: str, body: JSON | None = None) -> JSON:
        if self.retry is None:
            return self._attempt(method, path, body, self.timeout)
        return call_with_retries(
            lambda timeout_s: self._attempt(method, path, body, timeout_s),
            what=f"{method} {self.base_url + path}",
            config=self.retry,
            no_retry=(ClientRequestError,),
        )

    def _attempt(self, method: str, path: str, body: JSON | None, timeout_s: float) -> JSON:
        try:
            response = self.session.request(
                method, self.base_url + path, json=body, timeout=timeout_s
            )
        except requests.RequestException:
            self.failed_attempts += self.retry is not None
            raise
        if response.status_code >= 400:
            error = _error(response)
            self.failed_attempts += self.retry is not None and not isinstance(
                error, ClientRequestError
            )
            raise error
        return response.json()

    def imagine_json(self, body: JSON) -> JSON:
        return self.request("POST", "/v1/imagine", body)

    def step_json(self, body: JSON) -> JSON:
        return self.request("POST", "/v1/step", body)

    # ------------------------------------------------------------------ typed helpers

    def health(self) -> JSON:
        return self.request("GET", "/healthz")

    def info(self) -> JSON:
        return self.request("GET", "/v1/info")

    def imagine(
        self,
        start_obs: Any,
        actions: Any = None,
        *,
        horizon: int,
        policy: str | None = None,
        num_samples: int = 1,
        seed: int = 0,
        noise_scale: float | None = None,
        sampler: JSON | None = None,
        context_obs: Any = None,
        context_actions: Any = None,
        episode_id: str | None = None,
    ) -> Trajectories:
        """Imagined rollouts as :class:`Trajectories` (float32 numpy arrays; null -> NaN).
        The arguments are :func:`~moedream.platform.serve.request.imagine_request`'s."""
        body = imagine_request(
            start_obs, actions, horizon=horizon, seed=seed, context_obs=context_obs,
            context_actions=context_actions, noise_scale=noise_scale, num_samples=num_samples,
            policy=policy, sampler=sampler, episode_id=episode_id, as_lists=True,
        )  # fmt: skip
        return Trajectories.from_dict(self.imagine_json(body))

    def post_episode(self, episode_id: str, obs: Any, actions: Any, *, seed: int = 0) -> JSON:
        """Build (or continue) an episode's memory on the server from its real steps; returns
        its steps, whether it was new, the episodes evicted for it and the LoRA logs."""
        body = episode_request(episode_id, obs, actions, seed=seed, as_lists=True)
        return self.request("POST", "/v1/episodes", body)

    def episodes(self) -> JSON:
        """The answering replica's episode memories: capacity, counts, cached ids."""
        return self.request("GET", "/v1/episodes")

    def step(
        self,
        obs: Any,
        action: Any,
        *,
        seed: int = 0,
        noise_scale: float | None = None,
        sampler: JSON | None = None,
    ) -> dict[str, Any]:
        """One joint transition: next_obs, reward, terminated, uncertainty, ... as numpy."""
        body = {"obs": jsonable(obs), "action": jsonable(action), "seed": seed}
        if noise_scale is not None:
            body["noise_scale"] = noise_scale
        if sampler is not None:
            body["sampler"] = sampler
        return {k: _as_array(v) for k, v in self.step_json(body).items()}


def _as_array(value: Any) -> Any:
    if isinstance(value, list) and value and not isinstance(value[0], str):
        return np.asarray(value, dtype=np.float32)
    return value


def _error(response: requests.Response) -> ServeRequestError:
    """ClientRequestError for a 4xx answer, ServeRequestError for a 5xx."""
    try:
        data = response.json()
        message, field = data.get("error") or str(data), data.get("field")
    except ValueError:
        message, field = response.text[:500] or response.reason, None
    kind = ClientRequestError if response.status_code < 500 else ServeRequestError
    return kind(response.status_code, field, message)
