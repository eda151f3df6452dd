"""Prometheus metrics of one service instance, in its own registry (two apps in one process stay apart)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ROUTES = ("/v1/translate", "/v1/generate", "/v1/adapters", "/v1/models", "/v1/completions", "/v1/chat/completions",
          "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/healthz", "/readyz", "/metrics", "/docs",
          "/openapi.json")

REQUEST_LABELS = ("route", "adapter")
ERROR_LABELS = ("route", "adapter", "code")
TOKEN_LABELS = ("adapter",)
# Rows per adapter, read from the scheduler at scrape time: {adapter: rows} for running and for waiting rows
RowCounts = tuple[Mapping[str, int], Mapping[str, int]]


def route_label(path: str) -> str:
    """A fixed set of labels: raw paths from clients would let anyone grow the label set without bound."""
    for route in ROUTES:
        if path == route or path.startswith(route + "/"):
            return route
    return "other"


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("adaptkit_requests", "Accepted requests, by route and adapter (once per adapter a "
                                "request uses)", REQUEST_LABELS, registry=r)
        self.errors = Counter("adaptkit_errors", "Error answers, by route, adapter ('' when none was resolved) and "
                              "error code", ERROR_LABELS, registry=r)
        self.responses = Counter("adaptkit_http_responses", "HTTP responses by route and status", ["route", "status"],
                                 registry=r)
        self.latency = Histogram("adaptkit_request_seconds", "Request latency, arrival to response", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("adaptkit_queue_depth", "Rows waiting to be scheduled", registry=r)
        self.batch_rows = Histogram("adaptkit_batch_rows", "Rows per generate call or continuous decoding step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_adapters = Histogram("adaptkit_batch_adapters",
                                        "Distinct adapters per generate call or continuous decoding step",
                                        buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.batch_seconds = Histogram("adaptkit_batch_seconds",
                                       "Seconds per generate call or continuous decoding step",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.resident = Gauge("adaptkit_resident_adapters", "Adapters resident in the bank now", registry=r)
        self.resident_peak = Gauge("adaptkit_resident_adapters_peak", "Most adapters seen resident at once",
                                   registry=r)
        self.loads = Counter("adaptkit_adapter_loads", "Adapter loads from the store, by outcome", ["outcome"],
                             registry=r)
        self.evictions = Counter("adaptkit_adapter_evictions", "Adapters evicted to make room", registry=r)
        self.load_seconds = Histogram("adaptkit_adapter_load_seconds", "Seconds per adapter load (read, check, attach)",
                                      buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                      registry=r)
        # Per adapter: tokens, and rows running and waiting (`_RowGauges`). The latency histograms are one series
        # each, not per adapter: rows of a continuous step share its time, and a histogram per adapter would
        # be 17 series for every adapter ever used.
        self.tokens = Counter("adaptkit_generated_tokens", "Tokens generated, by adapter ('' for the bare "
                              "backbone); rows decoded one token at a time: the continuous batch and the OpenAI "
                              "routes' static batches", TOKEN_LABELS, registry=r)
        self.first_token_seconds = Histogram("adaptkit_time_to_first_token_seconds", "Seconds from a row's arrival "
                                             "to its first token (queueing and adapter loads included)",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_seconds = Histogram("adaptkit_inter_token_seconds", "Seconds between a row's tokens",
                                             buckets=TOKEN_BUCKETS, registry=r)
        self._rows = _RowGauges()
        r.register(self._rows)

    def track(self, queue_depth: Callable[[], float], resident: Callable[[], float],
              rows: Callable[[], RowCounts] | None = None) -> None:
        """Gauges read at scrape time from the live objects (`rows`: running and waiting rows per adapter)."""
        self.queue_depth.set_function(queue_depth)
        self.resident.set_function(resident)
        self._rows.read = rows

    def forget_adapter(self, name: str) -> int:
        """Drop every series labelled with adapter `name` (a deleted adapter): without this, each adapter ever
        uploaded and deleted would stay in /metrics, and the scrape would grow without bound. Returns how many
        series went. A request for `name` still in flight may bring its series back once; the next delete
        drops it again."""
        removed = 0
        for metric, names in ((self.requests, REQUEST_LABELS), (self.errors, ERROR_LABELS),
                              (self.tokens, TOKEN_LABELS)):
            series = {tuple(sample.labels[label] for label in names)
                      for family in metric.collect() for sample in family.samples
                      if sample.labels.get("adapter") == name}
            for values in series:  # `remove` (public since 0.4) rather than 0.22's remove_by_labels
                metric.remove(*values)
            removed += len(series)
        return removed

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _RowGauges:
    """`adaptkit_running_rows{adapter}` and `adaptkit_waiting_rows{adapter}`, counted when scraped: one series per
    adapter that is resident or has rows ('' for the bare backbone), so a deleted adapter's series go with it."""

    def __init__(self) -> None:
        self.read: Callable[[], RowCounts] | None = None

    def describe(self) -> list[Metric]:
        return []  # names are not reserved in the registry: nothing else there uses these two

    def collect(self) -> Iterator[Metric]:
        running, waiting = self.read() if self.read is not None else ({}, {})
        for name, what, counts in (("adaptkit_running_rows", "Rows decoding now (admitted to a batch), by adapter",
                                    running),
                                   ("adaptkit_waiting_rows", "Rows waiting in the queue, by adapter", waiting)):
            family = GaugeMetricFamily(name, what, labels=TOKEN_LABELS)
            for adapter in sorted(counts):
                family.add_metric([adapter], counts[adapter])
            yield family
