"""`kvstore.client.default_address`: where a client finds the server from its environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.client import default_address


def test_environment_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("KVSTORE_ADDRESS", "KVSTORE_SOCKET", "KVSTORE_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_address() == f"unix://{tmp_path / 'kvstore-data' / 'kvstore.sock'}"
    monkeypatch.setenv("KVSTORE_DATA_DIR", "/srv/kv")
    assert default_address() == "unix:///srv/kv/kvstore.sock"
    monkeypatch.setenv("KVSTORE_SOCKET", "/run/kvstore/kvstore.sock")
    assert default_address() == "unix:///run/kvstore/kvstore.sock"
    monkeypatch.setenv("KVSTORE_ADDRESS", "10.0.0.7:50051")
    assert default_address() == "10.0.0.7:50051"
