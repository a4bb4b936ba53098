"""The server's Prometheus metrics (``GET /metrics``), kept with ``prometheus_client`` in a registry of their own
(one per application, so that several servers in one process do not share counts)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
OCCUPANCY_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """Requests by status, prompt and completion tokens, queue length and running sequences, and histograms of
    request latency, time to first token, decode-step time and batch occupancy (sequences per step)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queued: Callable[[], float], running: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lynx_requests", "Chat-completion requests answered, by HTTP status", ["status"], registry=r
        )
        self.prompt_tokens = Counter("lynx_prompt_tokens", "Prompt text tokens of the requests admitted", registry=r)
        self.completion_tokens = Counter("lynx_completion_tokens", "Tokens generated", registry=r)
        self.queue_length = Gauge("lynx_queue_length", "Requests waiting for the engine", registry=r)
        self.queue_length.set_function(queued)
        self.running = Gauge("lynx_running_sequences", "Sequences in the decode batch now", registry=r)
        self.running.set_function(running)
        self.latency = Histogram(
            "lynx_request_latency_seconds",
            "Time from a request's arrival to its last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "lynx_time_to_first_token_seconds",
            "Time from a request's admission to the queue to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "lynx_decode_step_seconds", "Wall time of one decode step", buckets=STEP_BUCKETS, registry=r
        )
        self.batch_occupancy = Histogram(
            "lynx_batch_occupancy", "Sequences decoded together per step", buckets=OCCUPANCY_BUCKETS, registry=r
        )

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
