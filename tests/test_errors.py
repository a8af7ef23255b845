"""Errors travel as gRPC statuses and trailing metadata and come back as the same classes."""

from __future__ import annotations

import grpc

from kvstore.errors import (
    InvalidArgument,
    Overloaded,
    ResourceExhausted,
    error_for_status,
    retry_metadata,
)


def test_overloaded_round_trips_with_its_retry_hint() -> None:
    sent = Overloaded("server busy; retry in 80 ms", 0.0804)
    meta = retry_metadata(sent)
    assert dict(meta) == {"grpc-retry-pushback-ms": "80", "kvstore-overloaded": "1"}
    got = error_for_status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(sent), meta)
    assert type(got) is Overloaded and got.retry_after_s == 0.08


def test_a_full_tier_is_never_retried() -> None:
    meta = retry_metadata(ResourceExhausted("every tier is full"))
    assert dict(meta) == {"grpc-retry-pushback-ms": "-1"}
    got = error_for_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", meta)
    assert type(got) is ResourceExhausted and got.retry_after_s is None


def test_hints_are_never_zero_and_other_errors_carry_none() -> None:
    assert dict(retry_metadata(Overloaded("x", 0.0001)))["grpc-retry-pushback-ms"] == "1"
    assert retry_metadata(InvalidArgument("bad")) == ()
    # RESOURCE_EXHAUSTED without our metadata (gRPC's own, e.g. a message too large).
    got = error_for_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "too large", ())
    assert type(got) is ResourceExhausted and got.retry_after_s is None
    got = error_for_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "x", (("grpc-retry-pushback-ms", "junk"),)
    )
    assert type(got) is ResourceExhausted
