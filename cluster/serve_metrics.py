"""The server's Prometheus metrics, through Ray's metrics export (scraped from each node's metrics port).

Per request: counts by outcome, TTFT, per-output-token latency, achieved keep ratios, peak KV bytes.
Per replica (sampled every second): running and waiting requests, KV bytes in use and allocated.
"""

from __future__ import annotations

import threading

from ray.util import metrics

from dynllava.batching import EngineCounters
from dynllava.engine import RequestStats

LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
TOKEN_BOUNDS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
RATIO_BOUNDS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 0.99, 1.0]
BYTES_BOUNDS = [2.0**k for k in range(10, 36, 2)]


class ServerMetrics:
    """Metric objects of one replica, tagged with the served model's name."""

    def __init__(self, model: str):
        tags = ("model",)
        self.default_tags = {"model": model}
        self.requests = metrics.Counter("dynllava_requests_total", "Chat requests by outcome",
                                        tag_keys=("model", "status"))
        self.ttft = metrics.Histogram("dynllava_ttft_seconds", "Arrival to first token", LATENCY_BOUNDS, tags)
        self.token_latency = metrics.Histogram("dynllava_token_latency_seconds", "Per output token after the first",
                                               TOKEN_BOUNDS, tags)
        self.vision_keep = metrics.Histogram("dynllava_vision_keep_ratio", "Image tokens kept / image tokens",
                                             RATIO_BOUNDS, tags)
        self.text_keep = metrics.Histogram("dynllava_text_keep_ratio", "Generated tokens admitted / generated",
                                           RATIO_BOUNDS, tags)
        self.kv_peak = metrics.Histogram("dynllava_request_kv_bytes", "A request's peak K/V bytes", BYTES_BOUNDS,
                                         tags)
        self.output_tokens = metrics.Counter("dynllava_output_tokens_total", "Generated tokens", tag_keys=tags)
        self.running = metrics.Gauge("dynllava_running_requests", "Rows in the running batch", tag_keys=tags)
        self.waiting = metrics.Gauge("dynllava_waiting_requests", "Requests queued for admission", tag_keys=tags)
        self.kv_in_use = metrics.Gauge("dynllava_kv_bytes_in_use", "K/V bytes held by running rows", tag_keys=tags)
        self.kv_allocated = metrics.Gauge("dynllava_kv_bytes_allocated", "K/V bytes held for running rows (blocks)",
                                          tag_keys=tags)
        self.kv_free = metrics.Gauge("dynllava_kv_blocks_free", "Token blocks the KV budget still leaves (-1: none)",
                                     tag_keys=tags)
        self.preempted = metrics.Gauge("dynllava_preempted_total", "Rows preempted since the replica started",
                                       tag_keys=tags)
        for m in (self.ttft, self.token_latency, self.vision_keep, self.text_keep, self.kv_peak, self.output_tokens,
                  self.running, self.waiting, self.kv_in_use, self.kv_allocated, self.kv_free, self.preempted):
            m.set_default_tags(self.default_tags)

    def outcome(self, status: str) -> None:
        """Count one request: ok | error | cancelled | rejected (4xx) | busy (429/503)."""
        self.requests.inc(1, tags={**self.default_tags, "status": status})

    def finished(self, stats: RequestStats) -> None:
        self.ttft.observe(stats.ttft_s)
        if stats.n_text_generated > 1:
            self.token_latency.observe(stats.decode_s / (stats.n_text_generated - 1))
        if stats.n_image_tokens:
            self.vision_keep.observe(stats.n_image_kept / stats.n_image_tokens)
        if stats.n_text_generated > 1:
            self.text_keep.observe(stats.n_text_admitted / (stats.n_text_generated - 1))
        self.kv_peak.observe(stats.kv_bytes_peak)
        if stats.n_text_generated:  # Ray's counters refuse an increment of 0
            self.output_tokens.inc(stats.n_text_generated)

    def sample(self, counters: EngineCounters) -> None:
        self.running.set(counters.running)
        self.waiting.set(counters.waiting)
        self.kv_in_use.set(counters.kv_bytes_in_use)
        self.kv_allocated.set(counters.kv_bytes_allocated)
        self.kv_free.set(counters.kv_blocks_free)
        self.preempted.set(counters.preempted)

    def start_sampling(self, counters: EngineCounters, period_s: float = 1.0) -> threading.Event:
        """Sample the engine's gauges every period_s on a daemon thread; set the returned event to stop."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(period_s):
                self.sample(counters)

        threading.Thread(target=loop, name="dynllava-metrics", daemon=True).start()
        return stop
