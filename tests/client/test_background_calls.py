"""The sync client's background calls (lease releases, aborts nobody waits for): a call
that fails is left to the server's lease expiry, and the calls after it still go out."""

from __future__ import annotations

import threading
from typing import Any

import grpc

from kvstore.client.sync import _BackgroundCalls


def test_a_call_on_a_closed_channel_does_not_stop_the_calls_after_it() -> None:
    """close() waits only so long for a server that does not answer, then the client closes
    its channel: calls still queued then meet a closed channel (ValueError, not an
    RpcError), which must not kill the thread that makes them."""
    channel = grpc.insecure_channel("unix:///nonexistent/kvstore.sock")
    dead = channel.unary_unary("/kvstore.v1.KVStore/Release")
    channel.close()
    done = threading.Event()
    calls = _BackgroundCalls(())
    errors: list[BaseException] = []
    real_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment]
    try:

        def after(request: Any, **_: Any) -> None:
            done.set()

        calls.submit(dead, b"")
        calls.submit(after, b"")
        assert done.wait(10), "the call after the failed one never ran"
        calls.close(timeout=10)
    finally:
        threading.excepthook = real_hook
    assert errors == []
