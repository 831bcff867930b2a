"""Prometheus metrics under the names vLLM's dashboards use, prefixed `blip2_fast_`.

Gauges and the engine's cumulative counters are read from the driver's latest stats snapshot when
scraped; histograms and the per-reason success counter are fed by the driver's observer after each
step (on the engine thread: a few lock-protected additions). Each app has its own registry, so
several apps in one process (tests, benchmarks) do not share or clash.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "blip2_fast_"
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_LONG = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0)
_ENCODE = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineGauges:
    """The engine's state at scrape time, from the driver's snapshot."""

    def __init__(self, driver, model_name: str):
        self.driver, self.labels = driver, {"model_name": model_name}

    def _family(self, cls, name, doc, value):
        f = cls(P + name, doc, labels=list(self.labels))
        f.add_metric(list(self.labels.values()), value)
        return f

    def collect(self):
        s, g, c = self.driver.stats, GaugeMetricFamily, CounterMetricFamily
        used = 1.0 - s.num_free_blocks / s.num_blocks if s.num_blocks else 0.0
        yield self._family(g, "num_requests_running", "Requests admitted to the engine and not finished.", s.num_running)
        yield self._family(g, "num_requests_waiting", "Requests queued for admission (preempted ones included).",
                           s.num_waiting)
        yield self._family(g, "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", used)
        yield self._family(c, "num_preemptions", "Requests preempted because KV blocks ran out.", s.num_preemptions)
        yield self._family(c, "prompt_tokens", "Prompt positions prefilled (image query tokens included).",
                           s.prompt_tokens)
        yield self._family(c, "generation_tokens", "Tokens generated.", s.generation_tokens)
        yield self._family(c, "image_cache_hits", "Images whose Q-Former output came from the cache.",
                           s.image_cache_hits)
        yield self._family(c, "image_cache_misses", "Images that had to be encoded.", s.image_cache_misses)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        lab, reg = ["model_name"], self.registry
        self.success = Counter(P + "request_success", "Finished requests by finish reason.",
                               lab + ["finished_reason"], registry=reg)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time from arrival to the first token.", lab,
                              buckets=_TTFT, registry=reg).labels(model_name)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between a request's consecutive tokens.",
                             lab, buckets=_ITL, registry=reg).labels(model_name)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Time from arrival to the last token.", lab,
                             buckets=_LONG, registry=reg).labels(model_name)
        self.queue = Histogram(P + "request_queue_time_seconds", "Time from arrival to first admission.", lab,
                               buckets=_LONG, registry=reg).labels(model_name)
        self.encode = Histogram(P + "image_encode_seconds", "Wall time of each image-encode batch.", lab,
                                buckets=_ENCODE, registry=reg).labels(model_name)

    def attach(self, driver) -> None:
        """Start reporting `driver`'s engine gauges (once the driver exists)."""
        self.registry.register(_EngineGauges(driver, self.model_name))

    def observe(self, progress, stats) -> None:
        """The driver's observer: one step's outputs and the stats after it."""
        for t in stats.image_encode_seconds:
            self.encode.observe(t)
        for p in progress:
            m = p.metrics
            for gap in p.inter_token:
                self.itl.observe(gap)
            if m.first_token_time is not None and p.output.new_token_ids and len(p.output.token_ids) == len(
                    p.output.new_token_ids):  # this output carries the request's first tokens
                self.ttft.observe(m.first_token_time - m.arrival_time)
            if p.output.finished:
                self.success.labels(self.model_name, p.output.finish_reason or "unknown").inc()
                if m.first_scheduled_time is not None:
                    self.queue.observe(m.first_scheduled_time - m.arrival_time)
                if m.finished_time is not None:
                    self.e2e.observe(m.finished_time - m.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
