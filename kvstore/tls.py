"""TLS material for the server's TCP listener and for clients, checked before use.

`server_credentials(cert, key, client_ca)` reads the PEM files, proves that the key belongs
to the certificate (Python's `ssl` loads them as a pair) and returns gRPC credentials that
require and verify client certificates when `client_ca` is given (mTLS). gRPC itself would
accept a mismatched pair and fail every handshake later; here the server refuses to start.

`read_pem(path, what)` is shared with the clients' channel setup.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from kvstore.config import ConfigError


class TLSConfigError(ConfigError):
    """A certificate, key or CA file is missing, unreadable or does not fit; says which."""


def read_pem(path: Path | str, what: str) -> bytes:
    """The bytes of a PEM file, or `TLSConfigError` naming `what` and the path."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TLSConfigError(f"{what}: {path} is not a PEM file (no -----BEGIN line)")
    return data


def _no_password() -> bytes:
    raise TLSConfigError("the key is encrypted; give the server an unencrypted PEM key")


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """Credentials for `add_secure_port`; `TLSConfigError` if the files are not usable."""
    cert_pem = read_pem(cert, "tls-cert")
    key_pem = read_pem(key, "tls-key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"tls-key: {key} is not the private key of tls-cert {cert}, or one of them is "
            f"malformed ({exc.reason or exc})"
        ) from None
    ca_pem = None
    if client_ca is not None:
        ca_pem = read_pem(client_ca, "tls-client-ca")
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except ssl.SSLError as exc:
            raise TLSConfigError(
                f"tls-client-ca: {client_ca} holds no usable CA certificate ({exc.reason or exc})"
            ) from None
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=ca_pem,
        require_client_auth=ca_pem is not None,
    )
