"""Prometheus metrics of one gateway, plus the relay's own counts read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.domain.model import EndReason, RelayStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.readers = Gauge(
            "stream_relay_gateway_sse_readers", "SSE responses open on this gateway", registry=r
        )
        self.chunks = Counter(
            "stream_relay_gateway_chunks_relayed", "Chunks written to SSE clients", registry=r
        )
        self.streams_started = Counter(
            "stream_relay_gateway_streams_started", "Streams started via POST /api/chat", registry=r
        )
        self.reattached = Counter(
            "stream_relay_gateway_reattached",
            "SSE readers re-attached after the relay went away mid-answer",
            registry=r,
        )
        self.first_chunk = Histogram(
            "stream_relay_gateway_time_to_first_chunk_seconds",
            "From a chat or resume request to its first chunk",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stop_latency = Histogram(
            "stream_relay_gateway_stop_latency_seconds",
            "Duration of the Stop call: until the producer has stopped and its message is saved",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.live_streams = Gauge(
            "stream_relay_streams_live", "Streams whose producer runs (relay)", registry=r
        )
        self.retained_streams = Gauge(
            "stream_relay_streams_retained", "Streams in the relay's memory (relay)", registry=r
        )
        self.relay_readers = Gauge(
            "stream_relay_readers", "Attach calls reading, all clients (relay)", registry=r
        )
        self.buffered_chunks = Gauge(
            "stream_relay_buffered_chunks", "Chunks in the relay's memory (relay)", registry=r
        )
        self.ended = EndedStreams()
        r.register(self.ended)

    def render(self, stats: RelayStats | None) -> bytes:
        if stats is not None:
            self.live_streams.set(stats.live_streams)
            self.retained_streams.set(stats.retained_streams)
            self.relay_readers.set(stats.readers)
            self.buffered_chunks.set(stats.buffered_chunks)
        self.ended.counts = stats.ended_by_reason if stats is not None else None
        return generate_latest(self.registry)


# Every reason a relay may count, shown from 0 so that a rate over a reason exists before its
# first end.
REASONS = [reason.value for reason in EndReason if reason is not EndReason.UNSPECIFIED]


class EndedStreams(Collector):
    """stream_relay_streams_ended_total{reason}: the relay's ended streams by reason, as its
    GetStats says at scrape time (nothing while the relay cannot be asked)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] | None = None

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "stream_relay_streams_ended",
            "Streams the relay ended since it started, by reason (relay)",
            labels=["reason"],
        )
        if self.counts is not None:
            for reason in [*REASONS, *sorted(set(self.counts) - set(REASONS))]:
                family.add_metric([reason], self.counts.get(reason, 0))
        yield family
