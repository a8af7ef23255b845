"""Security against a real server: tenants and their tokens, lease binding, TLS and mTLS,
socket and shared-memory permissions, refusal to start on bad certificates or tokens."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
import trustme
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub

from kvstore.auth import mint_token
from kvstore.client import AsyncKVClient, KVClient
from kvstore.errors import PermissionDenied, Unauthenticated, Unavailable
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from tests.e2e.conftest import ServerProcess
from tests.e2e.helpers import key, random_tensor
from tests.e2e.test_transfer import free_port

A_NS = "tenant-a/llama"
B_NS = "tenant-b/llama"
SHARED_NS = "shared/llama"
SMALL = ("--cpu-bytes", "64MiB", "--ssd-bytes", "256MiB")


class Tenants:
    """A tokens file with tenants a (tenant-a/*), b (tenant-b/*), and ops and ops2 (every
    namespace, so the server hands them shared memory); `token[name]`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.token: dict[str, str] = {}
        entries = []
        for name, glob in (("a", "tenant-a/*"), ("b", "tenant-b/*"), ("ops", "*"), ("ops2", "*")):
            self.token[name], entry = mint_token(name, [glob], [glob])
            entries.append(entry)
        path.write_text("\n\n".join(entries) + "\n")


@pytest.fixture
def tenants(tmp_path: Path) -> Tenants:
    return Tenants(tmp_path / "tokens.toml")


@pytest.fixture
def secured(start_server: Callable[..., ServerProcess], tenants: Tenants) -> ServerProcess:
    return start_server(*SMALL, "--auth-tokens", str(tenants.path))


def _same(got: torch.Tensor | None, want: torch.Tensor) -> bool:
    """Byte equality: the random values hold NaNs."""
    return got is not None and torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def stub(secured: ServerProcess) -> Iterator[pb_grpc.KVStoreStub]:
    with grpc.insecure_channel(secured.address) as channel:
        yield pb_grpc.KVStoreStub(channel)


def _refusal(op: Callable[[], object]) -> str:
    with pytest.raises(PermissionDenied) as err:
        op()
    return str(err.value)


def test_a_tenant_cannot_read_list_delete_pin_or_detect_anothers_keys(
    secured: ServerProcess, tenants: Tenants
) -> None:
    values = {i: random_tensor((64, 1024), torch.float16, seed=i) for i in range(4)}
    with KVClient(secured.address, B_NS, token=tenants.token["b"]) as b:
        b.batch_put([key(i) for i in values], list(values.values()))
        b.pin([key(0)])
    present, absent = key(0), key(99)
    out = torch.empty(64, 1024, dtype=torch.float16)
    with KVClient(secured.address, B_NS, token=tenants.token["a"]) as a_in_b:
        attempts: dict[str, Callable[[bytes], object]] = {
            "get": a_in_b.get,
            "batch_get": lambda k: a_in_b.batch_get([k]),
            "get_into": lambda k: a_in_b.get_into([k], [out]).wait(),
            "acquire": lambda k: a_in_b.acquire([k]),
            "exists": lambda k: a_in_b.exists([k]),
            "lookup": lambda k: a_in_b.lookup([k]),
            "delete": lambda k: a_in_b.delete([k]),
            "pin": lambda k: a_in_b.pin([k]),
            "unpin": lambda k: a_in_b.unpin([k]),
            "put": lambda k: a_in_b.put(k, values[1]),
        }
        for name, attempt in attempts.items():
            said_present = _refusal(lambda attempt=attempt: attempt(present))
            said_absent = _refusal(lambda attempt=attempt: attempt(absent))
            assert said_present == said_absent, name  # nothing tells the two apart
            assert B_NS in said_present
        assert B_NS in _refusal(lambda: a_in_b.entries(B_NS))
    with KVClient(secured.address, A_NS, token=tenants.token["a"]) as a:
        a.put(key(7), values[3])
        listed = a.entries()  # every namespace it may read: its own
        assert [(e.namespace, e.header.key) for e in listed] == [(A_NS, key(7))]
        stats = a.stats()  # no way into the shared memory, whose pages hold b's values too
        assert stats.host_arena_path == "" and stats.gpu_pools == []
        assert _same(a.get(key(7)), values[3])
    # b's data is intact and the server still serves it.
    with KVClient(secured.address, B_NS, token=tenants.token["b"]) as b:
        for i, v in values.items():
            assert _same(b.get(key(i)), v)
        assert b.unpin([key(0)]) == 1  # b's pin survived a's attempt to unpin it
        assert {e.namespace for e in b.entries()} == {B_NS}
    with KVClient(secured.address, SHARED_NS, token=tenants.token["ops"]) as ops:
        assert ops.stats().host_arena_path != ""  # may use every namespace: maps the arena
        assert {e.namespace for e in ops.entries()} == {A_NS, B_NS}


@pytest.mark.parametrize("token", [None, "kvs_not-a-token-anyone-was-given"])
def test_a_missing_or_wrong_token_is_unauthenticated_on_every_data_call(
    secured: ServerProcess, tenants: Tenants, stub: pb_grpc.KVStoreStub, token: str | None
) -> None:
    metadata = _metadata(token) if token else None
    keys = pb.KeysRequest(namespace=B_NS, keys=[key(0)])
    calls = {
        "Lookup": lambda: stub.Lookup(keys, metadata=metadata),
        "Exists": lambda: stub.Exists(keys, metadata=metadata),
        "Delete": lambda: stub.Delete(keys, metadata=metadata),
        "Get": lambda: list(stub.Get(pb.GetRequest(namespace=B_NS, key=key(0)), metadata=metadata)),
        "Put": lambda: stub.Put(iter([pb.PutPiece(namespace=B_NS)]), metadata=metadata),
        "Stats": lambda: stub.Stats(pb.StatsRequest(), metadata=metadata),
        "List": lambda: list(stub.List(pb.ListRequest(), metadata=metadata)),
        "Release": lambda: stub.Release(pb.ReleaseRequest(calls=[1, 2, 3]), metadata=metadata),
        "Renew": lambda: stub.Renew(pb.RenewRequest(calls=[1]), metadata=metadata),
        "Commit": lambda: stub.Commit(pb.CommitRequest(abort_calls=[1]), metadata=metadata),
    }  # fmt: skip
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    with KVClient(secured.address, B_NS, token=token) as c, pytest.raises(Unauthenticated):
        c.get(key(0))  # a read reports no miss here: the caller must learn its token is bad
    # Health and reflection stay open for probes; the server keeps serving.
    with grpc.insecure_channel(secured.address) as channel:
        reply = HealthStub(channel).Check(HealthCheckRequest(service=""), timeout=5)
    assert reply.status == HealthCheckResponse.SERVING
    with KVClient(secured.address, B_NS, token=tenants.token["b"]) as b:
        b.put(key(1), random_tensor((8,), torch.float32))
        assert b.exists([key(1)]) == [True]


def test_leases_and_reservations_are_bound_to_their_tenant(
    secured: ServerProcess, tenants: Tenants, stub: pb_grpc.KVStoreStub
) -> None:
    """ops2 knows ops's lease ids, call numbers and reservation ids (as if it guessed them)
    and still cannot release, renew, commit or abort any of them."""
    ops, ops2 = _metadata(tenants.token["ops"]), _metadata(tenants.token["ops2"])
    value = random_tensor((256, 1024), torch.uint8, seed=3)
    with KVClient(secured.address, SHARED_NS, token=tenants.token["ops"]) as c:
        c.put(key(1), value)
    call = 7  # a small number, as a careless client might pick
    request = pb.GetRequest(namespace=SHARED_NS, key=key(1), shared=True, call=call)
    pieces = [a for p in stub.Get(request, metadata=ops) for a in p.batch or (p,)]
    lease = pieces[0].shared.lease
    assert lease, "ops maps the arena: the value comes as a shared slice under a lease"
    assert stub.Release(pb.ReleaseRequest(leases=[lease], calls=[call]), metadata=ops2).count == 0
    assert list(stub.Renew(pb.RenewRequest(calls=[call]), metadata=ops2).counts) == [0]
    assert stub.Stats(pb.StatsRequest(), metadata=ops).leases == 1
    assert list(stub.Renew(pb.RenewRequest(calls=[call]), metadata=ops).counts) == [1]
    assert stub.Release(pb.ReleaseRequest(calls=[call]), metadata=ops).count == 1
    assert stub.Stats(pb.StatsRequest(), metadata=ops).leases == 0

    header = pb.ValueHeader(key=key(2), dtype="uint8", shape=[4096], nbytes=4096, checksum=1)
    reserved = stub.Reserve(
        pb.ReserveRequest(namespace=SHARED_NS, values=[header], call=call), metadata=ops
    ).reservations[0]
    assert reserved.id
    with pytest.raises(grpc.RpcError) as err:
        stub.Commit(pb.CommitRequest(ids=[reserved.id], compute_checksums=True), metadata=ops2)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    stub.Commit(pb.CommitRequest(abort=[reserved.id], abort_calls=[call]), metadata=ops2)
    # Still ops's to commit: nothing above ended it.
    done = stub.Commit(pb.CommitRequest(ids=[reserved.id], compute_checksums=True), metadata=ops)
    assert list(done.tiers) == ["cpu"]


def test_trust_socket_lets_socket_callers_in_without_a_token(
    start_server: Callable[..., ServerProcess], tenants: Tenants
) -> None:
    port = free_port()
    tokens = ("--auth-tokens", str(tenants.path), "--trust-socket")
    srv = start_server(*SMALL, *tokens, "--listen", f"127.0.0.1:{port}")
    with KVClient(srv.address, B_NS) as local:  # no token, on the socket
        local.put(key(1), random_tensor((8,), torch.float32))
        assert local.stats().host_arena_path != ""
    a = KVClient(srv.address, B_NS, token=tenants.token["a"])
    with a, pytest.raises(PermissionDenied):  # a token, if sent, still binds
        a.exists([key(1)])
    with KVClient(f"127.0.0.1:{port}", B_NS) as remote, pytest.raises(Unauthenticated):
        remote.exists([key(1)])


# ------------------------------------------------------------------------------ TLS


class Certs:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a
    second CA that signed neither, as PEM files in `dir`."""

    def __init__(self, dir: Path) -> None:
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()
        server = self.ca.issue_cert("localhost", "127.0.0.1")
        client = self.ca.issue_cert("client@kvstore.test")
        self.ca_pem = dir / "ca.pem"
        self.other_ca_pem = dir / "other-ca.pem"
        self.server_pem, self.server_key = dir / "server.pem", dir / "server-key.pem"
        self.client_pem, self.client_key = dir / "client.pem", dir / "client-key.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        self.other_ca.cert_pem.write_to_path(str(self.other_ca_pem))
        server.cert_chain_pems[0].write_to_path(str(self.server_pem))
        server.private_key_pem.write_to_path(str(self.server_key))
        client.cert_chain_pems[0].write_to_path(str(self.client_pem))
        client.private_key_pem.write_to_path(str(self.client_key))

    def server_flags(self, port: int) -> tuple[str, ...]:
        tls = ("--tls-cert", str(self.server_pem), "--tls-key", str(self.server_key))
        return ("--listen", f"127.0.0.1:{port}", *tls)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def _fails_fast(op: Callable[[], object], expected: type[Exception], within: float = 15.0) -> str:
    start = time.monotonic()
    with pytest.raises(expected) as err:
        op()
    assert time.monotonic() - start < within  # an error, not a hang
    return str(err.value)


def test_tls_serves_clients_that_trust_its_ca_and_refuses_the_rest(
    start_server: Callable[..., ServerProcess], certs: Certs
) -> None:
    port = free_port()
    srv = start_server(*SMALL, *certs.server_flags(port))
    address = f"127.0.0.1:{port}"
    v = random_tensor((128, 256), torch.bfloat16, seed=1)
    with KVClient(address, A_NS, tls_ca=certs.ca_pem, timeout=5) as c:
        assert c.put(key(1), v) == "cpu"
        assert _same(c.get(key(1)), v)
    with KVClient(address, A_NS, tls_ca=certs.other_ca_pem, timeout=5) as c:
        said = _fails_fast(lambda: c.put(key(2), v), Unavailable)
        assert "handshake" in said.lower()
    with KVClient(address, A_NS, timeout=5) as c:  # plaintext to a TLS listener
        _fails_fast(lambda: c.put(key(2), v), Unavailable)
    # The certificate is checked for the name the client expects, not only its signer.
    by_name = {"tls_ca": certs.ca_pem, "timeout": 5}
    with KVClient(address, A_NS, tls_server_name="localhost", **by_name) as c:  # type: ignore[arg-type]
        assert c.exists([key(1)]) == [True]
    with KVClient(address, A_NS, tls_server_name="elsewhere.test", **by_name) as c:  # type: ignore[arg-type]
        _fails_fast(lambda: c.stats(), Unavailable)
    with KVClient(srv.address, A_NS) as local:  # the socket stays as it was
        assert _same(local.get(key(1)), v)
        assert local.exists([key(2)]) == [False]


def test_a_tls_client_to_a_plaintext_listener_gets_a_clear_error(
    start_server: Callable[..., ServerProcess], certs: Certs
) -> None:
    port = free_port()
    start_server(*SMALL, "--listen", f"127.0.0.1:{port}")
    with KVClient(f"127.0.0.1:{port}", A_NS, tls_ca=certs.ca_pem, timeout=5) as c:
        said = _fails_fast(lambda: c.stats(), Unavailable)
    assert "may not use TLS" in said


def test_mtls_requires_a_client_certificate_and_tokens_work_over_it(
    start_server: Callable[..., ServerProcess], certs: Certs, tenants: Tenants
) -> None:
    port = free_port()
    start_server(
        *SMALL,
        *certs.server_flags(port),
        "--tls-client-ca",
        str(certs.ca_pem),
        "--auth-tokens",
        str(tenants.path),
    )
    address = f"127.0.0.1:{port}"
    v = random_tensor((64, 64), torch.float32, seed=2)
    mtls = {"tls_ca": certs.ca_pem, "tls_cert": certs.client_pem, "tls_key": certs.client_key}
    with KVClient(address, A_NS, tls_ca=certs.ca_pem, token=tenants.token["a"], timeout=5) as c:
        _fails_fast(lambda: c.put(key(1), v), Unavailable)  # no client certificate
    with KVClient(address, A_NS, token=tenants.token["a"], timeout=5, **mtls) as a:
        assert a.put(key(1), v) == "cpu"
        assert _same(a.get(key(1)), v)
    a_in_b = KVClient(address, B_NS, token=tenants.token["a"], timeout=5, **mtls)
    with a_in_b, pytest.raises(PermissionDenied):
        a_in_b.get(key(1))
    with KVClient(address, A_NS, timeout=5, **mtls) as anonymous, pytest.raises(Unauthenticated):
        anonymous.get(key(1))


def _server_refuses(tmp_path: Path, *flags: str) -> str:
    command = [sys.executable, "-m", "kvstore.server_cli", "--data-dir", str(tmp_path / "d")]
    proc = subprocess.run([*command, *SMALL, *flags], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert not (tmp_path / "d" / "kvstore.sock").exists()
    return proc.stderr


def test_the_server_refuses_to_start_on_bad_certificates_or_tokens(
    tmp_path: Path, certs: Certs
) -> None:
    other = certs.ca.issue_cert("localhost")
    other_key = tmp_path / "other-key.pem"
    other.private_key_pem.write_to_path(str(other_key))
    port = f"127.0.0.1:{free_port()}"
    tls = ("--listen", port, "--tls-cert", str(certs.server_pem))
    said = _server_refuses(tmp_path, *tls, "--tls-key", str(other_key))
    assert "is not the private key of tls-cert" in said
    said = _server_refuses(tmp_path, *tls, "--tls-key", str(tmp_path / "missing.pem"))
    assert "tls-key: cannot read" in said
    said = _server_refuses(tmp_path, *tls, "--tls-key", str(certs.server_key),
                           "--tls-client-ca", str(tmp_path / "tokens.toml"))  # fmt: skip
    assert "tls-client-ca: cannot read" in said
    said = _server_refuses(tmp_path, "--tls-cert", str(certs.server_pem))
    assert "tls-cert and tls-key go together" in said
    bad = tmp_path / "tokens.toml"
    bad.write_text('[[tenants]]\nname = "a"\ntokens = ["kvs_plain-token"]\nread = ["*"]\n')
    said = _server_refuses(tmp_path, "--auth-tokens", str(bad))
    assert "never the token itself" in said


# ------------------------------------------------------------------------------ files


def _mode_and_group(path: Path) -> tuple[int, int]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), st.st_gid


def test_socket_and_shared_memory_are_owner_only_or_group_only(
    start_server: Callable[..., ServerProcess],
) -> None:
    srv = start_server(*SMALL, "--gpu-twin", "--tiers", "gpu,cpu,ssd", "--gpu-bytes", "8MiB")
    with srv.client() as c:
        s = c.stats()
        files = [srv.socket, Path(s.host_arena_path), Path(s.gpu_pools[0].twin_path)]
    for f in files:
        assert _mode_and_group(f)[0] == 0o600, f
    group = grp.getgrgid(os.getgid()).gr_name
    srv = start_server(*SMALL, "--gpu-twin", "--tiers", "gpu,cpu,ssd", "--gpu-bytes", "8MiB",
                       "--socket-group", group, name="grouped")  # fmt: skip
    with srv.client() as c:
        s = c.stats()
        files = [srv.socket, Path(s.host_arena_path), Path(s.gpu_pools[0].twin_path)]
    for f in files:
        assert _mode_and_group(f) == (0o660, os.getgid()), f


def _admin(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    return subprocess.run(
        [sys.executable, "-m", "kvstore.admin_cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_the_admin_cli_mints_tokens_and_speaks_tls_and_tokens(
    start_server: Callable[..., ServerProcess], certs: Certs, tmp_path: Path
) -> None:
    minted = _admin("token", "ops", "--read", "*", "--write", "*")
    assert minted.returncode == 0, minted.stderr
    token = minted.stderr.split("token: ", 1)[1].split()[0]
    assert token not in minted.stdout
    tokens = tmp_path / "admin-tokens.toml"
    tokens.write_text(minted.stdout)  # `>> tokens.toml`
    port = free_port()
    srv = start_server(*SMALL, *certs.server_flags(port), "--auth-tokens", str(tokens))
    with KVClient(srv.address, A_NS, token=token) as c:
        c.put(key(1), random_tensor((8,), torch.float32))
    tls = ("--address", f"127.0.0.1:{port}", "--tls-ca", str(certs.ca_pem))
    listed = _admin(*tls, "--token", token, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["namespace"] == A_NS
    refused = _admin(*tls, "ls")
    assert refused.returncode == 1 and "token" in refused.stderr
    health = _admin(*tls, "health")  # open without a token, over TLS
    assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stderr


def test_sighup_reloads_the_tokens_file_and_keeps_the_old_one_if_the_new_is_bad(
    start_server: Callable[..., ServerProcess], tenants: Tenants
) -> None:
    srv = start_server(*SMALL, "--auth-tokens", str(tenants.path))
    token, entry = mint_token("c", ["tenant-c/*"], ["tenant-c/*"])
    c = KVClient(srv.address, "tenant-c/llama", token=token)

    def admitted() -> bool:
        try:
            c.stats()  # not a read: a dead server raises rather than reporting a miss
        except Unauthenticated:
            return False
        return True

    def after_sighup(expected: bool) -> bool:
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while admitted() != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return admitted()

    with c:
        assert not admitted()
        tenants.path.write_text(tenants.path.read_text() + "\n" + entry + "\n")
        assert after_sighup(True)
        tenants.path.write_text("[[tenants]\n")  # a typo: the tenants loaded before stay
        assert after_sighup(True) and "stay in force" in srv.log()
        with KVClient(srv.address, A_NS, token=tenants.token["a"]) as a:
            a.put(key(1), random_tensor((8,), torch.float32))
    assert srv.alive()


def test_the_async_client_speaks_tls_and_tokens(
    start_server: Callable[..., ServerProcess], certs: Certs, tenants: Tenants
) -> None:
    port = free_port()
    start_server(*SMALL, *certs.server_flags(port), "--auth-tokens", str(tenants.path))
    v = random_tensor((32, 32), torch.float16, seed=4)

    async def run() -> None:
        address = f"127.0.0.1:{port}"
        async with AsyncKVClient(address, A_NS, tls_ca=certs.ca_pem, token=tenants.token["a"]) as a:
            assert await a.put(key(1), v) == "cpu"
            assert _same(await a.get(key(1)), v)
        async with AsyncKVClient(address, B_NS, tls_ca=certs.ca_pem, token=tenants.token["a"]) as a:
            with pytest.raises(PermissionDenied):
                await a.exists([key(1)])
        async with AsyncKVClient(address, A_NS, tls_ca=certs.ca_pem) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.get(key(1))
        async with AsyncKVClient(address, A_NS, token=tenants.token["a"], timeout=5) as plain:
            with pytest.raises(Unavailable):  # plaintext to the TLS listener
                await plain.stats()

    asyncio.run(run())
