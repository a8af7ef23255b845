"""The tokens file, token checks, namespace globs, TLS material checks and the config's
security settings, without a server (tests/e2e/test_security.py runs them end to end)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from kvstore.auth import (
    READ,
    WRITE,
    Tenant,
    TenantTable,
    TokenFileError,
    bearer_token,
    mint_token,
    token_hash,
)
from kvstore.config import ConfigError, ServerConfig
from kvstore.tls import TLSConfigError, server_credentials


def _table(tmp_path: Path, text: str, name: str = "tokens.toml") -> TenantTable:
    path = tmp_path / name
    path.write_text(text)
    return TenantTable.load(path)


def test_a_minted_token_is_admitted_by_its_entry_and_no_other_token_is(tmp_path: Path) -> None:
    token, entry = mint_token("team-a", ["team-a/*"], ["team-a/llama"])
    assert token not in entry  # the file keeps only the hash
    other, other_entry = mint_token("team-b", ["*"], [])
    table = _table(tmp_path, entry + "\n\n" + other_entry)
    a = table.authenticate(token)
    assert a == Tenant("team-a", ("team-a/*",), ("team-a/llama",))
    assert table.authenticate(other) == Tenant("team-b", ("*",), ())
    for wrong in ("", token[:-1], token + "x", token_hash(token)):
        assert table.authenticate(wrong) is None


def test_json_and_toml_files_say_the_same(tmp_path: Path) -> None:
    token, entry = mint_token("t", ["x/*"], ["x/*"])
    tenant = {"name": "t", "tokens": [token_hash(token)], "read": ["x/*"], "write": ["x/*"]}
    doc = {"tenants": [tenant]}
    from_json = _table(tmp_path, json.dumps(doc), "tokens.json")
    from_toml = _table(tmp_path, entry)
    assert from_json.authenticate(token) == from_toml.authenticate(token) is not None


def test_namespace_globs_grant_read_and_write_apart() -> None:
    t = Tenant("t", read=("shared/*", "t/*"), write=("t/*",))
    assert t.may("t/llama", READ) and t.may("t/llama", WRITE)
    assert t.may("shared/llama", READ) and not t.may("shared/llama", WRITE)
    assert not t.may("other/llama", READ) and not t.may("T/llama", READ)  # case matters
    assert not t.maps_memory
    assert Tenant("ops", ("*",), ("*",)).maps_memory


HASH = token_hash("kvs_x")


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "no [[tenants]] list"),
        ("tenants = 3", "no [[tenants]] list"),
        ("[[tenants]]\ntokens = []\n", "needs a non-empty name"),
        ('[[tenants]]\nname = "a"\ntokens = ["kvs_x"]\nread = ["*"]', "never the token itself"),
        ('[[tenants]]\nname = "a"\ntokens = []\nread = ["*"]', "must name at least one"),
        (f'[[tenants]]\nname = "a"\ntokens = ["{HASH}"]', "may neither read nor write"),
        (f'[[tenants]]\nname = "a"\ntokens = ["{HASH}"]\nread = "*"', "list of non-empty strings"),
        (f'[[tenants]]\nname = "a"\ntokens = ["{HASH}"]\nread = ["*"]\nadmin = true',
         "unknown field 'admin'"),
        (f'[[tenants]]\nname = "a"\ntokens = ["{HASH}"]\nread = ["*"]\n'
         f'[[tenants]]\nname = "a"\ntokens = ["{token_hash("kvs_y")}"]\nread = ["*"]',
         "listed twice"),
        (f'[[tenants]]\nname = "a"\ntokens = ["{HASH}"]\nread = ["*"]\n'
         f'[[tenants]]\nname = "b"\ntokens = ["{HASH}"]\nread = ["*"]',
         "also tenant 'a'"),
        ("[[tenants]\n", "not valid TOML"),
    ],
)  # fmt: skip
def test_a_malformed_tokens_file_is_refused_with_a_reason(
    tmp_path: Path, text: str, says: str
) -> None:
    with pytest.raises(TokenFileError) as err:
        _table(tmp_path, text)
    assert says in str(err.value)
    assert str(err.value).startswith("auth-tokens: ")


def test_a_missing_tokens_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read"):
        TenantTable.load(tmp_path / "nope.toml")


def test_bearer_token_reads_only_the_bearer_scheme() -> None:
    assert bearer_token([("x-request-id", "1"), ("authorization", "Bearer kvs_a")]) == "kvs_a"
    assert bearer_token([("authorization", b"bearer kvs_a")]) == "kvs_a"
    assert bearer_token([("authorization", "Basic dXNlcjpwdw==")]) is None
    assert bearer_token([("x-request-id", "1")]) is None
    assert bearer_token(None) is None


def test_server_credentials_refuse_an_encrypted_or_foreign_key(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, other = ca.issue_cert("localhost"), ca.issue_cert("localhost")
    cert_pem, key_pem = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    assert server_credentials(cert_pem, key_pem) is not None
    foreign = tmp_path / "other.pem"
    other.private_key_pem.write_to_path(str(foreign))
    with pytest.raises(TLSConfigError, match="is not the private key"):
        server_credentials(cert_pem, foreign)
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="encrypted"):
        server_credentials(cert_pem, encrypted)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(TLSConfigError, match="not a PEM file"):
        server_credentials(cert_pem, garbage)


@pytest.mark.parametrize(
    "settings, says",
    [
        ({"tls_cert": "c.pem", "listen": "127.0.0.1:1"}, "tls-cert and tls-key go together"),
        ({"tls_client_ca": "ca.pem"}, "client certificates need TLS"),
        ({"tls_cert": "c.pem", "tls_key": "k.pem"}, "set listen too"),
        ({"trust_socket": True}, "only means something with auth-tokens"),
        ({"socket_group": "no-such-group-kvstore"}, "no group named"),
        ({"trust_socket": "maybe", "auth_tokens": "t.toml"}, "trust-socket: expected true"),
    ],
)
def test_security_settings_are_checked_together(settings: dict, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        ServerConfig(**settings)
    assert says in str(err.value)
