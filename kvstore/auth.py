"""Who may call the server, and on which namespaces: bearer tokens bound to tenants.

Primitives:
- `TenantTable.load(path)` reads the tokens file (`--auth-tokens`, TOML or JSON): tenants,
  each with the SHA-256 of its tokens (never the tokens) and the shell globs of the
  namespaces it may read and may write.
- `AuthInterceptor` (a `grpc.aio` server interceptor) authenticates every call of the
  KVStore service from its `authorization: Bearer <token>` metadata and answers
  UNAUTHENTICATED without one; health and reflection stay open. The caller's `Tenant` is
  then `caller()` for the rest of the call.
- `require(namespace, READ | WRITE)` raises `PermissionDenied` for a namespace outside the
  caller's patterns, with a message that names only the namespace: a tenant learns nothing
  about the keys of namespaces it may not read.
- `mint_token(...)` makes a new token and the tokens-file entry that admits it
  (`kvstore token`).
- `ServerSecurity` gathers what `serve` needs (TLS credentials, the interceptor, the
  socket group); SIGHUP reads the tokens file again.

Without `--auth-tokens` nothing is installed and every caller is `UNRESTRICTED`: the
server is one trust domain, as it was before tokens.
"""

from __future__ import annotations

import asyncio
import contextvars
import fnmatch
import grp
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import signal
import tomllib
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from kvstore.config import ConfigError, ServerConfig
from kvstore.errors import PermissionDenied
from kvstore.tls import server_credentials
from kvstore.wire import SERVICE

log = logging.getLogger("kvstore.auth")

READ = "read"
WRITE = "write"
TOKEN_PREFIX = "kvs_"
HASH_PREFIX = "sha256:"
_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_TENANT_FIELDS = {"name", "tokens", "read", "write"}


class TokenFileError(ConfigError):
    """The tokens file is missing, unreadable or malformed; the message says where."""


@dataclass(frozen=True)
class Tenant:
    """A caller the tokens file names, and the namespaces (shell globs) it may use."""

    name: str
    read: tuple[str, ...]
    write: tuple[str, ...]

    def may(self, namespace: str, access: str) -> bool:
        patterns = self.read if access == READ else self.write
        return any(fnmatch.fnmatchcase(namespace, p) for p in patterns)

    @property
    def maps_memory(self) -> bool:
        """Whether the server hands this tenant places in its shared memory (host arena,
        gpu pools): whoever maps them can read and overwrite every value there, so only a
        tenant that may read and write every namespace gets them. Others stream bytes."""
        return "*" in self.read and "*" in self.write


UNRESTRICTED = Tenant("", ("*",), ("*",))
"""Every caller when no tokens are configured, and Unix-socket callers under
`--trust-socket` that send no token."""

_caller: contextvars.ContextVar[Tenant] = contextvars.ContextVar(
    "kvstore_tenant", default=UNRESTRICTED
)


def caller() -> Tenant:
    """The tenant of the call being served."""
    return _caller.get()


def require(namespace: str, access: str) -> None:
    """`PermissionDenied` unless the caller may `access` (READ or WRITE) `namespace`."""
    tenant = _caller.get()
    if not tenant.may(namespace, access):
        raise PermissionDenied(f"tenant {tenant.name!r} may not {access} namespace {namespace!r}")


class Session:
    """The rights of one streaming call (Watch), kept current for as long as it lasts: a
    reload of the tokens file (SIGHUP) sets `tenant` to what the new file gives the call's
    token (None: revoked), counts the change in `changes` and calls `on_change`, on the
    event loop. Without tokens, or for a socket caller trusted without one, it never
    changes."""

    def __init__(self, tenant: Tenant, token: str | None = None) -> None:
        self.tenant: Tenant | None = tenant
        self.token = token
        self.changes = 0
        self.on_change: Callable[[], object] | None = None

    def may(self, namespace: str, access: str) -> bool:
        tenant = self.tenant  # one read: a reload may swap it from another thread's view
        return tenant is not None and tenant.may(namespace, access)

    def update(self, tenant: Tenant | None) -> None:
        if tenant == self.tenant:
            return
        self.tenant = tenant
        self.changes += 1
        if self.on_change is not None:
            self.on_change()


_session: contextvars.ContextVar[Session | None] = contextvars.ContextVar(
    "kvstore_session", default=None
)


def session() -> Session:
    """The session of the streaming call being served (see `Session`)."""
    current = _session.get()
    return current if current is not None else Session(caller())


def token_hash(token: str) -> str:
    """What the tokens file stores for `token`."""
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


class TenantTable:
    """The tenants of a tokens file, looked up by token in constant time."""

    def __init__(self, tenants: Mapping[str, tuple[Tenant, Sequence[str]]]) -> None:
        """`tenants`: name -> (tenant, its token hashes as `sha256:<hex>`)."""
        self.tenants = {name: t for name, (t, _) in tenants.items()}
        self._digests = [
            (bytes.fromhex(h.removeprefix(HASH_PREFIX)), t)
            for t, hashes in tenants.values()
            for h in hashes
        ]

    @classmethod
    def load(cls, path: Path) -> TenantTable:
        """Read and check a tokens file; `TokenFileError` says what is wrong and where."""
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise TokenFileError(f"auth-tokens: cannot read {path}: {exc.strerror}") from None
        as_json = path.suffix.lower() == ".json"
        try:
            doc = json.loads(raw) if as_json else tomllib.loads(raw.decode())
        except (ValueError, UnicodeDecodeError) as exc:
            kind = "JSON" if as_json else "TOML"
            raise TokenFileError(f"auth-tokens: {path} is not valid {kind}: {exc}") from None
        return cls.parse(doc, str(path))

    @classmethod
    def parse(cls, doc: Any, where: str) -> TenantTable:
        entries = doc.get("tenants") if isinstance(doc, dict) else None
        if not isinstance(entries, list) or not entries:
            raise TokenFileError(f"auth-tokens: {where} has no [[tenants]] list")
        tenants: dict[str, tuple[Tenant, Sequence[str]]] = {}
        seen: dict[str, str] = {}  # token hash -> tenant
        for i, entry in enumerate(entries):
            what = f"auth-tokens: {where}: tenant #{i + 1}"
            if not isinstance(entry, dict):
                raise TokenFileError(f"{what} is not a table")
            unknown = sorted(set(entry) - _TENANT_FIELDS)
            if unknown:
                raise TokenFileError(
                    f"{what} has unknown field {unknown[0]!r}; fields: "
                    f"{', '.join(sorted(_TENANT_FIELDS))}"
                )
            name = entry.get("name")
            if not isinstance(name, str) or not name.strip():
                raise TokenFileError(f"{what} needs a non-empty name")
            what = f"auth-tokens: {where}: tenant {name!r}"
            if name in tenants:
                raise TokenFileError(f"{what} is listed twice")
            hashes = _strings(entry.get("tokens"), f"{what}: tokens")
            for h in hashes:
                if not _HASH_RE.match(h):
                    raise TokenFileError(
                        f"{what}: {h[:12]!r}... is not sha256:<64 hex digits>; store the "
                        "hash `kvstore token` prints, never the token itself"
                    )
                if h in seen:
                    raise TokenFileError(f"{what}: a token hash is also tenant {seen[h]!r}'s")
                seen[h] = name
            read = _strings(entry.get("read", []), f"{what}: read", allow_empty=True)
            write = _strings(entry.get("write", []), f"{what}: write", allow_empty=True)
            if not read and not write:
                raise TokenFileError(f"{what} may neither read nor write any namespace")
            tenants[name] = (Tenant(name, tuple(read), tuple(write)), hashes)
        return cls(tenants)

    def authenticate(self, token: str) -> Tenant | None:
        """The tenant `token` belongs to, or None. Every known hash is compared, in
        constant time each, so the time taken says nothing about which one came close."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, tenant in self._digests:
            if hmac.compare_digest(digest, known):
                found = tenant
        return found


def _strings(value: Any, what: str, allow_empty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TokenFileError(f"{what} must be a list of non-empty strings")
    if not value and not allow_empty:
        raise TokenFileError(f"{what} must name at least one")
    return list(value)


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates every call of the KVStore service; see the module docstring.

    With `trust_socket`, a call on the Unix socket that sends no token is `UNRESTRICTED`
    (one that sends a token is held to it): whoever can open the socket (its owner, or
    `--socket-group`) can open the shared-memory arena too.
    """

    def __init__(self, path: Path, trust_socket: bool) -> None:
        self.path = path
        self.table = TenantTable.load(path)
        self.trust_socket = trust_socket
        # Guarded handlers by method, made once: the service's handlers never change.
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}
        # Streaming calls in progress that sent a token: a reload re-reads their rights.
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        guarded = self._guarded.get(details.method)
        if guarded is not None:
            return guarded
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE}/"):
            return handler
        kind = ("stream" if handler.request_streaming else "unary") + (
            "_stream" if handler.response_streaming else "_unary"
        )
        wrap = self._streaming if handler.response_streaming else self._unary
        guarded = self._guarded[details.method] = handler._replace(
            **{kind: wrap(getattr(handler, kind))}
        )
        return guarded

    def reload(self) -> None:
        """Read the tokens file again (SIGHUP). A file that does not load leaves the tenants
        loaded before in force: a typo must not lock every client out."""
        try:
            self.table = TenantTable.load(self.path)
        except TokenFileError as exc:
            log.error("%s; the tenants loaded before stay in force", exc)
            return
        log.info("auth-tokens: reloaded %d tenants from %s", len(self.table.tenants), self.path)
        for s in list(self._sessions):  # open streams get the new rights, or end
            assert s.token is not None
            s.update(self.table.authenticate(s.token))

    async def _tenant(self, context: grpc.aio.ServicerContext) -> Tenant:
        return (await self._authenticate(context))[0]

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> tuple[Tenant, str | None]:
        """The caller's tenant and the token that names it (None: trusted without one)."""
        token = bearer_token(context.invocation_metadata())
        if token is None:
            if self.trust_socket and str(context.peer()).startswith("unix:"):
                return UNRESTRICTED, None
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this server requires a token: send `authorization: Bearer <token>` "
                "(KVClient(..., token=...) or KVSTORE_TOKEN)",
            )
        tenant = self.table.authenticate(token) if token is not None else None
        if tenant is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        assert tenant is not None
        return tenant, token

    def _unary(self, behavior: Behavior) -> Behavior:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _caller.set(await self._tenant(context))
            return await behavior(request, context)

        return unary

    def _streaming(self, behavior: Behavior) -> Behavior:
        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            tenant, token = await self._authenticate(context)
            _caller.set(tenant)
            current = Session(tenant, token)
            _session.set(current)
            if token is not None:
                self._sessions.add(current)
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                self._sessions.discard(current)

        return streaming


def mint_token(name: str, read: Sequence[str], write: Sequence[str]) -> tuple[str, str]:
    """A new token for tenant `name`, and the TOML entry that admits it."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    entry = "\n".join(
        [
            "[[tenants]]",
            f"name = {json.dumps(name)}",
            f'tokens = ["{token_hash(token)}"]',
            f"read = {json.dumps(list(read))}",
            f"write = {json.dumps(list(write))}",
        ]
    )
    return token, entry


@dataclass
class ServerSecurity:
    """What `serve` needs from `--tls-*`, `--auth-tokens` and `--socket-group`, read and
    checked at start: a bad file stops the server with a message naming it."""

    tls: grpc.ServerCredentials | None
    interceptors: list[grpc.aio.ServerInterceptor]
    group: int | None  # gid given the socket and the shared-memory files, or None

    @classmethod
    def load(cls, config: ServerConfig) -> ServerSecurity:
        tls = None
        if config.tls_cert is not None and config.tls_key is not None:
            tls = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        interceptors = []
        if config.auth_tokens is not None:
            interceptors.append(AuthInterceptor(config.auth_tokens, config.trust_socket))
        gid = grp.getgrnam(config.socket_group).gr_gid if config.socket_group else None
        return cls(tls, interceptors, gid)

    def reload_on_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        """With tokens, SIGHUP reloads the tokens file until `stop_reloading`."""
        for interceptor in self.interceptors:
            if isinstance(interceptor, AuthInterceptor):
                loop.add_signal_handler(signal.SIGHUP, interceptor.reload)

    def stop_reloading(self, loop: asyncio.AbstractEventLoop) -> None:
        if any(isinstance(i, AuthInterceptor) for i in self.interceptors):
            loop.remove_signal_handler(signal.SIGHUP)


def share_files(gid: int | None, paths: Sequence[Path]) -> None:
    """Owner-only (0600) files, or owner and group `gid` (0660); never other users."""
    for path in paths:
        if gid is not None:
            try:
                os.chown(path, -1, gid)
            except PermissionError:
                raise RuntimeError(
                    f"socket-group: cannot give {path} to group {grp.getgrgid(gid).gr_name}: "
                    "the server's user must be a member of it"
                ) from None
        os.chmod(path, 0o600 if gid is None else 0o660)
