"""Prometheus metrics of the server (GET /metrics), named like vLLM's under the `param2moe:` prefix."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no *_created series (as vLLM)

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0)


class ServerMetrics:
    def __init__(self, async_engine, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}
        engine = async_engine.engine

        def gauge(name: str, doc: str, fn) -> None:
            g = Gauge(name, doc, list(labels), registry=r)
            g.labels(**labels).set_function(fn)

        gauge("param2moe:num_requests_running", "Sequences running in the engine.", lambda: async_engine.num_running)
        gauge("param2moe:num_requests_waiting", "Sequences waiting to be scheduled.", lambda: async_engine.num_waiting)
        gauge("param2moe:kv_cache_usage_perc", "Share of KV-cache blocks in use (1 = full).",
              lambda: engine.block_manager.usage)
        gauge("param2moe:prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens looked up.",
              lambda: engine.block_manager.hit_rate)
        gauge("param2moe:num_preemptions", "Sequences preempted so far.", lambda: engine.scheduler.num_preemptions)
        self.requests = Counter("param2moe:requests", "Finished requests by outcome (stop, length, tool_calls, "
                                "abort: client went away, error, rejected: queue full or shutting down).",
                                [*labels, "outcome"], registry=r)
        self.prompt_tokens = Counter("param2moe:prompt_tokens", "Prompt tokens of the requests.", list(labels),
                                     registry=r).labels(**labels)
        self.generation_tokens = Counter("param2moe:generation_tokens", "Generated tokens.", list(labels),
                                         registry=r).labels(**labels)
        self.ttft = Histogram("param2moe:time_to_first_token_seconds", "Arrival to first generated token.",
                              list(labels), buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self.itl = Histogram("param2moe:inter_token_latency_seconds", "Time between generated tokens of a sequence.",
                             list(labels), buckets=_ITL_BUCKETS, registry=r).labels(**labels)
        self.e2e = Histogram("param2moe:e2e_request_latency_seconds", "Arrival to last token.",
                             list(labels), buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self._labels = labels
        if engine.eplb is not None:
            self._add_eplb_gauges(engine.eplb, labels)
        for outcome in ("stop", "length", "tool_calls", "abort", "error", "rejected"):
            self.requests.labels(**labels, outcome=outcome)

    def _add_eplb_gauges(self, balancer, labels: dict) -> None:
        """Expert load balancing: each MoE layer's imbalance over the load window (the engine copies the window to
        the host every few steps; these read that copy, never the device)."""
        def stat(fn, default=0.0):
            def read():
                snap = balancer.snapshot()
                return default if snap is None else fn(snap)
            return read

        g = Gauge("param2moe:eplb_imbalance", "Expert load balancing: per MoE layer, the busiest expert-parallel "
                  "rank's (token, expert) pairs over the mean rank's, over the load window (1 = balanced).",
                  [*labels, "layer"], registry=self.registry)
        for row, layer in enumerate(balancer.layers):
            g.labels(**labels, layer=str(layer)).set_function(stat(lambda s, row=row: s.imbalance[row], 1.0))
        for name, doc, fn in (
                ("param2moe:eplb_rearrangements", "Expert rearrangements so far.", lambda s: s.rearrangements),
                ("param2moe:eplb_window_tokens", "(token, expert) pairs in the load window, summed over MoE layers.",
                 lambda s: int(s.tokens.sum()))):
            Gauge(name, doc, list(labels), registry=self.registry).labels(**labels).set_function(stat(fn))

    def count_request(self, outcome: str) -> None:
        self.requests.labels(**self._labels, outcome=outcome).inc()

    def tracker(self, num_prompt_tokens: int) -> RequestTracker:
        return RequestTracker(self, num_prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Timings and token counts of one engine request (all its samples)."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int):
        self.m = metrics
        self.arrival = time.monotonic()
        self.first: float | None = None
        self.last: dict[int, float] = {}
        self.m.prompt_tokens.inc(num_prompt_tokens)
        self.done = False

    def on_output(self, out) -> None:
        now = time.monotonic()
        for c in out.outputs:
            k = len(c.token_ids)
            if not k:
                continue
            self.m.generation_tokens.inc(k)
            if self.first is None:
                self.first = now
                self.m.ttft.observe(now - self.arrival)
            prev = self.last.get(c.index)
            if prev is not None:
                for _ in range(k):
                    self.m.itl.observe((now - prev) / k)
            self.last[c.index] = now

    def finish(self, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        self.m.count_request(outcome)
        if outcome in ("stop", "length", "tool_calls"):
            self.m.e2e.observe(time.monotonic() - self.arrival)
