"""What the monitor knows about the stream: running totals, per-second series, accuracy windows, policy
swaps and drift events, all in bounded memory. Pure (no I/O); the service feeds it and serves
:meth:`Aggregate.snapshot` as JSON. Thread-safe: the Kafka thread writes, HTTP threads read.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from monitoring.drift import DriftMonitor
from monitoring.join import LabelJoin

TIERS = ("device", "edge", "cloud")
COMPONENTS = ("device", "edge", "offload", "fee")
MAX_SOURCES = 64
MAX_LAYERS = 48


class _Bucket:
    __slots__ = ("n", "cost", "offloads", "labelled", "correct", "conf_sum", "conf_n", "latency_sum")

    def __init__(self) -> None:
        self.n = self.offloads = self.labelled = self.correct = self.conf_n = 0
        self.cost = self.conf_sum = self.latency_sum = 0.0


class Aggregate:
    """Totals and windows over the results and labels seen so far."""

    def __init__(self, *, drift: DriftMonitor | None = None, join: LabelJoin | None = None,
                 windows: tuple[int, ...] = (100, 1000), series_s: int = 900, dedup: int = 200_000,
                 latencies: int = 2000, max_swaps: int = 200) -> None:
        self.lock = threading.Lock()
        self.drift = drift if drift is not None else DriftMonitor()
        self.join = join if join is not None else LabelJoin()
        self.series_s = series_s
        self.samples = 0
        self.duplicates = 0
        self.decode_errors = collections.Counter()
        self.cost = dict.fromkeys(COMPONENTS, 0.0)
        self.cost_total = 0.0
        self.bytes_offloaded = 0
        self.tiers = dict.fromkeys(TIERS, 0)
        self.exits: dict[str, collections.Counter] = {t: collections.Counter() for t in TIERS}
        self.sources: collections.Counter = collections.Counter()
        self.policies: collections.Counter = collections.Counter()
        self.labels_seen = 0
        self.labelled = 0
        self.correct = 0
        self.windows = {w: collections.deque(maxlen=w) for w in windows}
        self._window_sums = dict.fromkeys(windows, 0)
        self.latencies: collections.deque[float] = collections.deque(maxlen=latencies)
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self._series: collections.OrderedDict[int, _Bucket] = collections.OrderedDict()
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._dedup = dedup
        self.swaps: collections.deque[dict] = collections.deque(maxlen=max_swaps)
        self.control_swaps: collections.deque[dict] = collections.deque(maxlen=max_swaps)
        self._policy_key: tuple | None = None
        self.namespaces: dict[str, str] = {}   # policy name → namespace of its latest result
        self.active: dict[str, Any] | None = None
        self.arms: dict[str, Any] | None = None
        self.epochs: list[dict[str, Any]] = []   # epoch starts of the policies' state (Redis), oldest first
        self.kafka: dict[str, Any] = {"connected": False, "error": None, "lag": 0}
        self.redis: dict[str, Any] = {"connected": None, "error": None}

    # -- writers -----------------------------------------------------------------------------------
    def add_result(self, rec: dict[str, Any], now: float) -> None:
        with self.lock:
            sid = rec["id"]
            if sid in self._seen:
                self.duplicates += 1
                return
            self._seen[sid] = None
            if len(self._seen) > self._dedup:
                self._seen.popitem(last=False)
            self.samples += 1
            ts = float(rec.get("ts") or now)
            self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
            self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)
            cost = rec["cost"]
            total = 0.0
            for k in COMPONENTS:
                v = float(cost.get(k) or 0.0)
                self.cost[k] += v
                total += v
            self.cost_total += total
            tier = rec["tier"] if rec["tier"] in TIERS else "cloud"
            self.tiers[tier] += 1
            layer = int(rec["exit_layer"])
            self.exits[tier][str(layer) if 0 <= layer <= MAX_LAYERS else "other"] += 1
            self.bytes_offloaded += int(rec.get("bytes_offloaded") or 0)
            source = str(rec.get("source") or "")
            self.sources[source if source in self.sources or len(self.sources) < MAX_SOURCES else "other"] += 1
            self._track_policy(rec, ts)
            latency = (rec.get("latency_ms") or {}).get("total")
            if latency is not None:
                self.latencies.append(float(latency))
            bucket = self._bucket(ts)
            if bucket is not None:
                bucket.n += 1
                bucket.cost += total
                bucket.offloads += tier != "device"
                conf = (rec.get("decision") or {}).get("confidence")
                if conf is not None:
                    bucket.conf_sum += conf
                    bucket.conf_n += 1
                if latency is not None:
                    bucket.latency_sum += latency
            self.drift.observe_result(rec, time=ts)
            keep = {"prediction": rec["prediction"], "seq": rec.get("seq"), "source": rec.get("source"), "ts": ts,
                    "version": (rec.get("policy") or {}).get("version")}
            for pair in self.join.add_result(sid, keep, now):
                self._score(pair)

    def add_label(self, rec: dict[str, Any], now: float) -> None:
        with self.lock:
            self.labels_seen += 1
            for pair in self.join.add_label(rec["id"], int(rec["label"]), now):
                self._score(pair)

    def decode_error(self, kind: str) -> None:
        with self.lock:
            self.decode_errors[kind] += 1

    def tick(self, now: float) -> None:
        with self.lock:
            self.join.expire(now)

    def set_active(self, active: dict[str, Any] | None, now: float | None = None) -> None:
        """The policy Redis says is active; a new version is logged as a swap made through control."""
        with self.lock:
            if active is not None and (self.active is None or active.get("version") != self.active.get("version")):
                self.control_swaps.append({"time": now, "name": active.get("name"), "version": active.get("version"),
                                           "params": active.get("params")})
            self.active = active

    def set_arms(self, arms: dict[str, Any] | None) -> None:
        with self.lock:
            self.arms = arms

    def set_epochs(self, events: list[dict[str, Any]]) -> None:
        """The latest epoch starts (drift-hook resets and decays) as Redis lists them."""
        with self.lock:
            self.epochs = list(events)

    def current_epochs(self) -> dict[str, int]:
        """Policy name → the epoch its newest namespace with epochs is in (call under the lock)."""
        out: dict[str, int] = {}
        for e in self.epochs:
            out[str(e.get("policy"))] = int(e.get("epoch") or 0)
        return out

    def _track_policy(self, rec: dict[str, Any], ts: float) -> None:
        policy = rec.get("policy") or {}
        name, version, ns = policy.get("name"), policy.get("version"), policy.get("ns")
        self.policies[f"{name} v{version}"] += 1
        if ns:
            self.namespaces[name] = ns
        key = (name, version)
        if key != self._policy_key:
            # A swap as the results show it: first result decided by a new (name, version).
            if self._policy_key is None or (version or 0) >= (self._policy_key[1] or 0):
                self.swaps.append({"time": ts, "name": name, "version": version, "ns": ns, "seq": rec.get("seq")})
                self._policy_key = key

    def _score(self, pair) -> None:
        correct = pair.correct
        self.labelled += 1
        self.correct += correct
        for w, window in self.windows.items():
            if len(window) == window.maxlen:
                self._window_sums[w] -= window[0]
            window.append(int(correct))
            self._window_sums[w] += correct
        bucket = self._bucket(pair.result["ts"], create=False)
        if bucket is not None:
            bucket.labelled += 1
            bucket.correct += correct
        self.drift.observe_error(not correct, pair.result, time=pair.result["ts"])

    def _bucket(self, ts: float, create: bool = True) -> _Bucket | None:
        sec = int(ts)
        bucket = self._series.get(sec)
        if bucket is not None or not create:
            return bucket
        last = next(reversed(self._series)) if self._series else sec
        newest = max(sec, last)
        if sec < newest - self.series_s:
            return None  # older than what the series keeps: totals only
        bucket = self._series[sec] = _Bucket()
        if sec < last:  # a late record opened an older second: keep the seconds in order
            self._series = collections.OrderedDict(sorted(self._series.items()))
        while next(iter(self._series)) < newest - self.series_s:
            self._series.popitem(last=False)
        return bucket

    # -- readers -----------------------------------------------------------------------------------
    def accuracy(self, window: int | None = None) -> float | None:
        if window is None:
            return self.correct / self.labelled if self.labelled else None
        values = self.windows[window]
        return self._window_sums[window] / len(values) if values else None

    def snapshot(self, series_s: int = 300) -> dict[str, Any]:
        with self.lock:
            n = self.samples
            offloads = self.tiers["edge"] + self.tiers["cloud"]
            layers = collections.Counter()
            for counts in self.exits.values():
                layers.update(counts)
            newest = next(reversed(self._series)) if self._series else None
            series = []
            for sec, b in self._series.items():
                if newest is not None and sec < newest - series_s:
                    continue
                series.append({"t": sec, "n": b.n, "cost": b.cost, "offloads": b.offloads,
                               "labelled": b.labelled, "correct": b.correct,
                               "confidence": b.conf_sum / b.conf_n if b.conf_n else None,
                               "latency_ms": b.latency_sum / b.n if b.n else None})
            recent = [s for s in series if newest is not None and s["t"] >= newest - 10]
            lat = sorted(self.latencies)
            return {
                "samples": n,
                "duplicates": self.duplicates,
                "decode_errors": dict(self.decode_errors),
                "first_ts": self.first_ts,
                "last_ts": self.last_ts,
                "cost": {**self.cost, "total": self.cost_total},
                "cost_per_sample": self.cost_total / n if n else None,
                "tiers": dict(self.tiers),
                "offloads": offloads,
                "offload_rate": offloads / n if n else None,
                "bytes_offloaded": self.bytes_offloaded,
                "exits": {t: dict(sorted(c.items(), key=lambda kv: _layer_key(kv[0]))) for t, c in self.exits.items()},
                "exit_layers": dict(sorted(layers.items(), key=lambda kv: _layer_key(kv[0]))),
                "throughput": (sum(s["n"] for s in recent) / max(len(recent), 1)) if recent else 0.0,
                "latency_ms": {q: _percentile(lat, q) for q in (50, 95, 99)},
                "accuracy": {
                    "overall": self.accuracy(),
                    **{f"last_{w}": self.accuracy(w) for w in self.windows},
                    "labelled": self.labelled, "correct": self.correct, "labels_seen": self.labels_seen,
                    "pending_results": self.join.pending_results, "pending_labels": self.join.pending_labels,
                    "unlabelled": self.join.missing, "orphan_labels": self.join.orphans,
                },
                "sources": dict(self.sources.most_common()),
                "policy": {"active": self.active, "swaps": list(self.swaps), "control_swaps": list(self.control_swaps), "results_by_policy": dict(self.policies),
                           "namespaces": dict(self.namespaces)},
                "arms": self.arms,
                "epochs": {"total": len(self.epochs), "events": list(self.epochs), "current": self.current_epochs()},
                "drift": {"total": self.drift.total, "events": [e.as_dict() for e in self.drift.events]},
                "series": series,
                "kafka": dict(self.kafka),
                "redis": dict(self.redis),
            }


def _layer_key(layer: str) -> tuple[int, str]:
    return (int(layer), "") if layer.isdigit() else (10**6, layer)


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]
