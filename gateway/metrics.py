"""Prometheus metrics of one gateway, plus the relay's own counts read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from relay.domain.model import RelayStats

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

    def render(self, stats: RelayStats | None) -> bytes:
        if stats is not None:
            self.live_streams.set(stats.live_streams)
            self.retained_streams.set(stats.retained_streams)
            self.relay_readers.set(stats.readers)
            self.buffered_chunks.set(stats.buffered_chunks)
        return generate_latest(self.registry)
