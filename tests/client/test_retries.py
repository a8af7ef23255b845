"""Both clients' retries of a write the server refuses by back-pressure: sent again after the
server's hint while the deadline allows, and reported as the refusal (`Overloaded`) when
time runs out, even when the last attempt is the one that runs out of it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from kvstore.client._core import Call
from kvstore.client.aio import AsyncKVClient
from kvstore.client.sync import KVClient
from kvstore.errors import NotFound, Overloaded, error_for_status


def refusal() -> Overloaded:
    return Overloaded("at --max-inflight-requests", 0.01)


def deadline_exceeded() -> Exception:
    return error_for_status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


class Attempts:
    """A stand-in for a client's `_invoke_once`: each attempt raises the next error, or
    returns "done" when none is left."""

    def __init__(self, *errors: Exception, timeout: float = 5.0) -> None:
        self.errors = list(errors)
        self.timeout = timeout
        self.sent = 0

    def attempt(self) -> str:
        self.sent += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def run_sync(attempts: Attempts, call: Call) -> Any:
    client: Any = KVClient.__new__(KVClient)
    client.timeout = attempts.timeout
    client._invoke_once = lambda call, deadline: attempts.attempt()
    return KVClient._invoke(client, call)


def run_async(attempts: Attempts, call: Call) -> Any:
    client: Any = AsyncKVClient.__new__(AsyncKVClient)
    client.timeout = attempts.timeout

    async def once(call: Call, deadline: float | None) -> str:
        return attempts.attempt()

    client._invoke_once = once
    return asyncio.run(AsyncKVClient._invoke(client, call))


RUNS = pytest.mark.parametrize("run", [run_sync, run_async], ids=["sync", "async"])


@RUNS
def test_a_refused_write_is_sent_again_until_it_is_done(run: Any) -> None:
    attempts = Attempts(refusal(), refusal())
    assert run(attempts, Call("Put", b"")) == "done"
    assert attempts.sent == 3


@RUNS
def test_an_attempt_after_a_refusal_that_runs_out_of_time_reports_the_refusal(
    run: Any,
) -> None:
    """On a loaded machine the attempt sent after the hint can outlast the deadline's rest:
    the caller learns the write was refused (nothing stored), not a bare deadline."""
    attempts = Attempts(refusal(), deadline_exceeded())
    with pytest.raises(Overloaded, match="max-inflight-requests") as raised:
        run(attempts, Call("Put", b""))
    assert getattr(raised.value.__cause__, "code", None) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert attempts.sent == 2


@RUNS
def test_a_deadline_without_a_refusal_before_it_stands(run: Any) -> None:
    attempts = Attempts(deadline_exceeded())
    with pytest.raises(Exception, match="Deadline Exceeded") as raised:
        run(attempts, Call("Put", b""))
    assert not isinstance(raised.value, Overloaded)


@RUNS
def test_other_errors_after_a_refusal_stand(run: Any) -> None:
    attempts = Attempts(refusal(), NotFound("no such key"))
    with pytest.raises(NotFound):
        run(attempts, Call("Put", b""))


@RUNS
def test_reads_are_not_sent_again(run: Any) -> None:
    attempts = Attempts(refusal())
    with pytest.raises(Overloaded):
        run(attempts, Call("Get", b""))
    assert attempts.sent == 1


@RUNS
def test_no_attempt_is_sent_when_the_hint_reaches_past_the_deadline(run: Any) -> None:
    attempts = Attempts(Overloaded("busy", 60.0), timeout=1.0)
    start = time.monotonic()
    with pytest.raises(Overloaded, match="busy"):
        run(attempts, Call("Put", b""))
    assert attempts.sent == 1 and time.monotonic() - start < 1.0
