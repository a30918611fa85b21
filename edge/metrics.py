"""Prometheus metrics, in a registry of the daemon's own (never the global one).

One `Metrics` object per daemon; parts receive it and update its collectors. `/metrics`
renders `render()`. Process figures (RSS, CPU, fds) come from prometheus-client's own
process collector, registered on this registry.
"""

from __future__ import annotations

import gc
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.sessions_active = Gauge("edge_sessions_active", "Open /v1/listen sessions", registry=r)
        self.sessions_total = Counter(
            "edge_sessions", "Sessions ended, by outcome", ["outcome"], registry=r
        )
        self.sessions_refused = Counter(
            "edge_sessions_refused", "Handshakes refused, by reason", ["reason"], registry=r
        )
        self.auth_failures = Counter(
            "edge_auth_failures", "Requests refused for a missing or wrong key", registry=r
        )
        self.pending_evicted = Counter(
            "edge_pending_evicted",
            "Connections dropped before auth to admit a newer one (EDGE_MAX_PENDING_CONNECTIONS)",
            registry=r,
        )
        self.auth_throttled = Counter(
            "edge_auth_throttled",
            "Requests refused (429) from an address with too many failed attempts", registry=r,
        )
        self.audio_seconds = Counter(
            "edge_audio_seconds", "Audio received from devices (session seconds)", registry=r
        )
        self.upstream_errors = Counter(
            "edge_upstream_errors", "Upstream call failures, by error class", ["error"],
            registry=r,
        )
        self.upstream_restarts = Counter(
            "edge_upstream_restarts", "Upstream streams reopened, by cause", ["cause"], registry=r
        )
        self.upstream_lost_seconds = Counter(
            "edge_upstream_lost_audio_seconds",
            "Audio never transcribed because an outage outlasted the replay buffer",
            registry=r,
        )
        self.final_latency = Histogram(
            "edge_final_latency_seconds", "Word end (audio received) -> final Results sent",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.loop_lag = Histogram(
            "edge_event_loop_lag_seconds", "How late the event loop's 50 ms tick woke",
            buckets=LAG_BUCKETS, registry=r,
        )
        self.loop_lag_p50 = Gauge(
            "edge_event_loop_lag_p50_seconds", "Loop lag median over the last 10 s", registry=r
        )
        self.loop_lag_p99 = Gauge(
            "edge_event_loop_lag_p99_seconds", "Loop lag p99 over the last 10 s", registry=r
        )
        self.diarizer_step = Histogram(
            "edge_diarizer_step_seconds", "Worker time per streaming step",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.diarizer_rtf = Gauge(
            "edge_diarizer_rtf", "Diarizer real-time factor (step time / audio advanced)",
            registry=r,
        )
        self.diarizer_restarts = Counter(
            "edge_diarizer_worker_restarts", "Diarizer worker restarts, by cause", ["cause"],
            registry=r,
        )
        self.decoder_exits = Counter(
            "edge_decoder_process_exits", "Decoder process exits while the daemon ran, by cause "
            "(crash: it died; hung: killed for not answering; protocol: killed for a bad frame)",
            ["cause"], registry=r,
        )
        self.diarizer_memory = Gauge(
            "edge_diarizer_worker_rss_bytes", "Diarizer worker resident memory", registry=r
        )
        self.gc_pause = Histogram(
            "edge_gc_pause_seconds", "Garbage-collection pauses, by generation", ["generation"],
            buckets=LAG_BUCKETS, registry=r,
        )
        self.tasks = Gauge("edge_asyncio_tasks", "asyncio tasks alive in the daemon", registry=r)
        self.threads = Gauge("edge_threads", "Threads alive in the daemon process", registry=r)
        self.queue_depth = Gauge(
            "edge_queue_depth", "Items waiting, summed over sessions, by queue", ["queue"],
            registry=r,
        )
        self.queue_dropped = Counter(
            "edge_queue_dropped", "Items dropped by a queue's overflow policy", ["queue"],
            registry=r,
        )

    def watch_gc(self) -> None:
        """Time every collection: a full one stalls the event loop for its whole length."""
        started: list[float] = [0.0]

        def callback(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                self.gc_pause.labels(str(info["generation"])).observe(
                    time.perf_counter() - started[0])

        gc.callbacks.append(callback)
        self._gc_callback = callback

    def unwatch_gc(self) -> None:
        callback = getattr(self, "_gc_callback", None)
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics"]
