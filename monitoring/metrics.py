"""Prometheus metrics of the stage workers, on an injected registry.

Every update a worker makes per sample is a handful of dict lookups and ``inc``/``observe`` calls on
label children cached here (``labels()`` itself costs more than the increment), so ``result`` stays at
a few µs. Offload rate and cost per sample are not exported: they are PromQL over the counters, e.g.
``sum(rate(exitflow_offloads_total[1m])) / sum(rate(exitflow_samples_total[1m]))``.

>>> from prometheus_client import CollectorRegistry
>>> reg = CollectorRegistry()
>>> m = StageMetrics("device", reg)
>>> m.result({"tier": "device", "exit_layer": 2, "policy": {"name": "static-maxprob"},
...           "cost": {"device": 2.0, "edge": 0.0, "offload": 0.0, "fee": 0.0},
...           "bytes_offloaded": 0, "decision": {"layer": 2, "confidence": 0.93}})
>>> reg.get_sample_value("exitflow_samples_total", {"stage": "device", "policy": "static-maxprob"})
1.0
>>> reg.get_sample_value("exitflow_cost_lambda_total",
...                      {"stage": "device", "policy": "static-maxprob", "component": "device"})
2.0
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector,
                               ProcessCollector, start_http_server)

TIERS = ("device", "edge", "cloud")
COST_COMPONENTS = ("device", "edge", "offload", "fee")
DLQ_REASONS = ("decode", "schema", "size", "tensor", "duplicate", "policy", "model", "timeout", "other")
# Longer kinds some callers pass, folded onto the short ones (anything else becomes "other").
DLQ_ALIASES = {"could_not_decode": "decode", "schema_version": "schema", "lacks_required": "schema",
               "must_be": "schema", "empty": "schema", "exceeds_the_limit": "size"}
EPOCH_REASONS = ("drift", "manual")
MAX_LAYER_LABEL = 48  # exit layers above this are reported as "other" (keeps the label set bounded)
MAX_POLICY_LABELS = 32  # distinct policy names per registry; more are reported as "other"

CONFIDENCE_BUCKETS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STATE_WRITE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _Families:
    """The metric families of one registry, shared by every StageMetrics on it (one per stage label)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = dict(registry=registry, namespace="exitflow")
        self.samples = Counter("samples", "Samples whose result this stage wrote", ["stage", "policy"], **r)
        self.exits = Counter("exits", "Samples by the tier and 1-based layer they exited at",
                             ["stage", "policy", "tier", "layer"], **r)
        self.cost = Counter("cost_lambda", "Cost of the samples by component, in λ units (device layer = 1)",
                            ["stage", "policy", "component"], **r)
        self.offload_bytes = Counter("offload_bytes", "Bytes sent to a remote tier for the samples",
                                     ["stage", "policy"], **r)
        self.offloads = Counter("offloads", "Samples offloaded, by target tier", ["stage", "policy", "target"], **r)
        self.confidence = Histogram("decision_confidence", "Max class probability at the exit where the "
                                    "policy decided", ["stage", "policy"], buckets=CONFIDENCE_BUCKETS, **r)
        self.distance = Gauge("embedding_distance", "DIMEE distance of the last sample to its nearest centroid",
                              ["stage"], **r)
        self.e2e = Histogram("result_latency_seconds", "End-to-end latency of a sample (produced to result)",
                             ["stage"], buckets=LATENCY_BUCKETS, **r)
        self.latency = Histogram("stage_latency_seconds", "Processing time per sample in this stage",
                                 ["stage"], buckets=LATENCY_BUCKETS, **r)
        self.policy = Info("policy", "The policy this stage serves with", ["stage"], **r)
        self.policy_version = Gauge("policy_version", "Version of the active policy (rises at every swap)",
                                    ["stage"], **r)
        self.arm_pulls = Gauge("arm_pulls", "Times a bandit arm was pulled (from the policy state)",
                               ["stage", "policy", "arm"], **r)
        self.arm_value = Gauge("arm_value", "Mean reward of a bandit arm (from the policy state)",
                               ["stage", "policy", "arm"], **r)
        self.dlq = Counter("dlq", "Records sent to the dead-letter topic, by reason", ["stage", "reason"], **r)
        self.state_write = Histogram("state_write_seconds", "Latency of one atomic Redis state commit",
                                     ["stage"], buckets=STATE_WRITE_BUCKETS, **r)
        self.lag = Gauge("consumer_lag_records", "Records behind the end of the partition",
                         ["stage", "topic", "partition"], **r)
        self.broker_up = Gauge("broker_up", "1 while the Kafka broker answers this stage, 0 while it is down",
                               ["stage"], **r)
        self.broker_errors = Counter("broker_errors", "Errors talking to the Kafka broker", ["stage"], **r)
        self.expired = Counter("pending_expired", "Offloaded pulls whose feedback never came, expired after the "
                               "pending timeout", ["stage"], **r)
        self.handovers = Counter("partition_handovers", "Input partitions this worker took over or handed back "
                                 "(Redis leases)", ["stage", "kind"], **r)
        self.rebases = Counter("fence_rebases", "Times a partition's offset fence was re-based because the broker's "
                               "log was a new one (an empty broker restart)", ["stage"], **r)
        self.broker_lost = Counter("broker_lost_records", "Records the broker held but lost before any worker "
                                   "applied them (seen in its log, gone after an empty restart)", ["stage"], **r)
        self.epochs = Counter("policy_epochs", "New epochs of a policy's learned state this worker began (drift "
                              "hook: reset or decay); summed over the device workers, each epoch counts once",
                              ["stage", "policy", "reason"], **r)
        self.batch = Histogram("batch_records", "Records per processed batch", ["stage"],
                               buckets=BATCH_BUCKETS, **r)
        self.policies: set[str] = set()


_FAMILIES: "weakref.WeakKeyDictionary[CollectorRegistry, _Families]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _families(registry: CollectorRegistry) -> _Families:
    with _LOCK:
        fams = _FAMILIES.get(registry)
        if fams is None:
            fams = _FAMILIES[registry] = _Families(registry)
        return fams


class StageMetrics:
    """What one stage worker (``device``, ``edge``, ``cloud``…) reports.

    Without a registry it makes its own (with process and platform collectors); pass one to share an
    endpoint between several stages of one process: the families are created once per registry.
    """

    def __init__(self, stage: str, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.stage = stage
        self.registry = registry
        self._f = f = _families(registry)
        self._per_policy: dict[str, tuple] = {}
        self._exits: dict[tuple[str, str, int], Any] = {}
        self._offloads: dict[tuple[str, str], Any] = {}
        self._dlq: dict[str, Any] = {}
        self._lag: dict[tuple[str, int], Any] = {}
        self._distance = f.distance.labels(stage)
        self._e2e = f.e2e.labels(stage)
        self._latency = f.latency.labels(stage)
        self._version = f.policy_version.labels(stage)
        self._state_write = f.state_write.labels(stage)
        self._broker_up = f.broker_up.labels(stage)
        self._broker_up.set(1)
        self.broker_errors = f.broker_errors.labels(stage)
        self._expired = f.expired.labels(stage)
        self._batch = f.batch.labels(stage)

    def _policy(self, name: str) -> tuple:
        """(label, samples, cost children, bytes, confidence) of a policy name, created once."""
        children = self._per_policy.get(name)
        if children is None:
            f = self._f
            label = name
            if name not in f.policies and len(f.policies) >= MAX_POLICY_LABELS:
                label = "other"
            f.policies.add(label)
            s = self.stage
            children = self._per_policy[name] = (
                label,
                f.samples.labels(s, label),
                tuple(f.cost.labels(s, label, c) for c in COST_COMPONENTS),
                f.offload_bytes.labels(s, label),
                f.confidence.labels(s, label),
            )
        return children

    def result(self, record: dict) -> None:
        """Count one result record (the record this stage writes to the ``results`` topic)."""
        policy, samples, costs, nbytes, confidence = self._policy(record["policy"]["name"])
        samples.inc()
        cost = record["cost"]
        for child, component in zip(costs, COST_COMPONENTS):
            value = cost.get(component)
            if value:
                child.inc(value)
        tier = record["tier"]
        layer = record["exit_layer"]
        key = (policy, tier, layer)
        child = self._exits.get(key)
        if child is None:
            label = str(layer) if 0 <= layer <= MAX_LAYER_LABEL else "other"
            child = self._exits[key] = self._f.exits.labels(self.stage, policy, tier if tier in TIERS else "other",
                                                            label)
        child.inc()
        if tier != "device":
            child = self._offloads.get((policy, tier))
            if child is None:
                child = self._offloads[(policy, tier)] = self._f.offloads.labels(
                    self.stage, policy, tier if tier in TIERS else "other")
            child.inc()
            sent = record.get("bytes_offloaded")
            if sent:
                nbytes.inc(sent)
        decision = record.get("decision")
        if decision is not None:
            conf = decision.get("confidence")
            if conf is not None:
                confidence.observe(conf)
        distance = record.get("embedding_distance")
        if distance is not None:
            self._distance.set(distance)
        latency = record.get("latency_ms")
        if latency is not None and latency.get("total") is not None:
            self._e2e.observe(latency["total"] / 1000.0)

    def latency(self, seconds: float) -> None:
        """Processing time of one sample in this stage."""
        self._latency.observe(seconds)

    def policy_info(self, name: str, version: int, namespace: str) -> None:
        """The policy now serving (call at start and after every swap)."""
        self._f.policy.labels(self.stage).info({"name": name, "version": str(version), "namespace": namespace})
        self._version.set(version)

    def arms(self, policy: str, pulls: dict[int, float], values: dict[int, float]) -> None:
        """Per-arm pulls and mean rewards of a bandit policy (arms are split layers or tiers: bounded)."""
        f = self._f
        for arm, n in pulls.items():
            f.arm_pulls.labels(self.stage, policy, str(arm)).set(n)
        for arm, v in values.items():
            f.arm_value.labels(self.stage, policy, str(arm)).set(v)

    def dlq(self, reason: str) -> None:
        """One record sent to the dead-letter topic; ``reason`` is a short kind (unknown kinds → other)."""
        child = self._dlq.get(reason)
        if child is None:
            kind = DLQ_ALIASES.get(reason, reason)
            child = self._dlq[reason] = self._f.dlq.labels(self.stage, kind if kind in DLQ_REASONS else "other")
        child.inc()

    def state_write(self, seconds: float) -> None:
        """Latency of one Redis state commit."""
        self._state_write.observe(seconds)

    def lag(self, topic: str, partition: int, lag: int) -> None:
        """Consumer lag of one input partition."""
        key = (topic, partition)
        child = self._lag.get(key)
        if child is None:
            child = self._lag[key] = self._f.lag.labels(self.stage, topic, str(partition))
        child.set(lag)

    def broker_down(self, down: bool) -> None:
        """Mark the broker unreachable (True) or back (False)."""
        self._broker_up.set(0 if down else 1)

    def pending_expired(self, n: int) -> None:
        """``n`` pulls expired for want of feedback (consumers/device.py)."""
        self._expired.inc(n)

    def broker_error(self) -> None:
        """One failed call to the broker (``broker_errors`` is the counter itself)."""
        self.broker_errors.inc()

    def handover(self, gained: int, lost: int) -> None:
        """Partitions taken over (lease acquired) and handed back (released or expired)."""
        if gained:
            self._f.handovers.labels(self.stage, "gained").inc(gained)
        if lost:
            self._f.handovers.labels(self.stage, "lost").inc(lost)

    def rebase(self, lost: int) -> None:
        """A partition's fence was re-based; ``lost`` records of the old log were never applied."""
        self._f.rebases.labels(self.stage).inc()
        if lost:
            self._f.broker_lost.labels(self.stage).inc(lost)

    def epoch(self, policy: str, reason: str) -> None:
        """This worker began a new epoch of ``policy``'s state; ``reason`` is short and bounded (``drift``)."""
        label = self._policy(policy)[0]
        self._f.epochs.labels(self.stage, label, reason if reason in EPOCH_REASONS else "other").inc()

    def batch(self, size: int) -> None:
        """Size of one processed batch."""
        self._batch.observe(size)


class MetricsServer:
    """A running metrics endpoint: ``url``, ``port`` and ``stop()``."""

    def __init__(self, server, thread, host: str) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port = int(server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` at http://host:port/metrics (port 0: any free port, see ``.port``)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread, host)
