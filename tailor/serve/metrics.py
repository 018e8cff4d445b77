"""Prometheus metrics of the server: requests, latency, tokens, batch sizes, feedback."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/feedback",
           "/v1/adapters"}
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()  # one per app: two servers in one process stay apart
        self.requests = Counter("tailor_requests", "HTTP requests answered", ["path", "status"],
                                registry=self.registry)
        self.latency = Histogram("tailor_request_seconds", "Time until the response starts (a stream's first byte)",
                                 ["path"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.token_count = Counter("tailor_tokens", "Tokens read and written", ["model", "kind"],
                                   registry=self.registry)
        self.batch_size = Histogram("tailor_batch_size", "Requests decoded together, at each token step",
                                    buckets=(1, 2, 4, 8, 16, 32),
                                    registry=self.registry)
        self.feedback = Counter("tailor_feedback", "Feedback received", ["kind"], registry=self.registry)
        # operation: completion (the answer was sent, its record is lost) or feedback (answered with a 503)
        self.store_errors = Counter("tailor_feedback_store_errors", "Feedback store writes and reads that failed",
                                    ["operation"], registry=self.registry)

    def request(self, path: str, status: int, seconds: float) -> None:
        # Paths that are not routes (a scanner's guesses) share one label: the label set stays small.
        label = path if path in _ROUTES else "/v1/models/{name}" if path.startswith("/v1/models/") else "other"
        self.requests.labels(label, str(status)).inc()
        self.latency.labels(label).observe(seconds)

    def tokens(self, model: str, usage: dict) -> None:
        self.token_count.labels(model, "prompt").inc(usage["prompt_tokens"])
        self.token_count.labels(model, "completion").inc(usage["completion_tokens"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
