"""How a client reaches the server: its gRPC target, TLS credentials and bearer token.

`Connection.resolve(address, token=..., tls_ca=..., ...)` takes what the caller passes and
fills the rest from the environment: `KVSTORE_TOKEN`, and for TCP addresses `KVSTORE_TLS`
(1: TLS with the system's CA certificates), `KVSTORE_TLS_CA`, `KVSTORE_TLS_CERT`,
`KVSTORE_TLS_KEY`. `open(grpc)` or `open(grpc.aio)` makes the channel; `metadata` goes with
every call. Both clients and `kvstore` (the admin CLI) connect through it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack

import grpc

from kvstore.errors import InvalidArgument, Unavailable
from kvstore.tls import TLSConfigError, read_pem

log = logging.getLogger("kvstore.client")


def target_of(address: str) -> str:
    """gRPC target for `unix:///path`, `unix:path`, a bare `/path`, or `host:port`."""
    if address.startswith("unix:"):
        return address
    if address.startswith(("/", "./", "../")):
        return "unix:" + address
    return address


def is_unix_address(address: str) -> bool:
    return target_of(address).startswith("unix:")


class ConnectOptions(TypedDict, total=False):
    """What `KVClient`, `AsyncKVClient` and `Connection.resolve` take besides the address."""

    token: str | None
    tls: bool | None
    tls_ca: str | Path | None
    tls_cert: str | Path | None
    tls_key: str | Path | None
    tls_server_name: str | None


@dataclass(frozen=True)
class Connection:
    """A server address with what it takes to be let in."""

    target: str
    metadata: tuple[tuple[str, str], ...] = ()
    credentials: grpc.ChannelCredentials | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def resolve(
        cls,
        address: str,
        environ: Mapping[str, str] | None = None,
        **options: Unpack[ConnectOptions],
    ) -> Connection:
        """`tls`: None turns TLS on when a CA, certificate or key is given (or
        `KVSTORE_TLS=1`); False turns it off whatever the environment says."""
        env = os.environ if environ is None else environ
        token, tls = options.get("token"), options.get("tls")
        tls_ca, tls_cert = options.get("tls_ca"), options.get("tls_cert")
        tls_key, tls_server_name = options.get("tls_key"), options.get("tls_server_name")
        target = target_of(address)
        unix = target.startswith("unix:")
        token = token if token is not None else env.get("KVSTORE_TOKEN") or None
        metadata: tuple[tuple[str, str], ...] = ()
        if token is not None:
            if not token.isascii() or not token.isprintable() or " " in token or not token:
                raise InvalidArgument("token: expected the printable text `kvstore token` gave")
            metadata = (("authorization", f"Bearer {token}"),)
        if not unix and tls is not False:  # the environment speaks for TCP addresses only
            tls_ca = tls_ca or env.get("KVSTORE_TLS_CA") or None
            tls_cert = tls_cert or env.get("KVSTORE_TLS_CERT") or None
            tls_key = tls_key or env.get("KVSTORE_TLS_KEY") or None
            if tls is None and env.get("KVSTORE_TLS"):
                tls = env["KVSTORE_TLS"].strip().lower() in ("1", "true", "yes", "on")
        use_tls = tls is True or (tls is None and any((tls_ca, tls_cert, tls_key)))
        if not use_tls:
            if token is not None and not unix:
                log.warning("sending a bearer token to %s without TLS: anyone on the path "
                            "can read it", address)  # fmt: skip
            return cls(target, metadata)
        if unix:
            raise InvalidArgument(
                f"TLS applies to TCP addresses (HOST:PORT); {address} is a Unix socket, "
                "which file permissions protect"
            )
        if (tls_cert is None) != (tls_key is None):
            raise InvalidArgument("tls_cert and tls_key go together: give both or neither")
        try:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read_pem(tls_ca, "tls_ca") if tls_ca else None,
                private_key=read_pem(tls_key, "tls_key") if tls_key else None,
                certificate_chain=read_pem(tls_cert, "tls_cert") if tls_cert else None,
            )
        except TLSConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        name = (("grpc.ssl_target_name_override", tls_server_name),) if tls_server_name else ()
        return cls(target, metadata, credentials, name)

    @property
    def tls(self) -> bool:
        return self.credentials is not None

    def open(self, module: Any, options: list[tuple[str, Any]]) -> Any:
        """A channel of `module` (`grpc` or `grpc.aio`) to the server."""
        opts = [*options, *self.options]
        if self.credentials is None:
            return module.insecure_channel(self.target, options=opts)
        return module.secure_channel(self.target, self.credentials, options=opts)

    def explain(self, exc: Exception) -> Exception:
        """`exc` with a hint when the server cannot be reached because this side and the
        server disagree on TLS (gRPC's own words are about handshakes and closed sockets)."""
        if not isinstance(exc, Unavailable) or self.target.startswith("unix:"):
            return exc
        text = str(exc)
        if self.tls and "handshake" in text.lower():
            hint = (
                "the TLS handshake failed: the server may not use TLS (no --tls-cert), "
                "or its certificate is not signed by tls_ca, or it wants a client "
                "certificate (tls_cert/tls_key)"
            )
        elif not self.tls and ("Socket closed" in text or "Connection reset" in text):
            hint = "the server closed the connection: it may require TLS (pass tls_ca=...)"
        else:
            return exc
        return Unavailable(f"{text} ({hint})")
