"""The ssd tier: containers in one LMDB environment under the data directory.

Each value is two records under the same LMDB key (namespace length, namespace, 32-byte
key): its container header in the `meta` database and its payload in the `data` database,
so a large payload goes from the host arena to LMDB without being copied to glue on a
header, and the index is rebuilt on start by reading headers alone. Every read verifies the
payload's xxh3-64 against the header; a mismatch raises `DataLoss`.

When a commit reaches the disk depends on `durability`:
- "sync": LMDB flushes the data pages of every commit before writing its meta page, so a
  machine crash cannot leave a meta page pointing at unwritten pages, and `durable()` then
  flushes the meta pages too. A writer calls `durable()` before acknowledging a put; callers
  that arrive while a flush runs share the next one (group commit), so concurrent puts pay
  for one flush, not one each.
- "async": commits are not flushed one by one (LMDB `sync=False`); the server calls `sync()`
  every second and at shutdown. A machine crash may lose the last second of puts, which for
  a cache is a miss.
- "none": nothing is flushed by us; the kernel writes back in its own time.
In "async" and "sync" modes, each time WRITEBACK_BYTES more have been committed, a flush
starts in the background (writeback): the disk takes what was written while more is
written, so a stream of writes (the ssd writer's) runs at the rate of the slower of the two
rather than their sum, and the next `sync()` waits for at most that much.
A process crash (`kill -9`) loses nothing LMDB committed in any mode: the writes are in the
kernel's page cache. LMDB discards a transaction the crash cut short.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

from kvstore.codecs.container import (
    ContainerError,
    ValueHeader,
    checksum,
    decode_header,
    encode_header,
)
from kvstore.errors import DataLoss
from kvstore.tiers.base import Buffer, StorageTier, TierError, TierFull

log = logging.getLogger(__name__)

_PAGE = 4096
# A background flush starts each time this many more bytes have been committed (and none
# is running): dirty pages are written while the next ones are, not all at the next sync.
# Measured on an H200 host writing ~270 MB of cachegen records and flushing once at the
# end (fp16 GB/s): no writeback 4.4, 64 MiB 6.1, 16 MiB 6.3; the ssd writer's demotion
# with GPU encoding 2.3 / 2.9 / 3.3 (the last flush waits for less).
WRITEBACK_BYTES = 16 << 20


def record_key(namespace: str, key: bytes) -> bytes:
    ns = namespace.encode()
    return bytes([len(ns)]) + ns + key


def split_record_key(rkey: bytes) -> tuple[str, bytes]:
    n = rkey[0]
    return rkey[1 : 1 + n].decode(), bytes(rkey[1 + n :])


class LmdbTier(StorageTier):
    """LMDB-backed tier holding at most `capacity_bytes` of values."""

    name = "ssd"

    def __init__(self, path: Path, capacity_bytes: int, durability: str = "async") -> None:
        self.path = Path(path)
        self.durability = durability
        self.path.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        # LMDB needs room beyond the values: B-tree pages, and free pages it cannot reuse
        # while a reader holds an old snapshot. Our own accounting enforces capacity_bytes.
        map_size = capacity_bytes + capacity_bytes // 4 + (64 << 20)
        self.env = lmdb.open(
            str(self.path),
            map_size=map_size,
            max_dbs=2,
            sync=durability == "sync",
            metasync=False,  # the meta page is flushed by durable(), once for many commits
            readahead=False,
            max_readers=256,
        )
        # Reader slots a killed server left in the lock file would pin old snapshots, so
        # LMDB could never reuse the pages they see and the file would grow to its map size.
        stale = self.env.reader_check()
        if stale:
            log.info("ssd tier: cleared %d reader slots of a process that died", stale)
        self._meta = self.env.open_db(b"meta")
        self._data = self.env.open_db(b"data")
        self._used = 0
        self.dropped = 0  # records `scan` found unreadable and deleted
        # Group commit: `_committed` counts write transactions, `_flushed` how many of them
        # the last flush covered; one thread flushes while the others wait for it.
        self._committed = 0
        self._flushed = 0
        self._flush_lock = threading.Lock()
        self._unflushed_bytes = 0  # committed since the last writeback began
        self._writeback: threading.Thread | None = None

    @property
    def used_bytes(self) -> int:
        return self._used

    def record_bytes(self, header: ValueHeader) -> int:
        # Values live in page-aligned overflow pages; the header costs about a page of B-tree.
        return -(-header.payload_len // _PAGE) * _PAGE + _PAGE

    def put(self, namespace: str, key: bytes, header: ValueHeader, payload: Buffer) -> None:
        size = self.record_bytes(header)
        rkey = record_key(namespace, key)
        try:
            # The record it replaces, read in the same transaction (not in a read
            # transaction of its own before it: a tenth of the ssd writer's GIL-held time);
            # TierFull rolls the transaction back.
            with self.env.begin(write=True) as txn:
                old = self._size_of(txn.replace(rkey, encode_header(header), db=self._meta))
                if self._used - old + size > self.capacity_bytes:
                    raise TierFull(
                        f"ssd tier full ({self._used} of {self.capacity_bytes} bytes used)"
                    )
                txn.put(rkey, payload, db=self._data)
        except lmdb.MapFullError:
            raise TierFull("ssd tier's LMDB map is full") from None
        except lmdb.Error as exc:  # ENOSPC, EIO: the transaction was rolled back
            raise TierError(f"LMDB write failed in {self.path}: {exc}") from None
        self._used += size - old
        self._committed += 1
        if self.durability != "none":  # there, nothing is ever flushed by us
            self._unflushed_bytes += size
            if self._unflushed_bytes >= WRITEBACK_BYTES:
                self._start_writeback()

    def _size_of(self, raw: bytes | None) -> int:
        """The bytes a record with header `raw` (None: no record) takes."""
        if raw is None:
            return 0
        try:
            return self.record_bytes(decode_header(raw)[0])
        except ContainerError:
            return 0

    @contextmanager
    def read(self, namespace: str, key: bytes) -> Iterator[tuple[ValueHeader, memoryview]]:
        rkey = record_key(namespace, key)
        with self.env.begin(buffers=True) as txn:
            raw = txn.get(rkey, db=self._meta)
            if raw is None:
                raise KeyError(key)
            try:
                header, _ = decode_header(raw)
            except ContainerError as exc:
                raise DataLoss(f"ssd tier: header of {key.hex()} is unreadable: {exc}") from None
            data = txn.get(rkey, db=self._data)
            if data is None or len(data) != header.payload_len:
                got = "no payload" if data is None else f"{len(data)} bytes"
                raise DataLoss(
                    f"ssd tier: payload of {key.hex()} is {got}, header says "
                    f"{header.payload_len} bytes"
                )
            if checksum(data) != header.payload_checksum:
                raise DataLoss(f"ssd tier: checksum mismatch for {key.hex()}; value dropped")
            yield header, data

    def delete(self, namespace: str, key: bytes) -> None:
        rkey = record_key(namespace, key)
        try:
            with self.env.begin(write=True) as txn:
                size = self._size_of(txn.pop(rkey, db=self._meta))
                txn.delete(rkey, db=self._data)
        except lmdb.Error as exc:
            raise TierError(f"LMDB delete failed in {self.path}: {exc}") from None
        self._used -= size
        self._committed += 1

    def scan(self) -> Iterator[tuple[str, bytes, ValueHeader]]:
        """Yield stored values' headers; deletes records whose header is unreadable."""
        bad: list[bytes] = []
        self._used = 0
        with self.env.begin() as txn:
            for rkey, raw in txn.cursor(db=self._meta):
                try:
                    header, _ = decode_header(raw)
                    namespace, key = split_record_key(rkey)
                except (ContainerError, UnicodeDecodeError, IndexError) as exc:
                    log.warning("ssd tier: dropping unreadable record %s: %s", rkey.hex(), exc)
                    bad.append(rkey)
                    continue
                self._used += self.record_bytes(header)
                yield namespace, key, header
        self.dropped += len(bad)
        if bad:
            with self.env.begin(write=True) as txn:
                for rkey in bad:
                    txn.delete(rkey, db=self._meta)
                    txn.delete(rkey, db=self._data)
            self._committed += 1

    def count(self) -> int:
        with self.env.begin() as txn:
            return int(txn.stat(self._meta)["entries"])

    def sync(self) -> None:
        """Flush every commit so far to disk (the periodic flush of "async")."""
        if self.durability != "none":
            self._flush()

    def durable(self) -> None:
        """Return once every write committed before this call is on disk, in "sync" mode;
        at once otherwise. Safe to call from many threads: they share flushes."""
        if self.durability == "sync":
            self._flush()

    def _flush(self) -> None:
        target = self._committed
        if self._flushed >= target:
            return
        with self._flush_lock:
            if self._flushed >= target:
                return  # the flush this thread waited behind covered it
            upto = self._committed
            self.env.sync(True)
            self._flushed = upto

    def _start_writeback(self) -> None:
        """Flush in the background what has been committed, unless a flush runs already."""
        if self._writeback is not None and self._writeback.is_alive():
            return
        self._unflushed_bytes = 0
        self._writeback = threading.Thread(
            target=self._flush_quietly, name="kvstore-ssd-writeback", daemon=True
        )
        self._writeback.start()

    def _flush_quietly(self) -> None:
        try:
            self._flush()
        except lmdb.Error as exc:  # the next sync() tries again, and raises
            log.warning("ssd tier: background flush of %s failed: %s", self.path, exc)

    def close(self) -> None:
        if self._writeback is not None:
            self._writeback.join()
        self.sync()
        self.env.close()
