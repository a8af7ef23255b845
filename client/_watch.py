"""The client side of Watch (KV events): `WatchStream`, the blocking iterator `KVClient.watch`
returns, and what both clients share to build the request and read the answers.

A watch is a stream that lasts as long as its reader wants: it runs on a channel of its own,
without the client's deadline, and `close()` ends it from any thread (a router's stop).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc

from kvstore.client._channel import Connection
from kvstore.errors import KVStoreError, error_for_status
from kvstore.events import EventKind, KVEvent
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire import CLIENT_OPTIONS, client_stubs


def watch_request(namespaces: str, snapshot: bool) -> pb.WatchRequest:
    return pb.WatchRequest(namespaces=namespaces, snapshot=snapshot)


def events_of(response: pb.WatchResponse) -> list[KVEvent]:
    """The events of one WatchResponse, each marked with the server start it came from."""
    instance = response.instance
    return [
        KVEvent(
            EventKind(e.kind),
            e.seq,
            e.namespace,
            e.key,
            e.tier,
            tuple(e.tiers),
            e.nbytes,
            instance,
        )
        for e in response.events
    ]


def rpc_error(conn: Connection, exc: grpc.RpcError) -> KVStoreError | Exception:
    """The client exception for a failed Watch call."""
    trailing = exc.trailing_metadata() if isinstance(exc, grpc.Call) else ()
    return conn.explain(error_for_status(exc.code(), exc.details() or "", trailing))


class WatchStream:
    """The events of one Watch call, as an iterator (see `KVClient.watch`).

    Iterating raises the client's errors (`Unavailable` when the server goes away or shuts
    down, `ResourceExhausted` past its --max-watchers). `close()` ends it, from any thread;
    an iteration in progress then stops without an error.
    """

    def __init__(self, conn: Connection, request: pb.WatchRequest) -> None:
        self._conn = conn
        self._channel = conn.open(grpc, list(CLIENT_OPTIONS))
        self._call: Any = client_stubs(self._channel)["Watch"](
            request, metadata=conn.metadata or None
        )
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[KVEvent]:
        try:
            for response in self._call:
                yield from events_of(response)
        except grpc.RpcError as exc:
            if not self._closed.is_set():
                raise rpc_error(self._conn, exc) from None
        finally:
            self.close()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._call.cancel()
        self._channel.close()

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
