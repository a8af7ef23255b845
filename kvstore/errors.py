"""Errors shared by the daemon and the client.

Each error names the gRPC status code it travels as, so the server turns it into
`context.abort(code, message)` and the client turns the status back into the same class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc


class KVStoreError(Exception):
    """Base class; `code` is the gRPC status the error travels as."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(KVStoreError, ValueError):
    """The request is malformed: bad key, namespace, shape, dtype or size."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(KVStoreError, KeyError):
    """The key is not stored."""

    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "not found"


class ResourceExhausted(KVStoreError):
    """Every tier is full and nothing can be evicted, a namespace group's quota cannot take
    the value, or a server buffer is full.

    `retry_after_s` is set when the condition is transient (a buffer or bound that frees up
    as other calls finish): the server's hint of when to try again. None: retrying the same
    call will not help.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(ResourceExhausted):
    """The server is at one of its in-flight bounds (calls, bytes, leases): back-pressure.
    Nothing was done; the same call may succeed after `retry_after_s`. Clients retry writes
    after the hinted delay within the call's deadline and raise this when time runs out;
    reads report a miss instead."""

    retry_after_s: float

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s)


class DataLoss(KVStoreError):
    """A stored value failed its checksum; it has been dropped."""

    code = grpc.StatusCode.DATA_LOSS


class Undecodable(DataLoss):
    """A stored value is intact but this process cannot decode it (its container names a
    cachegen profile's maps the server was not started with); it is kept, for a server
    that has them."""


class Unavailable(KVStoreError):
    """The server is not reachable or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(KVStoreError):
    """The call carried no token, or one the server does not know (`--auth-tokens`)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(KVStoreError):
    """The caller's tenant may not read or write the namespace it named."""

    code = grpc.StatusCode.PERMISSION_DENIED


RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""Trailing metadata of a refused call: gRPC's own retry policy waits this many milliseconds
before its next attempt, and makes none when the value is negative (gRPC's retry design,
A6). 0 must not be sent: grpc 1.85's client then never retries nor fails until the deadline."""

OVERLOADED_KEY = "kvstore-overloaded"
"""Trailing metadata marking a refusal by an in-flight bound (`Overloaded`), value "1"."""


def retry_metadata(exc: KVStoreError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata a failed call carries: for RESOURCE_EXHAUSTED, gRPC's retry
    pushback (positive for a transient condition, -1 for one a retry cannot fix, so that a
    client whose gRPC retry policy lists RESOURCE_EXHAUSTED leaves it alone)."""
    if not isinstance(exc, ResourceExhausted):
        return ()
    if exc.retry_after_s is None:
        return ((RETRY_PUSHBACK_KEY, "-1"),)
    ms = (RETRY_PUSHBACK_KEY, str(max(1, round(exc.retry_after_s * 1000))))
    return (ms, (OVERLOADED_KEY, "1")) if isinstance(exc, Overloaded) else (ms,)


_BY_CODE: dict[grpc.StatusCode, type[KVStoreError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        DataLoss,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
    )
}


def error_for_status(
    code: grpc.StatusCode, message: str, trailing: Sequence[tuple[str, Any]] | None = ()
) -> KVStoreError:
    """The exception a client raises for a failed call with this status and trailing
    metadata (`Overloaded` for a refusal by an in-flight bound, with its retry hint)."""
    text = message or code.name
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        meta = {k: v for k, v in trailing or ()}
        try:
            after = int(meta.get(RETRY_PUSHBACK_KEY, "-1")) / 1000
        except ValueError:
            after = -1.0
        if meta.get(OVERLOADED_KEY) == "1" and after > 0:
            return Overloaded(text, after)
        return ResourceExhausted(text, after if after > 0 else None)
    cls = _BY_CODE.get(code, KVStoreError)
    err = cls(text)
    if cls is KVStoreError:
        err.code = code
    return err
