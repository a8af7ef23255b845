"""Errors shared by the daemon and the client.

Each error names the gRPC status code it travels as, so the server turns it into
`context.abort(code, message)` and the client turns the status back into the same class.
"""

from __future__ import annotations

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
    """Every tier is full and nothing can be evicted, or a server buffer is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DataLoss(KVStoreError):
    """A stored value failed its checksum; it has been dropped."""

    code = grpc.StatusCode.DATA_LOSS


class Unavailable(KVStoreError):
    """The server is not reachable or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(KVStoreError):
    """The call carried no token, or one the server does not know (`--auth-tokens`)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(KVStoreError):
    """The caller's tenant may not read or write the namespace it named."""

    code = grpc.StatusCode.PERMISSION_DENIED


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


def error_for_status(code: grpc.StatusCode, message: str) -> KVStoreError:
    """The exception a client raises for a failed call with this status."""
    cls = _BY_CODE.get(code, KVStoreError)
    err = cls(message or code.name)
    if cls is KVStoreError:
        err.code = code
    return err
