"""The server's Prometheus metrics, in a registry of their own (one per server, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("memfit_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("memfit_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generated_tokens = Counter("memfit_generated_tokens", "Tokens generated.", registry=r)
        self.batch_size = Histogram("memfit_batch_size", "Sequences per decode step.", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.running = Gauge("memfit_running_requests", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("memfit_waiting_requests", "Requests queued for a slot or KV-cache room.", registry=r)
        self.adapter_hits = Counter("memfit_adapter_cache_hits", "Adapter found in a tier (device slot or host).",
                                    ["tier"], registry=r)
        self.adapter_loads = Counter("memfit_adapter_loads", "Adapters read from disk.", registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
