"""The client's reading of packed answers (SliceTable): what it records, what it refuses."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kvstore.client._core import _Assembler
from kvstore.client._transfer import Header
from kvstore.errors import DataLoss
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire import Piece


@dataclass
class FakeArena:
    dev: int = 5
    ino: int = 77
    size: int = 1 << 20

    def holds(self, dev: int, ino: int, offset: int, nbytes: int) -> bool:
        return (dev, ino) == (self.dev, self.ino) and 0 <= offset <= self.size - nbytes


def table(**changes: object) -> pb.SliceTable:
    """Two float16 values: key #2 of shape (4, 8) and key #0 of shape (3,)."""
    t = pb.SliceTable(
        index=[2, 0], lease=[11, 12], offset=[0, 4096], gpu_pool=[0, 0], nbytes=[64, 6],
        checksum=[101, 102], dtype=[0, 0], dtypes=["float16"], rank=[2, 1], dims=[4, 8, 3],
        tier=[0, 0], tiers=["cpu"],
        regions=[pb.RegionIdentity(gpu_pool=0, arena_dev=5, arena_ino=77)],
    )  # fmt: skip
    for name, value in changes.items():
        field = getattr(t, name)
        del field[:]
        field.extend(value)  # type: ignore[call-overload]
    return t


def assembled(t: pb.SliceTable, arena: FakeArena | None = None, keep: bool = True) -> _Assembler:
    sink = _Assembler(3, arena or FakeArena(), keep_shared=keep)  # type: ignore[arg-type]
    sink(Piece(pb.GetPiece(slices=t), b""))
    return sink


def test_a_table_becomes_slices_and_leases() -> None:
    sink = assembled(table())
    assert sink.leases == [11, 12] and not sink.stale
    assert sink.shared[2].header == Header("float16", (4, 8), 64, 101)
    assert (sink.shared[2].offset, sink.shared[2].lease, sink.shared[2].pool) == (0, 11, 0)
    assert sink.shared[0].header == Header("float16", (3,), 6, 102)
    assert sink.tiers == ["cpu", None, "cpu"] and 1 not in sink.shared


def test_a_table_of_another_arena_marks_the_read_stale() -> None:
    sink = assembled(table(), FakeArena(ino=78))  # the server restarted since we mapped
    assert sink.stale and sink.leases == [11, 12] and not sink.shared


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"lease": [11]}, "columns disagree"),
        ({"dims": [4, 8]}, "columns disagree"),
        ({"index": [2, 3]}, "out of range"),
        ({"dtype": [0, 1]}, "out of range"),
        ({"tier": [1, 0]}, "out of range"),
        ({"nbytes": [64, 8]}, "inconsistent"),
        ({"gpu_pool": [0, 3]}, "did not identify"),
    ],
)
def test_a_malformed_table_is_data_loss(changes: dict[str, list[object]], words: str) -> None:
    with pytest.raises(DataLoss, match=words):
        assembled(table(**changes))


def test_a_table_to_a_read_that_copies_is_refused() -> None:
    with pytest.raises(DataLoss, match="asked for none"):
        assembled(table(), keep=False)
