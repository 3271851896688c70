"""Prometheus metrics of a server, in their own CollectorRegistry (two servers in one process never mix).

    lorakit_requests_total{adapter, finish_reason}               requests ended ("stop", "length", "cancelled", ...)
    lorakit_prompt_tokens_total{adapter}                         prompt tokens read
    lorakit_generation_tokens_total{adapter}                     tokens generated
    lorakit_time_to_first_token_seconds{adapter}                 request received -> first token (histogram)
    lorakit_time_per_output_token_seconds{adapter}               between two tokens of a request (histogram)
    lorakit_batch_size                                           requests in each decode step (histogram)
    lorakit_running_requests, lorakit_waiting_requests           requests running and waiting now (gauges, read when
                                                                 scraped: 0 when idle)
    lorakit_rejected_requests_total{reason}                      requests refused before they ran (queue full)
    lorakit_loaded_adapters                                      adapters loaded now (gauge; see --max-loaded)

The base model is labelled adapter="base", a composition by its adapters' names joined by "+" (`compose.label`).
Names follow vLLM's where they mean the same (`vllm:time_to_first_token_seconds` ...), with lorakit's prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .compose import RowKey, label  # a request's adapter label (also imported from here by text.py, encoder.py)

if TYPE_CHECKING:
    from .handle import RequestStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's counters, gauges and histograms; `render()` is the body of GET /metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorakit_requests", "Requests ended", ["adapter", "finish_reason"], registry=r)
        self.rejected = Counter("lorakit_rejected_requests", "Requests refused before they ran", ["reason"], registry=r)
        self.loaded = Gauge("lorakit_loaded_adapters", "Adapters loaded now", registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens read", ["adapter"], registry=r)
        self.generation_tokens = Counter("lorakit_generation_tokens", "Tokens generated", ["adapter"], registry=r)
        self.ttft = Histogram(
            "lorakit_time_to_first_token_seconds",
            "Time from receiving a request to its first token",
            ["adapter"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "lorakit_time_per_output_token_seconds",
            "Time between two tokens of a request",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "lorakit_batch_size", "Requests in each decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.running = Gauge("lorakit_running_requests", "Requests in the engine's batch now", registry=r)
        self.waiting = Gauge("lorakit_waiting_requests", "Requests queued for the engine now", registry=r)

    def watch(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        """Read the running and waiting gauges from these functions at every scrape, so they are exact, idle too."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    def step(self, batch_size: int, queue_depth: int) -> None:
        """One decode step of the engine: its batch size (the gauges read the engine itself, see `watch`)."""
        self.batch_size.observe(batch_size)

    def finished(self, adapter: RowKey, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        """A request (one choice) has ended: the engine's `on_finish` for causal LMs, the handler for encoders."""
        self.requests.labels(label(adapter), finish_reason).inc()
        self.prompt_tokens.labels(label(adapter)).inc(prompt_tokens)
        self.generation_tokens.labels(label(adapter)).inc(completion_tokens)

    def engine_finished(self, stats: RequestStats) -> None:
        """The engine's `on_finish` hook: a request left the engine (whatever the client saw)."""
        self.finished(stats.adapter, stats.finish_reason, stats.prompt_tokens, stats.completion_tokens)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric.

        Examples:
            >>> m = Metrics(); m.watch(running=lambda: 3, waiting=lambda: 1)
            >>> b"lorakit_waiting_requests 1.0" in m.render()
            True
        """
        return generate_latest(self.registry)
