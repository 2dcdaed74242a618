"""The monitor: follows ``results`` and ``labels``, joins them, runs the drift detectors, reads the active
policy and its arms from Redis, and serves a JSON API, Prometheus metrics and a live dashboard.

Read-only by design: it never writes to Kafka or Redis and the HTTP server answers GET only. It
consumes with manual partition assignment (no consumer group, nothing committed), so any number of
monitors can watch one stack; it waits for the topics to exist rather than creating them.

Embedding it (``exitflow demo`` does)::

    mon = Monitor(bootstrap, redis_url=url, prefix=prefix, port=0).start()
    print(mon.url)   # http://127.0.0.1:<port>/
    ...
    mon.stop()
"""

from __future__ import annotations

import json
import logging
import math
import mimetypes
import re
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from monitoring.aggregate import Aggregate
from monitoring.drift import DriftMonitor
from monitoring.join import LabelJoin
from monitoring.metrics import MetricsServer, StageMetrics, serve

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
CONTENT_SECURITY_POLICY = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"


class _Collector:
    """Exports the aggregate's running counts at scrape time (no second bookkeeping)."""

    def __init__(self, agg: Aggregate) -> None:
        self.agg = agg

    def collect(self):
        a = self.agg
        with a.lock:
            yield _counter("exitflow_monitor_results", "Result records the monitor counted (duplicates excluded)",
                           a.samples)
            yield _counter("exitflow_monitor_duplicate_results", "Result records seen again for an id", a.duplicates)
            yield _counter("exitflow_monitor_labels", "Label records read", a.labels_seen)
            yield _counter("exitflow_monitor_joined", "Results joined with their label", a.labelled)
            yield _counter("exitflow_monitor_correct", "Joined results whose prediction matched the label", a.correct)
            yield _counter("exitflow_monitor_unlabelled", "Results dropped from the join before a label came",
                           a.join.missing)
            yield _counter("exitflow_monitor_orphan_labels", "Labels dropped from the join before a result came",
                           a.join.orphans)
            errors = CounterMetricFamily("exitflow_monitor_decode_errors", "Records that failed to decode",
                                         labels=["kind"])
            for kind in ("result", "label"):
                errors.add_metric([kind], a.decode_errors.get(kind, 0))
            yield errors
            pending = GaugeMetricFamily("exitflow_monitor_pending_records", "Records waiting in the join",
                                        labels=["kind"])
            pending.add_metric(["result"], a.join.pending_results)
            pending.add_metric(["label"], a.join.pending_labels)
            yield pending
            acc = GaugeMetricFamily("exitflow_monitor_accuracy_ratio",
                                    "Accuracy over the last N joined results (evaluation only)", labels=["window"])
            for w in a.windows:
                value = a.accuracy(w)
                if value is not None:
                    acc.add_metric([str(w)], value)
            yield acc
            epochs = GaugeMetricFamily("exitflow_policy_epoch", "Epoch the policy's learned state is in (starts "
                                       "with 0; the drift hook begins a new one on a detected shift)",
                                       labels=["policy"])
            for name, epoch in a.current_epochs().items():
                epochs.add_metric([name], epoch)
            yield epochs
            if a.last_ts is not None:
                yield GaugeMetricFamily("exitflow_monitor_last_result_timestamp_seconds",
                                        "Time the newest result was written", value=a.last_ts)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class Monitor:
    """The monitor service; ``start()`` runs it in background threads, ``stop()`` ends them.

    ``port=0`` picks a free port (see ``url``). ``from_beginning`` reads the topics from their first
    record (the whole replay), otherwise from their end at start.
    """

    def __init__(self, bootstrap: str, *, redis_url: str | None = None, prefix: str = "exitflow.",
                 redis_prefix: str = "exitflow:", host: str = "127.0.0.1", port: int = 8090,
                 metrics_port: int | None = None, from_beginning: bool = True, poll_s: float = 1.0,
                 join_capacity: int = 50_000, label_max_age_s: float = 600.0,
                 drift: DriftMonitor | None = None) -> None:
        from stream.config import Topics
        self.bootstrap = bootstrap
        self.redis_url = redis_url
        self.topics = Topics(prefix)
        self.redis_prefix = redis_prefix
        self.host = host
        self.port = port
        self.metrics_port = metrics_port
        self.from_beginning = from_beginning
        self.poll_s = poll_s
        self.registry = CollectorRegistry()
        self.stage_metrics = StageMetrics("monitor", self.registry)
        self.aggregate = Aggregate(drift=drift or DriftMonitor(registry=self.registry),
                                   join=LabelJoin(join_capacity, label_max_age_s))
        self.registry.register(_Collector(self.aggregate))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._http: ThreadingHTTPServer | None = None
        self._metrics_server: MetricsServer | None = None

    @classmethod
    def attach(cls, broker, redis_server=None, **kw) -> "Monitor":
        """A monitor pointed at running :class:`stream.infra.Broker` / ``RedisServer`` objects."""
        return cls(broker.bootstrap, redis_url=redis_server.url if redis_server else None, **kw)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "Monitor":
        self._http = _make_server(self)
        self.port = int(self._http.server_address[1])
        self._spawn("monitor-http", self._http.serve_forever)
        if self.metrics_port is not None:
            self._metrics_server = serve(self.registry, self.metrics_port, self.host)
        self._spawn("monitor-kafka", self._kafka_loop)
        if self.redis_url:
            self._spawn("monitor-redis", self._redis_loop)
        log.info("exitflow monitor: dashboard at %s (Kafka %s, topics %s*)", self.url, self.bootstrap,
                 self.topics.prefix)
        return self

    def request_stop(self) -> None:
        """Ask the threads to end (safe from a signal handler); ``stop()`` also waits for them."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()

    def __enter__(self) -> "Monitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait(self) -> None:
        """Block until stopped (the CLI's foreground mode)."""
        while not self._stop.wait(0.5):
            pass

    def _spawn(self, name: str, target) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- the JSON the dashboard draws ----------------------------------------------------------------
    def summary(self, series_s: int = 300) -> dict[str, Any]:
        out = self.aggregate.snapshot(series_s)
        out["time"] = time.time()
        out["topics"] = {"results": self.topics.results, "labels": self.topics.labels}
        return out

    # -- Kafka ---------------------------------------------------------------------------------------
    def _kafka_loop(self) -> None:
        from stream import kafka as K
        from stream import messages
        from stream.errors import MessageError

        agg = self.aggregate
        consumer = None
        assigned: set = set()
        next_refresh = next_lag = 0.0
        kinds = {self.topics.results: "result", self.topics.labels: "label"}
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if consumer is None:
                    if not self._broker_reachable():  # the client would block for its whole timeout
                        self._set_kafka(False, f"broker unreachable at {self.bootstrap}")
                        self._stop.wait(1.0)
                        continue
                    consumer = K.consumer(self.bootstrap, metadata_max_age_ms=5000, max_partition_fetch_bytes=256 << 10)
                if now >= next_refresh:
                    assigned = self._assign(consumer, assigned, list(kinds))
                    next_refresh = now + (1.0 if not assigned else 5.0)
                if not assigned:  # the topics do not exist yet: wait for the stack to create them
                    ok = self._broker_reachable()
                    self._set_kafka(ok, f"waiting for {self.topics.results}" if ok else
                                    f"broker unreachable at {self.bootstrap}")
                    self._stop.wait(0.5)
                    continue
                batches = consumer.poll(timeout_ms=200, max_records=5000)
                if batches:
                    self._set_kafka(True, None)
                wall = time.time()
                results, labels = [], []
                for tp, records in batches.items():
                    kind = kinds[tp.topic]
                    for record in records:
                        try:
                            msg = messages.decode(kind, record.value)
                        except MessageError as exc:
                            log.debug("monitor: %s at %s[%d]@%d: %s", kind, tp.topic, tp.partition, record.offset, exc)
                            agg.decode_error(kind)
                            continue
                        (results if kind == "result" else labels).append(msg)
                # Partitions arrive in chunks: put this poll's results back in time order for the detectors.
                results.sort(key=_result_order)
                for msg in labels:
                    agg.add_label(msg, wall)
                for msg in results:
                    agg.add_result(msg, wall)
                agg.tick(wall)
                if now >= next_lag:
                    next_lag = now + 2.0
                    if not self._broker_reachable():  # kafka-python retries quietly; say so on the dashboard
                        self._set_kafka(False, f"broker unreachable at {self.bootstrap}")
                        continue
                    self._lag(consumer, assigned)
            except Exception as exc:  # the broker went away, a metadata error…: report, back off, reconnect
                log.warning("monitor: Kafka at %s: %s", self.bootstrap, exc)
                self._set_kafka(False, f"{type(exc).__name__}: {exc}")
                self.stage_metrics.broker_error()
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception:
                        pass
                consumer, assigned = None, set()
                self._stop.wait(1.0)
        if consumer is not None:
            consumer.close()

    def _assign(self, consumer, assigned: set, topics: list[str]) -> set:
        """Assign every partition of the topics that exist now, keeping positions of those already read."""
        from kafka import TopicPartition
        wanted = set()
        for topic in topics:
            for p in consumer.partitions_for_topic(topic) or ():
                wanted.add(TopicPartition(topic, p))
        if wanted == assigned:
            return assigned
        positions = {tp: consumer.position(tp) for tp in assigned}
        consumer.assign(sorted(wanted))
        fresh = [tp for tp in wanted if tp not in positions]
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        if fresh:
            (consumer.seek_to_beginning if self.from_beginning else consumer.seek_to_end)(*fresh)
        log.info("monitor: reading %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(wanted)))
        return wanted

    def _broker_reachable(self) -> bool:
        from stream.infra import port_open
        for server in self.bootstrap.split(","):
            host, _, port = server.strip().rpartition(":")
            if host and port.isdigit() and port_open(host.strip("[]"), int(port), timeout=0.5):
                return True
        return False

    def _lag(self, consumer, assigned: set) -> None:
        ends = consumer.end_offsets(list(assigned))
        total = 0
        for tp, end in ends.items():
            lag = max(0, end - consumer.position(tp))
            total += lag
            self.stage_metrics.lag(tp.topic, tp.partition, lag)
        with self.aggregate.lock:
            self.aggregate.kafka["lag"] = total
        self._set_kafka(True, None)

    def _set_kafka(self, ok: bool, error: str | None) -> None:
        agg = self.aggregate
        if agg.kafka["connected"] != ok or agg.kafka["error"] != error:
            with agg.lock:
                agg.kafka.update(connected=ok, error=error)
            self.stage_metrics.broker_down(not ok)

    # -- Redis ---------------------------------------------------------------------------------------
    def _arms_namespace(self, spec) -> tuple[str | None, str | None]:
        """The state namespace to show arms for: the active policy's (as its results name it), else the
        namespace of the newest result's policy."""
        agg = self.aggregate
        with agg.lock:
            if spec is not None and spec.name in agg.namespaces:
                return spec.name, agg.namespaces[spec.name]
            if agg.swaps:
                latest = agg.swaps[-1]
                return latest["name"], latest["ns"]
        return None, None

    def _redis_loop(self) -> None:
        import redis

        from policies.control import PolicyControl
        from stream.checkpoint import decode_state

        client = redis.Redis.from_url(self.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        control = PolicyControl(client, prefix=self.redis_prefix)
        agg = self.aggregate
        last_version = None
        while not self._stop.is_set():
            try:
                spec = control.current()
                active = None if spec is None else {"name": spec.name, "version": spec.version,
                                                    "params": spec.params, "cost": spec.cost}
                layers = control.num_layers() if spec is not None else None
                if layers:
                    cost = spec.cost_model(layers)
                    active.update(offload_cost=cost.offload_cloud, offload_ratio=cost.offload_ratio(layers),
                                  cost_line=cost.describe(layers))
                agg.set_active(active, time.time())
                if spec is not None and spec.version != last_version:
                    ns = agg.namespaces.get(spec.name, "")
                    self.stage_metrics.policy_info(spec.name, spec.version, ns)
                    last_version = spec.version if ns else None
                name, ns = self._arms_namespace(spec)
                if ns:
                    arms = arms_from_state(decode_state(client.hgetall(f"{self.redis_prefix}state:{ns}")))
                    agg.set_arms({"policy": name, "ns": ns, "arms": arms})
                    if arms:
                        self.stage_metrics.arms(name, {a["arm"]: a["pulls"] for a in arms},
                                                {a["arm"]: a["value"] for a in arms if a["value"] is not None})
                else:
                    agg.set_arms(None)
                agg.set_epochs(control.epoch_events(limit=100))
                with agg.lock:
                    agg.redis.update(connected=True, error=None)
            except Exception as exc:
                if agg.redis["connected"] is not False:  # log the change, not every retry
                    log.warning("monitor: Redis at %s: %s", _safe_url(self.redis_url), exc)
                with agg.lock:
                    agg.redis.update(connected=False, error=f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.poll_s)
        client.close()


def _result_order(msg: dict[str, Any]) -> tuple[float, int]:
    return (float(msg.get("ts") or 0.0), msg.get("seq") if isinstance(msg.get("seq"), int) else 0)


ARM_FIELD = re.compile(r"([a-z]+)[:_]?(\d+)")


def arms_from_state(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Arms of a bandit's state hash: fields ``<stat><arm>`` (``n3``, also ``n:3``/``n_3``) for numbered arms;
    pulls are ``n`` (completed), ``p`` pending, value is ``s / n`` (mean reward).

    >>> arms_from_state({"n3": 4.0, "s3": 2.0, "p3": 1.0, "n1": 2.0, "s1": 1.5, "t": 7.0, "n_edge": 3.0})
    [{'arm': '1', 'pulls': 2.0, 'pending': 0.0, 'value': 0.75}, {'arm': '3', 'pulls': 4.0, 'pending': 1.0, 'value': 0.5}]
    """
    by_arm: dict[int, dict[str, float]] = {}
    for field, value in state.items():
        match = ARM_FIELD.fullmatch(field)
        if match and not hasattr(value, "shape"):
            by_arm.setdefault(int(match.group(2)), {})[match.group(1)] = float(value)
    out = []
    for arm in sorted(by_arm):
        stats = by_arm[arm]
        if "n" not in stats and "p" not in stats:
            continue
        n = stats.get("n", 0.0)
        value = stats["s"] / n if "s" in stats and n else stats.get("q")
        out.append({"arm": str(arm), "pulls": n, "pending": stats.get("p", 0.0), "value": value})
    return out


def _safe_url(url: str | None) -> str:
    """A Redis URL without its password, for logs."""
    if not url:
        return ""
    parsed = urlparse(url)
    return url.replace(f":{parsed.password}@", ":***@") if parsed.password else url


# -- HTTP -----------------------------------------------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _make_server(monitor: Monitor) -> _Server:
    class Handler(BaseHTTPRequestHandler):
        server_version = "exitflow-monitor"

        def log_message(self, fmt, *args):  # keep stderr quiet; debug logging has it
            log.debug("monitor http: " + fmt, *args)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            url = urlparse(self.path)
            path = url.path
            if path == "/api/summary":
                query = parse_qs(url.query)
                try:
                    series_s = max(10, min(900, int(query.get("series", ["300"])[0])))
                except ValueError:
                    return self._send(HTTPStatus.BAD_REQUEST, b"series must be an integer", "text/plain")
                return self._json(monitor.summary(series_s))
            if path == "/api/events":
                return self._json(monitor.summary(10)["drift"])
            if path == "/api/epochs":
                return self._json(monitor.summary(10)["epochs"])
            if path == "/metrics":
                return self._send(HTTPStatus.OK, generate_latest(monitor.registry),
                                  "text/plain; version=0.0.4; charset=utf-8")
            if path == "/healthz":
                return self._json({"ok": True, "kafka": monitor.aggregate.kafka})
            if path in ("/", "/index.html"):
                return self._file("index.html")
            if path.startswith("/static/"):
                return self._file(path[len("/static/"):])
            return self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

        def do_HEAD(self):  # noqa: N802
            self.do_GET()

        def _refuse(self):
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"the monitor is read-only", "text/plain",
                       extra={"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

        def _json(self, obj):
            try:
                body = json.dumps(obj, allow_nan=False, default=_jsonable)
            except ValueError:  # a NaN/inf slipped in from a record: JSON has no such numbers
                body = json.dumps(_finite(obj), allow_nan=False, default=_jsonable)
            self._send(HTTPStatus.OK, body.encode(), "application/json", extra={"Cache-Control": "no-store"})

        def _file(self, name: str):
            target = (STATIC / name).resolve()
            if STATIC not in target.parents or not target.is_file():
                return self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
            ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype.endswith("javascript"):
                ctype += "; charset=utf-8"
            self._send(HTTPStatus.OK, target.read_bytes(), ctype)

        def _send(self, status, body: bytes, ctype: str, extra: dict | None = None):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return _Server((monitor.host, monitor.port), Handler)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__}")
