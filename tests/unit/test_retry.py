"""Bounded retries of remote calls (moedream.platform.retry): attempts, timeouts, backoff, errors."""

from __future__ import annotations

import time

import pytest

from moedream.config import ConfigError
from moedream.platform.model_based import ServedWorldModelImaginerFactory
from moedream.platform.retry import RemoteCallFailed, RetryConfig, call_with_retries


class Flaky:
    """Fails ``failures`` times with ``error``, then returns "ok"; records each timeout given."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.timeouts = failures, error, []

    def __call__(self, timeout_s: float) -> str:
        self.timeouts.append(timeout_s)
        if len(self.timeouts) <= self.failures:
            raise self.error
        return "ok"


def test_backoff_schedule_grows_by_the_factor_up_to_the_cap():
    config = RetryConfig(attempts=6, backoff_s=0.5, backoff_factor=3.0, max_backoff_s=5.0)
    assert config.delays() == [0.5, 1.5, 4.5, 5.0, 5.0]
    assert config.worst_case_s() == pytest.approx(6 * 60.0 + 16.5)
    assert RetryConfig(attempts=1).delays() == []


def test_a_call_that_recovers_returns_after_the_scheduled_waits():
    waits: list[float] = []
    call = Flaky(2, ConnectionError("replica gone"))
    config = RetryConfig(attempts=3, timeout_s=7.0, backoff_s=0.25)
    assert call_with_retries(call, what="x", config=config, sleep=waits.append) == "ok"
    assert waits == [0.25, 0.5]
    assert call.timeouts == [7.0, 7.0, 7.0]  # every attempt gets the full timeout


def test_exhausted_retries_name_the_call_the_cause_and_the_setting(caplog):
    call = Flaky(5, TimeoutError("no reply in 2.0 s"))
    with pytest.raises(RemoteCallFailed) as info:
        call_with_retries(call, what="gate actor g.judge", config=RetryConfig(attempts=3),
                          sleep=lambda _: None)  # fmt: skip
    err = info.value
    assert len(call.timeouts) == 3 and err.attempts == 3
    assert err.cause == "TimeoutError" and isinstance(err.__cause__, TimeoutError)
    text = str(err)
    assert "gate actor g.judge failed 3 time(s)" in text
    assert "TimeoutError: no reply in 2.0 s" in text
    assert "imagination.world_model.retry" in text
    retries = [r for r in caplog.records if "attempt" in r.getMessage()]
    assert len(retries) == 2 and "attempt 1/3 failed (TimeoutError" in retries[0].getMessage()


def test_errors_that_cannot_heal_are_not_retried():
    call = Flaky(5, ConfigError("field x is bad"))
    with pytest.raises(ConfigError):
        call_with_retries(call, what="x", config=RetryConfig(), no_retry=(ConfigError,),
                          sleep=lambda _: None)  # fmt: skip
    assert len(call.timeouts) == 1


def test_the_real_sleep_waits_the_backoff():
    start = time.monotonic()
    call = Flaky(1, OSError("refused"))
    call_with_retries(call, what="x", config=RetryConfig(attempts=2, backoff_s=0.2))
    assert time.monotonic() - start >= 0.2


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("attempts", 0, "must be an integer >= 1"),
        ("timeout_s", 0, "must be a number > 0"),
        ("backoff_factor", 0.5, "must be a number >= 1"),
        ("backoff_s", -1, "must be a number >= 0"),
    ],
)
def test_bad_retry_settings_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=rf"\.retry\.{field}` = .*{message}"):
        ServedWorldModelImaginerFactory.from_dict(
            {"env_name": "overcooked", "retry": {field: value}}, prefix="imagination.world_model."
        )


class FlakyServer:
    """A loopback HTTP server answering each POST with the next status of ``statuses``."""

    def __init__(self, statuses: list[int]) -> None:
        import http.server
        import json
        import threading

        answers = list(statuses)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                self.rfile.read(int(self.headers["Content-Length"]))
                status = answers.pop(0)
                body = json.dumps({"ok": True} if status == 200 else {"error": f"x: {status}",
                                                                     "field": "x"}).encode()  # fmt: skip
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.answers = answers
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def test_http_client_retries_5xx_answers_but_never_4xx():
    from moedream.platform.serve.client import ClientRequestError, WorldModelClient

    fast = RetryConfig(attempts=3, timeout_s=5.0, backoff_s=0.0)
    with FlakyServer([503, 500, 200]) as server:
        client = WorldModelClient(server.url, retry=fast)
        assert client.imagine_json({}) == {"ok": True}
        assert client.failed_attempts == 2 and not server.answers
    with FlakyServer([422, 200]) as server:
        client = WorldModelClient(server.url, retry=fast)
        with pytest.raises(ClientRequestError, match="HTTP 422: x: 422"):
            client.imagine_json({})
        assert server.answers == [200]  # not sent again
    with FlakyServer([503, 503]) as server:
        client = WorldModelClient(server.url, retry=RetryConfig(attempts=2, backoff_s=0.0))
        with pytest.raises(RemoteCallFailed, match="HTTP 503"):
            client.imagine_json({})
