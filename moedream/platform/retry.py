"""Bounded retries with backoff and a timeout per attempt for the remote calls of the model-based loop.

Every remote call MBMAPPO's world-model provider makes (Serve handle calls, gate actor calls)
goes through :func:`call_with_retries`: at most ``RetryConfig.attempts`` attempts, each given
``timeout_s`` seconds, with exponential backoff between them. When every attempt failed it
raises :class:`RemoteCallFailed`, which names the call, the attempts, the last error and the
setting to change; the provider turns it into an iteration without imagination (counted and
logged by MBMAPPO, see docs/faults.md) instead of a hang or a crash.

No Ray import here: the caller passes the call (which receives the attempt's timeout) and the
errors that must not be retried (bad input fails the same way every time).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from moedream.config import ConfigBase, check, check_positive, is_int

logger = logging.getLogger("moedream.retry")
T = TypeVar("T")


@dataclasses.dataclass
class RetryConfig(ConfigBase):
    """How remote calls are retried (``imagination.world_model.retry`` in an agents config)."""

    attempts: int = 3
    """Attempts per call (1 = no retry)."""
    timeout_s: float = 60.0
    """Seconds each attempt may take before it counts as failed (a lost replica's request
    would otherwise wait for ever)."""
    backoff_s: float = 1.0
    """Wait before the second attempt; each later wait is ``backoff_factor`` times longer."""
    backoff_factor: float = 2.0
    max_backoff_s: float = 10.0
    """No wait between attempts is longer than this."""

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        check(is_int(self.attempts) and self.attempts >= 1, f"{prefix}attempts", self.attempts,
              "must be an integer >= 1 (1 = no retry)")  # fmt: skip
        check_positive(f"{prefix}timeout_s", self.timeout_s)
        check_positive(f"{prefix}backoff_s", self.backoff_s, allow_zero=True)
        check_positive(f"{prefix}max_backoff_s", self.max_backoff_s, allow_zero=True)
        check(
            isinstance(self.backoff_factor, (int, float)) and self.backoff_factor >= 1,
            f"{prefix}backoff_factor",
            self.backoff_factor,
            "must be a number >= 1 (1 = the same wait before every retry)",
        )

    def delays(self) -> list[float]:
        """The waits before attempts 2..attempts, in seconds."""
        return [
            min(self.max_backoff_s, self.backoff_s * self.backoff_factor**k)
            for k in range(self.attempts - 1)
        ]

    def worst_case_s(self) -> float:
        """The longest a call can take before RemoteCallFailed (every attempt timing out)."""
        return self.attempts * self.timeout_s + sum(self.delays())


class RemoteCallFailed(RuntimeError):
    """Every attempt of a remote call failed; ``cause`` is the last error's type name."""

    def __init__(self, what: str, attempts: int, error: BaseException, seconds: float) -> None:
        self.what, self.attempts, self.error = what, attempts, error
        self.cause = type(error).__name__
        super().__init__(
            f"{what} failed {attempts} time(s) in {seconds:.1f} s; last error: {self.cause}: "
            f"{str(error)[:300]} (retries and timeouts: imagination.world_model.retry)"
        )


def call_with_retries(
    call: Callable[[float], T],
    *,
    what: str,
    config: RetryConfig,
    no_retry: tuple[type[BaseException], ...] = (),
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call(timeout_s)`` until it returns, at most ``config.attempts`` times.

    ``call`` must give up after ``timeout_s`` seconds itself (raise, e.g. Ray's
    GetTimeoutError); errors in ``no_retry`` are raised at once. Each failed attempt is
    logged (WARNING) with its error; the last one raises RemoteCallFailed from it.
    """
    start = time.monotonic()
    delays = config.delays() + [0.0]
    for attempt, delay in enumerate(delays, start=1):
        try:
            return call(config.timeout_s)
        except no_retry:
            raise
        except Exception as err:  # noqa: BLE001 - any other failure is worth another attempt
            if attempt == config.attempts:
                raise RemoteCallFailed(what, attempt, err, time.monotonic() - start) from err
            logger.warning(
                "%s: attempt %d/%d failed (%s: %s); retrying in %.1f s",
                what, attempt, config.attempts, type(err).__name__, str(err)[:200], delay,
            )  # fmt: skip
            sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")
