from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ValueHeader(_message.Message):
    __slots__ = ("key", "dtype", "shape", "nbytes", "checksum", "cost", "newest", "position")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    checksum: int
    cost: float
    newest: bool
    position: int
    def __init__(self, key: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., checksum: _Optional[int] = ..., cost: _Optional[float] = ..., newest: _Optional[bool] = ..., position: _Optional[int] = ...) -> None: ...

class PutPiece(_message.Message):
    __slots__ = ("namespace", "header", "data")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    header: ValueHeader
    data: bytes
    def __init__(self, namespace: _Optional[str] = ..., header: _Optional[_Union[ValueHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored", "tiers")
    STORED_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    stored: int
    tiers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stored: _Optional[int] = ..., tiers: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("namespace", "key", "shared", "call", "gpu_pools", "codecs")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    GPU_POOLS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: bytes
    shared: bool
    call: int
    gpu_pools: _containers.RepeatedScalarFieldContainer[int]
    codecs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., shared: _Optional[bool] = ..., call: _Optional[int] = ..., gpu_pools: _Optional[_Iterable[int]] = ..., codecs: _Optional[_Iterable[int]] = ...) -> None: ...

class KeysRequest(_message.Message):
    __slots__ = ("namespace", "keys", "shared", "call", "gpu_pools", "codecs", "packed")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    GPU_POOLS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    shared: bool
    call: int
    gpu_pools: _containers.RepeatedScalarFieldContainer[int]
    codecs: _containers.RepeatedScalarFieldContainer[int]
    packed: bool
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ..., shared: _Optional[bool] = ..., call: _Optional[int] = ..., gpu_pools: _Optional[_Iterable[int]] = ..., codecs: _Optional[_Iterable[int]] = ..., packed: _Optional[bool] = ...) -> None: ...

class SharedSlice(_message.Message):
    __slots__ = ("lease", "offset", "arena_dev", "arena_ino", "gpu_pool")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ARENA_DEV_FIELD_NUMBER: _ClassVar[int]
    ARENA_INO_FIELD_NUMBER: _ClassVar[int]
    GPU_POOL_FIELD_NUMBER: _ClassVar[int]
    lease: int
    offset: int
    arena_dev: int
    arena_ino: int
    gpu_pool: int
    def __init__(self, lease: _Optional[int] = ..., offset: _Optional[int] = ..., arena_dev: _Optional[int] = ..., arena_ino: _Optional[int] = ..., gpu_pool: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("namespace", "values", "call", "gpu_pool")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    GPU_POOL_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    values: _containers.RepeatedCompositeFieldContainer[ValueHeader]
    call: int
    gpu_pool: int
    def __init__(self, namespace: _Optional[str] = ..., values: _Optional[_Iterable[_Union[ValueHeader, _Mapping]]] = ..., call: _Optional[int] = ..., gpu_pool: _Optional[int] = ...) -> None: ...

class Reservation(_message.Message):
    __slots__ = ("id", "offset", "arena_dev", "arena_ino", "gpu_pool")
    ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ARENA_DEV_FIELD_NUMBER: _ClassVar[int]
    ARENA_INO_FIELD_NUMBER: _ClassVar[int]
    GPU_POOL_FIELD_NUMBER: _ClassVar[int]
    id: int
    offset: int
    arena_dev: int
    arena_ino: int
    gpu_pool: int
    def __init__(self, id: _Optional[int] = ..., offset: _Optional[int] = ..., arena_dev: _Optional[int] = ..., arena_ino: _Optional[int] = ..., gpu_pool: _Optional[int] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reservations",)
    RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    reservations: _containers.RepeatedCompositeFieldContainer[Reservation]
    def __init__(self, reservations: _Optional[_Iterable[_Union[Reservation, _Mapping]]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("ids", "abort", "abort_calls", "compute_checksums", "checksums")
    IDS_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    ABORT_CALLS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    abort: _containers.RepeatedScalarFieldContainer[int]
    abort_calls: _containers.RepeatedScalarFieldContainer[int]
    compute_checksums: bool
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., abort: _Optional[_Iterable[int]] = ..., abort_calls: _Optional[_Iterable[int]] = ..., compute_checksums: _Optional[bool] = ..., checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("leases", "corrupt", "calls")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedScalarFieldContainer[int]
    corrupt: _containers.RepeatedScalarFieldContainer[int]
    calls: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, leases: _Optional[_Iterable[int]] = ..., corrupt: _Optional[_Iterable[int]] = ..., calls: _Optional[_Iterable[int]] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, calls: _Optional[_Iterable[int]] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("counts",)
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, counts: _Optional[_Iterable[int]] = ...) -> None: ...

class GetPiece(_message.Message):
    __slots__ = ("index", "found", "header", "tier", "data", "shared", "batch", "encoded_nbytes", "slices")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    ENCODED_NBYTES_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    index: int
    found: bool
    header: ValueHeader
    tier: str
    data: bytes
    shared: SharedSlice
    batch: _containers.RepeatedCompositeFieldContainer[GetPiece]
    encoded_nbytes: int
    slices: SliceTable
    def __init__(self, index: _Optional[int] = ..., found: _Optional[bool] = ..., header: _Optional[_Union[ValueHeader, _Mapping]] = ..., tier: _Optional[str] = ..., data: _Optional[bytes] = ..., shared: _Optional[_Union[SharedSlice, _Mapping]] = ..., batch: _Optional[_Iterable[_Union[GetPiece, _Mapping]]] = ..., encoded_nbytes: _Optional[int] = ..., slices: _Optional[_Union[SliceTable, _Mapping]] = ...) -> None: ...

class SliceTable(_message.Message):
    __slots__ = ("index", "lease", "offset", "gpu_pool", "nbytes", "checksum", "dtype", "dtypes", "rank", "dims", "tier", "tiers", "regions")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    GPU_POOL_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    index: _containers.RepeatedScalarFieldContainer[int]
    lease: _containers.RepeatedScalarFieldContainer[int]
    offset: _containers.RepeatedScalarFieldContainer[int]
    gpu_pool: _containers.RepeatedScalarFieldContainer[int]
    nbytes: _containers.RepeatedScalarFieldContainer[int]
    checksum: _containers.RepeatedScalarFieldContainer[int]
    dtype: _containers.RepeatedScalarFieldContainer[int]
    dtypes: _containers.RepeatedScalarFieldContainer[str]
    rank: _containers.RepeatedScalarFieldContainer[int]
    dims: _containers.RepeatedScalarFieldContainer[int]
    tier: _containers.RepeatedScalarFieldContainer[int]
    tiers: _containers.RepeatedScalarFieldContainer[str]
    regions: _containers.RepeatedCompositeFieldContainer[RegionIdentity]
    def __init__(self, index: _Optional[_Iterable[int]] = ..., lease: _Optional[_Iterable[int]] = ..., offset: _Optional[_Iterable[int]] = ..., gpu_pool: _Optional[_Iterable[int]] = ..., nbytes: _Optional[_Iterable[int]] = ..., checksum: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Iterable[int]] = ..., dtypes: _Optional[_Iterable[str]] = ..., rank: _Optional[_Iterable[int]] = ..., dims: _Optional[_Iterable[int]] = ..., tier: _Optional[_Iterable[int]] = ..., tiers: _Optional[_Iterable[str]] = ..., regions: _Optional[_Iterable[_Union[RegionIdentity, _Mapping]]] = ...) -> None: ...

class RegionIdentity(_message.Message):
    __slots__ = ("gpu_pool", "arena_dev", "arena_ino")
    GPU_POOL_FIELD_NUMBER: _ClassVar[int]
    ARENA_DEV_FIELD_NUMBER: _ClassVar[int]
    ARENA_INO_FIELD_NUMBER: _ClassVar[int]
    gpu_pool: int
    arena_dev: int
    arena_ino: int
    def __init__(self, gpu_pool: _Optional[int] = ..., arena_dev: _Optional[int] = ..., arena_ino: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("length", "tiers")
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    length: int
    tiers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, length: _Optional[int] = ..., tiers: _Optional[_Iterable[str]] = ...) -> None: ...

class ExistsResponse(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, present: _Optional[_Iterable[bool]] = ...) -> None: ...

class CountResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MapsRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class MapsPiece(_message.Message):
    __slots__ = ("data", "total")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total: int
    def __init__(self, data: _Optional[bytes] = ..., total: _Optional[int] = ...) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("name", "entries", "used_bytes", "capacity_bytes", "hits", "misses", "evictions", "promotions", "demotions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    entries: int
    used_bytes: int
    capacity_bytes: int
    hits: int
    misses: int
    evictions: int
    promotions: int
    demotions: int
    def __init__(self, name: _Optional[str] = ..., entries: _Optional[int] = ..., used_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., promotions: _Optional[int] = ..., demotions: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("version", "chunk_tokens", "max_value_bytes", "max_keys_per_request", "max_piece_bytes", "tiers", "entries", "uptime_seconds", "host_arena_path", "pinned", "leases", "host_arena_dev", "host_arena_ino", "lease_seconds", "gpu_pools", "codecs", "quotas", "max_inflight_requests", "max_inflight_bytes", "remote")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_KEYS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_PIECE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HOST_ARENA_PATH_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    HOST_ARENA_DEV_FIELD_NUMBER: _ClassVar[int]
    HOST_ARENA_INO_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GPU_POOLS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    version: str
    chunk_tokens: int
    max_value_bytes: int
    max_keys_per_request: int
    max_piece_bytes: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    entries: int
    uptime_seconds: float
    host_arena_path: str
    pinned: int
    leases: int
    host_arena_dev: int
    host_arena_ino: int
    lease_seconds: float
    gpu_pools: _containers.RepeatedCompositeFieldContainer[GpuPool]
    codecs: _containers.RepeatedCompositeFieldContainer[CodecStats]
    quotas: _containers.RepeatedCompositeFieldContainer[QuotaStats]
    max_inflight_requests: int
    max_inflight_bytes: int
    remote: RemoteStats
    def __init__(self, version: _Optional[str] = ..., chunk_tokens: _Optional[int] = ..., max_value_bytes: _Optional[int] = ..., max_keys_per_request: _Optional[int] = ..., max_piece_bytes: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., entries: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., host_arena_path: _Optional[str] = ..., pinned: _Optional[int] = ..., leases: _Optional[int] = ..., host_arena_dev: _Optional[int] = ..., host_arena_ino: _Optional[int] = ..., lease_seconds: _Optional[float] = ..., gpu_pools: _Optional[_Iterable[_Union[GpuPool, _Mapping]]] = ..., codecs: _Optional[_Iterable[_Union[CodecStats, _Mapping]]] = ..., quotas: _Optional[_Iterable[_Union[QuotaStats, _Mapping]]] = ..., max_inflight_requests: _Optional[int] = ..., max_inflight_bytes: _Optional[int] = ..., remote: _Optional[_Union[RemoteStats, _Mapping]] = ...) -> None: ...

class RemoteStats(_message.Message):
    __slots__ = ("connected", "hits", "misses", "errors", "corrupt", "bytes_read", "bytes_written", "values_written", "batches", "batch_seconds", "queued_writes", "queued_bytes", "dropped_writes")
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    VALUES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_WRITES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_WRITES_FIELD_NUMBER: _ClassVar[int]
    connected: bool
    hits: int
    misses: int
    errors: int
    corrupt: int
    bytes_read: int
    bytes_written: int
    values_written: int
    batches: int
    batch_seconds: float
    queued_writes: int
    queued_bytes: int
    dropped_writes: int
    def __init__(self, connected: _Optional[bool] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., errors: _Optional[int] = ..., corrupt: _Optional[int] = ..., bytes_read: _Optional[int] = ..., bytes_written: _Optional[int] = ..., values_written: _Optional[int] = ..., batches: _Optional[int] = ..., batch_seconds: _Optional[float] = ..., queued_writes: _Optional[int] = ..., queued_bytes: _Optional[int] = ..., dropped_writes: _Optional[int] = ...) -> None: ...

class QuotaStats(_message.Message):
    __slots__ = ("tier", "namespaces", "used_bytes", "quota_bytes")
    TIER_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    tier: str
    namespaces: str
    used_bytes: int
    quota_bytes: int
    def __init__(self, tier: _Optional[str] = ..., namespaces: _Optional[str] = ..., used_bytes: _Optional[int] = ..., quota_bytes: _Optional[int] = ...) -> None: ...

class CodecStats(_message.Message):
    __slots__ = ("name", "raw_bytes", "encoded_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENCODED_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    raw_bytes: int
    encoded_bytes: int
    def __init__(self, name: _Optional[str] = ..., raw_bytes: _Optional[int] = ..., encoded_bytes: _Optional[int] = ...) -> None: ...

class GpuPool(_message.Message):
    __slots__ = ("pool", "device_uuid", "ipc_handle", "capacity_bytes", "twin_path", "arena_dev", "arena_ino")
    POOL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TWIN_PATH_FIELD_NUMBER: _ClassVar[int]
    ARENA_DEV_FIELD_NUMBER: _ClassVar[int]
    ARENA_INO_FIELD_NUMBER: _ClassVar[int]
    pool: int
    device_uuid: str
    ipc_handle: bytes
    capacity_bytes: int
    twin_path: str
    arena_dev: int
    arena_ino: int
    def __init__(self, pool: _Optional[int] = ..., device_uuid: _Optional[str] = ..., ipc_handle: _Optional[bytes] = ..., capacity_bytes: _Optional[int] = ..., twin_path: _Optional[str] = ..., arena_dev: _Optional[int] = ..., arena_ino: _Optional[int] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("namespace", "limit")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    limit: int
    def __init__(self, namespace: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("namespace", "header", "tier", "pins", "hits")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    header: ValueHeader
    tier: str
    pins: int
    hits: int
    def __init__(self, namespace: _Optional[str] = ..., header: _Optional[_Union[ValueHeader, _Mapping]] = ..., tier: _Optional[str] = ..., pins: _Optional[int] = ..., hits: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("namespaces", "snapshot")
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    namespaces: str
    snapshot: bool
    def __init__(self, namespaces: _Optional[str] = ..., snapshot: _Optional[bool] = ...) -> None: ...

class KVEvent(_message.Message):
    __slots__ = ("kind", "seq", "namespace", "key", "tier", "tiers", "nbytes")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[KVEvent.Kind]
        STORED: _ClassVar[KVEvent.Kind]
        PROMOTED: _ClassVar[KVEvent.Kind]
        DEMOTED: _ClassVar[KVEvent.Kind]
        EVICTED: _ClassVar[KVEvent.Kind]
        DELETED: _ClassVar[KVEvent.Kind]
        SNAPSHOT_BEGIN: _ClassVar[KVEvent.Kind]
        SNAPSHOT: _ClassVar[KVEvent.Kind]
        SNAPSHOT_END: _ClassVar[KVEvent.Kind]
        GAP: _ClassVar[KVEvent.Kind]
    KIND_UNSPECIFIED: KVEvent.Kind
    STORED: KVEvent.Kind
    PROMOTED: KVEvent.Kind
    DEMOTED: KVEvent.Kind
    EVICTED: KVEvent.Kind
    DELETED: KVEvent.Kind
    SNAPSHOT_BEGIN: KVEvent.Kind
    SNAPSHOT: KVEvent.Kind
    SNAPSHOT_END: KVEvent.Kind
    GAP: KVEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    kind: KVEvent.Kind
    seq: int
    namespace: str
    key: bytes
    tier: str
    tiers: _containers.RepeatedScalarFieldContainer[str]
    nbytes: int
    def __init__(self, kind: _Optional[_Union[KVEvent.Kind, str]] = ..., seq: _Optional[int] = ..., namespace: _Optional[str] = ..., key: _Optional[bytes] = ..., tier: _Optional[str] = ..., tiers: _Optional[_Iterable[str]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("instance", "events")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    instance: str
    events: _containers.RepeatedCompositeFieldContainer[KVEvent]
    def __init__(self, instance: _Optional[str] = ..., events: _Optional[_Iterable[_Union[KVEvent, _Mapping]]] = ...) -> None: ...
