"""Prometheus metrics of a decode server (own registry, so several servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class DecodeMetrics:
  """Counters and histograms fed by the driver; gauges refreshed from its stats at scrape time."""

  def __init__(self):
    r = self.registry = CollectorRegistry()
    self.slots_in_use = Gauge("asearcher_decode_slots_in_use", "KV slots holding a request",
                              registry=r)
    self.slots_total = Gauge("asearcher_decode_slots_total", "KV slots", registry=r)
    self.queue_depth = Gauge("asearcher_decode_queue_depth", "requests waiting for a slot",
                             registry=r)
    self.version = Gauge("asearcher_decode_policy_version", "serving weight version", registry=r)
    self.tokens_per_s = Gauge("asearcher_decode_tokens_per_second",
                              "generated tokens per second over the last 5 s", registry=r)
    self.generated = Counter("asearcher_decode_generated_tokens", "sampled tokens", registry=r)
    self.prefilled = Counter("asearcher_decode_prefill_tokens", "tokens run through prefill",
                             registry=r)
    self.requests = Counter("asearcher_decode_requests", "finished requests", ["finish_reason"],
                            registry=r)
    self.prefill_s = Histogram("asearcher_decode_prefill_seconds", "prefill latency",
                               buckets=_LATENCY, registry=r)
    self.step_s = Histogram("asearcher_decode_step_seconds", "generate step latency (all slots)",
                            buckets=_LATENCY, registry=r)
    self.ttft_s = Histogram("asearcher_decode_time_to_first_token_seconds",
                            "submission to first token", buckets=_LATENCY, registry=r)

  def observe_prefill(self, seconds: float, tokens: int) -> None:
    self.prefill_s.observe(seconds)
    self.prefilled.inc(tokens)

  def observe_step(self, seconds: float) -> None:
    self.step_s.observe(seconds)

  def observe_tokens(self, n: int) -> None:
    """Tokens handed to requests: a dispatch also samples for slots whose request finished
    earlier in its block, or was preempted, and those are dropped, not counted."""
    self.generated.inc(n)

  def observe_finish(self, request) -> None:
    self.requests.labels(finish_reason=request.finish_reason).inc()
    if request.first_token_at is not None:
      self.ttft_s.observe(request.first_token_at - request.submitted_at)

  def render(self, stats) -> bytes:
    self.slots_in_use.set(stats.slots_in_use)
    self.slots_total.set(stats.slots_total)
    self.queue_depth.set(stats.queue_depth)
    self.version.set(stats.version)
    self.tokens_per_s.set(stats.tokens_per_s)
    return generate_latest(self.registry)
