"""Prometheus metrics of `hera serve`, in a registry of the app's own (no process-global state)."""

from __future__ import annotations


class Metrics:
    """One app's metrics: requests by route and status, latency, tokens, cost, all-cloud cost,
    KV-cache hit rate, requests in flight."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("hera_requests_total", "Chat completions by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("hera_request_latency_seconds", "Chat completion latency by route", ["route"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                 registry=self.registry)
        self.tokens = Counter("hera_tokens_total", "Tokens by route and kind", ["route", "kind"], registry=self.registry)
        self.cost = Counter("hera_cost_usd_total", "Cost in USD by route", ["route"], registry=self.registry)
        self.all_cloud_cost = Counter("hera_all_cloud_cost_usd_total", "What all-cloud would have cost, USD",
                                      registry=self.registry)
        self.cache_hit_rate = Gauge("hera_kv_cache_hit_rate", "Share of local prompt tokens reused from the KV cache",
                                    registry=self.registry)
        self.in_flight = Gauge("hera_requests_in_flight", "Requests being served", registry=self.registry)
        self.learning = Gauge("hera_learning_steps", "Learning loop counts: shadow drafts, audits, labels, swaps",
                              ["kind"], registry=self.registry)
        self.audit_agreement = Gauge("hera_learning_audit_agreement", "Audited agreement of local steps per "
                                     "predictor version", ["version"], registry=self.registry)
        self.predictor = Gauge("hera_predictor_in_use", "1 for the predictor version routing now", ["version"],
                               registry=self.registry)

        self._per_route: dict[str, tuple] = {}  # route -> its label children (labels() costs ~2 us a call)

    def observe_step(self, route: str, latency_s: float, prompt_tokens: int, completion_tokens: int,
                     cost_usd: float, cloud_cost_usd: float) -> None:
        """One served routed step."""
        children = self._per_route.get(route)
        if children is None:
            children = self._per_route[route] = (
                self.requests.labels(route, "ok"), self.latency.labels(route), self.tokens.labels(route, "prompt"),
                self.tokens.labels(route, "completion"), self.cost.labels(route))
        ok, latency, prompt, completion, cost = children
        ok.inc()
        latency.observe(latency_s)
        prompt.inc(prompt_tokens)
        completion.inc(completion_tokens)
        cost.inc(cost_usd)
        self.all_cloud_cost.inc(cloud_cost_usd)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def observe_cache(self, stats: dict[str, float] | None) -> None:
        """The local engine's KV-cache counters (Runtime.cache_stats()) -> the hit-rate gauge."""
        if stats:
            seen = stats["prefill_tokens"] + stats["reused_tokens"]
            self.cache_hit_rate.set(stats["reused_tokens"] / seen if seen else 0.0)

    def observe_learning(self, status: dict) -> None:
        """The learning loop's status (TrafficLearning.status()) -> gauges."""
        for kind, n in status.get("stats", {}).items():
            self.learning.labels(kind).set(n)
        self.learning.labels("traced_steps").set(status.get("traced_steps", 0))
        self.learning.labels("labelled_steps").set(status.get("labelled_steps", 0))
        for version, audit in status.get("audit", {}).items():
            if audit.get("agreement") is not None:
                self.audit_agreement.labels(version).set(audit["agreement"])
        self.predictor.clear()
        self.predictor.labels(status.get("current", "v0")).set(1)
