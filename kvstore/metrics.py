"""Prometheus metrics of the daemon, and the wrapper every RPC runs through.

`ServerMetrics` owns one registry (not prometheus-client's global one, so several servers
in one process, as in tests, do not mix) with:
- per tier, read from the store at scrape time: `kvstore_tier_{hits,misses,evictions,
  promotions,demotions}_total`, `kvstore_tier_{entries,used_bytes,capacity_bytes}`;
- `kvstore_entries`, `kvstore_pinned_entries`, `kvstore_leases{kind=read|put}`;
- per codec the ssd tier wrote with: `kvstore_codec_{raw,encoded}_bytes_total`;
- per tier, copies found corrupt and dropped: `kvstore_corrupt_dropped_total{tier}`;
- the ssd writer: `kvstore_ssd_writes_total{how=ahead|at_eviction}` (values copied to ssd
  ahead of eviction, or written by the eviction itself because the writer was behind),
  `kvstore_ssd_writer_encoded_total{on=gpu|host}` and
  `kvstore_ssd_writer_seconds_total{doing=writing|waiting}` (writing to ssd, or waiting
  for values being encoded: which of the two bounds demotion);
- KV events: `kvstore_watchers` (Watch streams open), `kvstore_watchers_limit`, and
  `kvstore_watch_events_dropped_total` (lost to full watcher queues; each loss is a GAP);
- per RPC: `kvstore_requests_total{rpc,code}` and the `kvstore_request_duration_seconds`
  histogram, kept by `observe(...)`, which also gives each call its request id for logs;
- back-pressure: `kvstore_inflight{what=requests|bytes}` and their bounds
  `kvstore_inflight_limit{what}`, `kvstore_leases_limit`, and the calls refused by a bound,
  `kvstore_rejected_total{rpc,bound=requests|bytes|leases}`;
- per `--quota` rule: `kvstore_quota_used_bytes{tier,namespaces}` and
  `kvstore_quota_bytes{tier,namespaces}`;
- the remote tier, when there is one: `kvstore_remote_{hits,misses,errors,corrupt_dropped,
  read_bytes,written_bytes,written_values,batches,batch_seconds,dropped_writes}_total`,
  `kvstore_remote_queued_{writes,bytes}` and `kvstore_remote_connected` (also counted in
  `kvstore_corrupt_dropped_total{tier="remote"}`);
- `kvstore_build_info{version}`, `kvstore_uptime_seconds`.

`serve_http(address)` exposes them on `http://HOST:PORT/metrics` from a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvstore import __version__
from kvstore.admission import BUSY, Admission
from kvstore.config import split_address
from kvstore.logs import MAX_REQUEST_ID, REQUEST_ID_HEADER, enter_request, new_request_id
from kvstore.store import RemoteStats, Store, TierCounters

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer


log = logging.getLogger("kvstore.requests")

# From a Lookup answered from the index (~50 us) to a large put to ssd (seconds).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
TIER_COUNTERS = tuple(f.name for f in dataclasses.fields(TierCounters))
# Codes a well-behaved client meets in normal work: logged at debug, not as failures.
_ROUTINE = {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED}


class _StoreCollector(Collector):
    """Reads the store's counters and gauges when Prometheus scrapes."""

    def __init__(
        self,
        store: Store,
        leases: Callable[[], dict[str, int]],
        started: float,
        admission: Admission | None,
        max_leases: int,
    ):
        self.store = store
        self.leases = leases
        self.started = started
        self.admission = admission
        self.max_leases = max_leases

    def collect(self) -> Iterator[Metric]:
        s = self.store.stats()
        counters = {
            name: CounterMetricFamily(
                f"kvstore_tier_{name}", f"{name.capitalize()} in each tier", labels=["tier"]
            )
            for name in TIER_COUNTERS
        }
        gauges = {
            "entries": GaugeMetricFamily(
                "kvstore_tier_entries", "Entries held in each tier", labels=["tier"]
            ),
            "used_bytes": GaugeMetricFamily(
                "kvstore_tier_used_bytes", "Bytes used in each tier", labels=["tier"]
            ),
            "capacity_bytes": GaugeMetricFamily(
                "kvstore_tier_capacity_bytes", "Bytes each tier may hold", labels=["tier"]
            ),
        }
        for t in s.tiers:
            for name, family in counters.items():
                family.add_metric([t.name], getattr(t.counters, name))
            for name, gauge in gauges.items():
                gauge.add_metric([t.name], getattr(t, name))
        yield from counters.values()
        yield from gauges.values()
        yield GaugeMetricFamily("kvstore_entries", "Distinct values stored", value=s.entries)
        yield GaugeMetricFamily(
            "kvstore_pinned_entries", "Values pinned against eviction", value=s.pinned
        )
        yield _by(
            GaugeMetricFamily,
            "kvstore_leases",
            "Values same-host clients hold in place: read leases and put reservations",
            "kind",
            self.leases(),
        )
        yield GaugeMetricFamily(
            "kvstore_leases_limit",
            "Most read leases, and put reservations, held at once (max-leases)",
            value=self.max_leases,
        )
        yield from self._admission()
        used = GaugeMetricFamily(
            "kvstore_quota_used_bytes",
            "Bytes of values a --quota rule's namespaces hold in its tier",
            labels=["tier", "namespaces"],
        )
        quota = GaugeMetricFamily(
            "kvstore_quota_bytes", "A --quota rule's bytes", labels=["tier", "namespaces"]
        )
        for q in s.quotas:
            used.add_metric([q.tier, q.namespaces], q.used_bytes)
            quota.add_metric([q.tier, q.namespaces], q.quota_bytes)
        yield used
        yield quota
        codecs = sorted(s.codecs.items())
        yield _by(
            CounterMetricFamily,
            "kvstore_codec_raw_bytes",
            "Bytes of values the ssd tier encoded, before encoding",
            "codec",
            {codec: c.raw_bytes for codec, c in codecs},
        )
        yield _by(
            CounterMetricFamily,
            "kvstore_codec_encoded_bytes",
            "Bytes the ssd tier wrote for those values, after encoding",
            "codec",
            {codec: c.encoded_bytes for codec, c in codecs},
        )
        corrupt = dict(self.store.corrupt)
        if "remote" in corrupt and s.remote is not None:
            corrupt["remote"] += s.remote.counters.corrupt  # pieces it found damaged
        yield _by(
            CounterMetricFamily,
            "kvstore_corrupt_dropped",
            "Stored copies found corrupt (checksum mismatch, unreadable or lost record) and "
            "dropped, by the tier they were in; a restart's scan counts under ssd",
            "tier",
            corrupt,
        )
        w = s.writer
        yield _by(
            CounterMetricFamily,
            "kvstore_ssd_writes",
            "Values written from the cpu tier to ssd: copied ahead of eviction by the ssd "
            "writer, or at eviction (the writer had not reached them, and the put that "
            "needed their room waited for the write)",
            "how",
            {"ahead": w.ahead, "at_eviction": w.at_eviction},
        )
        yield _by(
            CounterMetricFamily,
            "kvstore_ssd_writer_encoded",
            "Values the ssd writer encoded for ssd, by where (--encode-gpu)",
            "on",
            {"gpu": w.encoded_gpu, "host": w.encoded_host},
        )
        yield _by(
            CounterMetricFamily,
            "kvstore_ssd_writer_seconds",
            "Seconds the ssd writer spent writing encoded values to ssd, and waiting for "
            "values being encoded (waiting much while the cpu tier evicts: the encoders, not "
            "ssd, bound demotion; --encode-gpu)",
            "doing",
            {"writing": w.write_seconds, "waiting": w.wait_seconds},
        )
        if s.remote is not None:
            yield from _remote_metrics(s.remote)
        events = self.store.events
        yield GaugeMetricFamily(
            "kvstore_watchers", "Watch streams (KV events) open", value=len(events.watchers)
        )
        yield GaugeMetricFamily(
            "kvstore_watchers_limit", "Most Watch streams open at once (max-watchers)",
            value=events.max_watchers,
        )  # fmt: skip
        yield CounterMetricFamily(
            "kvstore_watch_events_dropped",
            "KV events dropped because a watcher's queue was full (it got a GAP instead)",
            value=events.dropped,
        )
        info = GaugeMetricFamily("kvstore_build_info", "The server's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "kvstore_uptime_seconds", "Seconds since the server started",
            value=time.monotonic() - self.started,
        )  # fmt: skip

    def _admission(self) -> Iterator[Metric]:
        if self.admission is None:
            return
        gauges = self.admission.gauges()
        yield _by(
            GaugeMetricFamily,
            "kvstore_inflight",
            "Calls being served, and bytes of values in flight through gRPC",
            "what",
            {what: n for what, (n, _) in gauges.items()},
        )
        yield _by(
            GaugeMetricFamily,
            "kvstore_inflight_limit",
            "Bounds of kvstore_inflight (max-inflight-requests, max-inflight-bytes)",
            "what",
            {what: most for what, (_, most) in gauges.items()},
        )
        refused = CounterMetricFamily(
            "kvstore_rejected",
            "Calls refused with RESOURCE_EXHAUSTED and a retry hint by an in-flight bound",
            labels=["rpc", "bound"],
        )
        for (rpc, which), n in sorted(dict(self.admission.refused).items()):
            refused.add_metric([rpc, which], n)
        yield refused


class ServerMetrics:
    """The daemon's metrics registry and the per-RPC observer."""

    def __init__(
        self,
        store: Store,
        leases: Callable[[], dict[str, int]],
        admission: Admission | None = None,
        max_leases: int = 0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.started = time.monotonic()
        self.registry.register(_StoreCollector(store, leases, self.started, admission, max_leases))
        self._requests = Counter(
            "kvstore_requests",
            "Calls finished, by RPC and gRPC status code",
            ["rpc", "code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "kvstore_request_duration_seconds",
            "Time from a call's start to its last message, by RPC",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._http: WSGIServer | None = None

    def serve_http(self, address: str) -> str:
        """Serve `/metrics` on `address` (HOST:PORT; port 0 picks one); returns HOST:PORT."""
        host, port = split_address(address, "metrics-listen")
        self._http, _ = start_http_server(port, host, registry=self.registry)
        return f"{address.rpartition(':')[0]}:{self._http.server_port}"

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def observe(self, rpc: str, kind: str, behavior: Any) -> Any:
        """`behavior` (a grpc.aio handler of cardinality `kind`) counted, timed and given
        a request id for the records it logs."""
        latency = self._latency.labels(rpc)
        counts: dict[grpc.StatusCode, Any] = {}

        def finish(context: Any, start: float, code: grpc.StatusCode | None) -> None:
            elapsed = time.perf_counter() - start
            latency.observe(elapsed)
            code = code or context.code() or grpc.StatusCode.OK
            counter = counts.get(code)
            if counter is None:
                counter = counts[code] = self._requests.labels(rpc, code.name)
            counter.inc()
            details = context.details() or ""
            # Back-pressure refusals come by the thousand under overload: counted in
            # kvstore_rejected_total, logged at debug only.
            if code not in _ROUTINE and not details.startswith(BUSY):
                log.info("%s failed: %s: %s", rpc, code.name, details)
            elif log.isEnabledFor(logging.DEBUG):
                log.debug("%s done: %s in %.3f ms", rpc, code.name, elapsed * 1e3)

        @contextlib.contextmanager
        def call(context: Any) -> Iterator[None]:
            start, code = time.perf_counter(), None
            enter_request(rpc, _request_id(context))
            try:
                yield
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise  # the handler set the code
            except BaseException:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                finish(context, start, code)

        if kind.endswith("_stream"):

            async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
                with call(context):
                    async for item in behavior(request, context):
                        yield item

            return streaming

        async def unary(request: Any, context: Any) -> Any:
            with call(context):
                return await behavior(request, context)

        return unary


def _request_id(context: Any) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER:
            text = value if isinstance(value, str) else value.decode(errors="replace")
            return text[:MAX_REQUEST_ID]
    return new_request_id()


# The remote tier's counters: (metric name, RemoteCounters field, help).
_REMOTE_COUNTERS = (
    ("hits", "hits", "Values read whole and verified from the remote tier"),
    ("misses", "misses", "Keys the remote tier lacked or could not serve in time"),
    ("errors", "errors", "Remote batches (one master's share) that failed or timed out"),
    ("corrupt_dropped", "corrupt", "Remote values found damaged and deleted"),
    ("read_bytes", "bytes_read", "Payload bytes read from the remote tier"),
    ("written_bytes", "bytes_written", "Payload bytes written to the remote tier"),
    ("written_values", "values_written", "Values written to the remote tier"),
    ("batches", "batches", "Remote batches run (one per master and call)"),
    ("batch_seconds", "batch_seconds", "Seconds remote batches took, summed"),
)


_Family = TypeVar("_Family", CounterMetricFamily, GaugeMetricFamily)


def _by(
    kind: type[_Family], name: str, doc: str, label: str, values: Mapping[str, float]
) -> _Family:
    """Metric `name` (a counter or gauge family: `kind`) with a sample per item of
    `values`, its key as `label`."""
    family = kind(name, doc, labels=[label])
    for which, n in values.items():
        family.add_metric([which], n)
    return family


def _remote_metrics(r: RemoteStats) -> Iterator[Metric]:
    for name, attr, text in _REMOTE_COUNTERS:
        yield CounterMetricFamily(f"kvstore_remote_{name}", text, value=getattr(r.counters, attr))
    yield CounterMetricFamily(
        "kvstore_remote_dropped_writes",
        "Pending remote writes dropped because the write queue was full",
        value=r.dropped_writes,
    )
    yield GaugeMetricFamily(
        "kvstore_remote_queued_writes", "Values waiting to be written to remote",
        value=r.queued_writes,
    )  # fmt: skip
    yield GaugeMetricFamily(
        "kvstore_remote_queued_bytes", "Bytes waiting to be written to remote",
        value=r.queued_bytes,
    )  # fmt: skip
    yield GaugeMetricFamily(
        "kvstore_remote_connected", "1 when the remote cluster's slot map is known",
        value=int(r.connected),
    )  # fmt: skip
