"""Fixtures shared by the unit tests of several modules."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.config import ServerConfig
from kvstore.store import Store

MakeStore = Callable[..., Store]


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[MakeStore]:
    """`make_store(**settings)`: stores with a 4 MiB cpu arena and 16 MiB of ssd by default,
    closed at teardown."""
    opened: list[Store] = []

    def make(**overrides: Any) -> Store:
        settings: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "cpu_bytes": "4MiB",
            "ssd_bytes": "16MiB",
        }
        settings.update(overrides)
        s = Store(ServerConfig(**settings))
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()
