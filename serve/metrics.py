"""Prometheus metrics of one server, in a registry of its own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from twinfer.engine import LLMEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0)


class ServerMetrics:
    """Request, token and latency metrics plus engine gauges, exported at /metrics."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        r = self.registry
        self.requests = Counter("twinfer_requests", "Finished HTTP requests by status",
                                ["model_name", "status"], registry=r)
        self.prompt_tokens = Counter("twinfer_prompt_tokens", "Prompt tokens processed",
                                     ["model_name"], registry=r).labels(**labels)
        self.generation_tokens = Counter("twinfer_generation_tokens", "Tokens generated",
                                         ["model_name"], registry=r).labels(**labels)
        self.ttft = Histogram("twinfer_time_to_first_token_seconds", "Time to first token",
                              ["model_name"], buckets=_LATENCY_BUCKETS,
                              registry=r).labels(**labels)
        self.tpot = Histogram("twinfer_time_per_output_token_seconds",
                              "Mean time per output token after the first", ["model_name"],
                              buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self.e2e = Histogram("twinfer_e2e_request_latency_seconds", "End-to-end latency",
                             ["model_name"], buckets=_LATENCY_BUCKETS,
                             registry=r).labels(**labels)
        self.running = Gauge("twinfer_num_requests_running", "Requests in the running batch",
                             ["model_name"], registry=r).labels(**labels)
        self.waiting = Gauge("twinfer_num_requests_waiting", "Requests waiting",
                             ["model_name"], registry=r).labels(**labels)
        self.kv_blocks_used = Gauge("twinfer_kv_cache_blocks_used", "KV blocks in use",
                                    ["model_name"], registry=r).labels(**labels)
        self.kv_usage = Gauge("twinfer_kv_cache_usage_ratio", "Fraction of KV blocks in use",
                              ["model_name"], registry=r).labels(**labels)
        self.prefix_hit_rate = Gauge("twinfer_prefix_cache_hit_rate",
                                     "Prompt tokens found in the prefix cache / looked up",
                                     ["model_name"], registry=r).labels(**labels)
        self.model_name = model_name

    def record_status(self, status: str) -> None:
        self.requests.labels(model_name=self.model_name, status=status).inc()

    def update_engine_gauges(self, engine: LLMEngine) -> None:
        """Called by the engine thread after each step."""
        bm = engine.block_manager
        self.running.set(len(engine.scheduler.running))
        self.waiting.set(len(engine.scheduler.waiting))
        self.kv_blocks_used.set(bm.num_used_blocks)
        self.kv_usage.set(bm.num_used_blocks / bm.num_blocks)
        if bm.num_prefix_queries:
            self.prefix_hit_rate.set(bm.num_prefix_hits / bm.num_prefix_queries)

    def render(self) -> bytes:
        return generate_latest(self.registry)
