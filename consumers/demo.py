"""`exitflow demo`: the whole pipeline on one machine, with live progress and a summary.

Starts the embedded broker and Redis (unless --bootstrap/--redis-url point elsewhere), creates the
topics, makes the chosen policy active, starts one worker process per stage and the replay producer,
follows the ``results`` and ``labels`` topics until every sample has its result, then stops everything
and prints accuracy (from the labels topic), cost relative to the final exit, offload rate, per-tier
counts and throughput.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from stream import messages
from stream.config import Topics, default_model_dir, home

log = logging.getLogger(__name__)


def register_demo(subparsers) -> None:
    from consumers.cli import add_policy_args

    p = subparsers.add_parser(
        "demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="run the whole pipeline on a dataset or scenario and summarise it",
        description="Start the embedded Kafka broker and Redis, the device/edge/cloud workers (separate "
        "processes) and the replay producer; show live progress; when every sample has its result, print "
        "accuracy, cost relative to the final exit, offload rate, tier counts and samples/s.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", default=None, help="dataset to replay (default imdb)")
    src.add_argument("--scenario", help="scenario file (YAML/TOML) chaining datasets")
    p.add_argument("--split", help="dataset split")
    p.add_argument("--limit", type=int, default=2000, help="samples to replay")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (datasets are shuffled before --limit)")
    p.add_argument("--rate", type=float, default=0.0, help="replay rate, samples/s (0: as fast as possible)")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--device-workers", type=int, default=1, help="device worker processes")
    p.add_argument("--json", type=Path, dest="json_out", help="write the summary as JSON here")
    p.add_argument("--results", type=Path, dest="results_out",
                   help="write every result record here, one JSON object per line, in stream order (seq)")
    p.add_argument("--bootstrap", default=None, help="use this Kafka instead of the embedded broker")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of the embedded one")
    p.add_argument("--prefix", default=None, help="topic prefix (default: a fresh one per run)")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--dashboard-port", type=int, default=0,
                   help="port of the live dashboard on 127.0.0.1 (0: a free one; printed at start)")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the monitor and its dashboard")
    p.add_argument("--linger", type=float, default=0.0,
                   help="keep the stack and dashboard up this many seconds after the summary (Ctrl-C ends it)")
    p.add_argument("--reference", type=Path, default=None,
                   help="labelled in-domain matrix for the distance drift signal (default: the SST-2 dev "
                   "calibration matrix when it exists)")
    add_policy_args(p)
    p.set_defaults(func=cmd_demo)


def _expected_count(args) -> int:
    from producers.replay import iter_samples, load_scenario, single
    scenario = load_scenario(args.scenario) if args.scenario else \
        single(args.dataset or "imdb", args.split, args.limit, True, args.seed)
    return sum(1 for _ in iter_samples(scenario, args.limit))


class Summary:
    """Running totals over the results and labels seen so far (one result per id counts)."""

    def __init__(self, final_exit_cost: float) -> None:
        self.final_exit_cost = final_exit_cost
        self.results: dict[str, dict] = {}
        self.labels: dict[str, int] = {}
        self.duplicates = 0
        self.first_ts: float | None = None
        self.last_ts: float | None = None

    def add_result(self, msg: dict) -> None:
        if msg["id"] in self.results:
            self.duplicates += 1
            return
        self.results[msg["id"]] = msg
        self.first_ts = msg["ts_in"] if self.first_ts is None else min(self.first_ts, msg["ts_in"])
        self.last_ts = msg["ts"] if self.last_ts is None else max(self.last_ts, msg["ts"])

    def as_dict(self) -> dict:
        n = len(self.results)
        tiers = Counter(r["tier"] for r in self.results.values())
        layers = Counter(r["exit_layer"] for r in self.results.values())
        labelled = [(r["prediction"], self.labels[i]) for i, r in self.results.items() if i in self.labels]
        cost = sum(r["cost"]["total"] for r in self.results.values())
        components = {k: sum(r["cost"][k] for r in self.results.values()) for k in ("device", "edge", "offload", "fee")}
        elapsed = (self.last_ts - self.first_ts) if n else 0.0
        return {
            "processed": n,
            "duplicates": self.duplicates,
            "labelled": len(labelled),
            "accuracy": (sum(p == y for p, y in labelled) / len(labelled)) if labelled else None,
            "cost": cost,
            "cost_per_sample": cost / n if n else None,
            "cost_components": components,
            "final_exit_cost_per_sample": self.final_exit_cost,
            "cost_ratio": cost / (n * self.final_exit_cost) if n else None,
            "offload_rate": (tiers["edge"] + tiers["cloud"]) / n if n else None,
            "tier_counts": {t: tiers.get(t, 0) for t in ("device", "edge", "cloud")},
            "exit_layers": {str(k): layers[k] for k in sorted(layers)},
            "bytes_offloaded": sum(r["bytes_offloaded"] for r in self.results.values()),
            "policies": dict(Counter(f"{r['policy']['name']} v{r['policy']['version']}" for r in self.results.values())),
            "latency_ms_p50": _percentile([r["latency_ms"]["total"] for r in self.results.values()], 50),
            "latency_ms_p99": _percentile([r["latency_ms"]["total"] for r in self.results.values()], 99),
            "elapsed_s": elapsed,
            "samples_per_s": n / elapsed if elapsed > 0 else None,
        }


#: A scenario segment is a run of at least this many consecutive results (by seq) from one source;
#: shorter runs (a gradual mix) are not segments.
SEGMENT_MIN = 100
#: Samples after a boundary within which the most-played split should be the segment's best (issue #12).
SPLIT_WINDOW = 300


def segments(results: list[dict]) -> list[dict]:
    """Per scenario segment, in stream order: its source, first seq, samples, the most-played split (device
    layers) in its first ``SPLIT_WINDOW`` samples and after them, and the seq where the policy's state
    moved to another epoch inside it (the drift hook's reset), from each result's policy namespace.

    >>> rs = [{"seq": i, "source": "a" if i < 150 else "b", "layers": {"device": 1 if i < 200 else 2},
    ...        "policy": {"ns": "p" if i < 170 else "p@1"}} for i in range(400)]
    >>> [(s["source"], s["samples"], s["split_first"]["most"], s["split_after"]["most"], s["epoch_at"]) for s in segments(rs)]
    [('a', 150, 1, None, None), ('b', 250, 2, None, 170)]
    """
    ordered = sorted((r for r in results if r.get("seq") is not None), key=lambda r: r["seq"])
    runs: list[list[dict]] = []
    for r in ordered:
        if runs and runs[-1][0]["source"] == r["source"]:
            runs[-1].append(r)
        else:
            runs.append([r])
    out = []
    for k, run in enumerate(runs):
        if len(run) < SEGMENT_MIN:
            continue
        first, rest = run[:SPLIT_WINDOW], run[SPLIT_WINDOW:]
        before = (runs[k - 1][-1] if k else run[0])["policy"]["ns"]   # the state just before the boundary
        moved = next((r["seq"] for r in run if r["policy"]["ns"] != before), None)
        out.append({"source": run[0]["source"], "first_seq": run[0]["seq"], "samples": len(run),
                    "split_first": _most(first), "split_after": _most(rest), "epoch_at": moved})
    return out


def _most(results: list[dict]) -> dict:
    """The most common device depth of ``results`` and how many had it."""
    counts = Counter(int(r["layers"]["device"]) for r in results)
    if not counts:
        return {"most": None, "count": 0, "of": 0}
    most, count = counts.most_common(1)[0]
    return {"most": most, "count": count, "of": len(results)}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np
    return float(np.percentile(values, q))


def _spawn(cmd: list[str], log_path: Path, threads: int = 1) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def cmd_demo(args) -> int:
    from stream import kafka as K
    from stream.errors import ConfigError, InfraError
    from stream.infra import Broker, RedisServer

    from consumers.cli import policy_spec
    from policies.control import PolicyControl

    model_dir = Path(args.model or default_model_dir())
    meta_path = model_dir / "exitflow_model.json"
    if not meta_path.is_file():
        raise ConfigError(f"no model at {model_dir}: run `exitflow model prepare` (or pass --model DIR)")
    meta = json.loads(meta_path.read_text())
    spec = policy_spec(args, meta.get("hidden_size", 384))
    spec.build(meta["num_layers"], meta["num_classes"])  # fail early on a bad policy or parameter
    expected = _expected_count(args)
    prefix = args.prefix or f"exitflow.demo{int(time.time())}."
    topics = Topics(prefix)
    logs = Path(tempfile.mkdtemp(prefix="exitflow-demo-"))
    broker = redis = monitor = None
    procs: dict[str, subprocess.Popen] = {}
    interrupted = []
    signal.signal(signal.SIGTERM, lambda *_: interrupted.append(1))
    try:
        if args.bootstrap:
            bootstrap = args.bootstrap
        else:
            broker = Broker(log_path=logs / "broker.log").start()
            bootstrap = broker.bootstrap
        if args.redis_url:
            url = args.redis_url
        else:
            redis = RedisServer(data_dir=logs / "redis").start()
            url = redis.url
        K.create_topics(bootstrap, topics.all(), args.partitions)
        import redis as redis_lib
        control = PolicyControl(redis_lib.Redis.from_url(url))
        control.use(spec.name, spec.params, cost=spec.cost, cost_overrides=spec.cost_overrides,
                    num_layers=meta["num_layers"], num_classes=meta["num_classes"])
        if not args.no_dashboard:
            from monitoring.service import Monitor
            monitor = Monitor(bootstrap, redis_url=url, prefix=prefix, port=args.dashboard_port).start()
            print(f"exitflow demo: live dashboard at {monitor.url}", file=sys.stderr)
            _open_browser(monitor.url)
        from stream.infra import free_port, port_open
        metrics_ports: dict[str, int] = {}
        commands: dict[str, list[str]] = {}
        cli = [sys.executable, "-m", "stream.cli"]
        common = ["--bootstrap", bootstrap, "--redis-url", url, "--prefix", prefix]
        worker = ["--model", str(model_dir), "--batch-size", str(args.batch_size), "--max-len", str(args.max_len),
                  "--policy", spec.name, "--cost-model", spec.cost, "--hidden-encoding", args.hidden_encoding]
        # The default reference is the default model's SST-2 dev calibration matrix.
        reference = args.reference or (None if args.model else home() / "matrices" / "sst2-dev.npz")
        device_extra = ["--reference", str(reference)] if reference and reference.is_file() else []
        names = [f"device{i}" for i in range(args.device_workers)] + ["cloud", "edge"]
        for name in names:
            metrics_ports[name] = free_port()
            stage = name.rstrip("0123456789")
            extra = device_extra if stage == "device" else []
            commands[name] = cli + ["worker", stage, "--metrics-port", str(metrics_ports[name])] + worker + extra \
                + common
            procs[name] = _spawn(commands[name], logs / f"{name}.log")
        # The workers serve metrics once their model is loaded: start the stream then, so samples/s is the
        # pipeline's, not the model loading's.
        ready_by = time.monotonic() + 300
        while not all(port_open("127.0.0.1", p) for p in metrics_ports.values()) and time.monotonic() < ready_by:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise InfraError(f"the {name} worker exited with code {proc.returncode}; see {logs / name}.log")
            time.sleep(0.2)
        replay = ["replay", "--no-progress", "--limit", str(args.limit), "--rate", str(args.rate)]
        replay += ["--scenario", str(args.scenario)] if args.scenario else \
            [args.dataset or "imdb", "--shuffle", "--seed", str(args.seed)] + (["--split", args.split] if args.split else [])
        procs["replay"] = _spawn(cli + replay + ["--bootstrap", bootstrap, "--prefix", prefix], logs / "replay.log")
        from stream.costs import preset
        cost = preset(spec.cost, num_layers=meta["num_layers"], **spec.cost_overrides)
        summary = Summary(cost.final_exit_cost(meta["num_layers"]))
        consumer, tps = _reader(bootstrap, topics, args.partitions)
        restarts: dict[str, int] = {}
        from tqdm import tqdm
        bar = tqdm(total=expected, desc="demo", unit="sample", disable=args.no_progress)
        deadline = time.monotonic() + args.timeout
        print(f"exitflow demo: {expected} samples, policy {spec.name}, logs in {logs}", file=sys.stderr)
        while len(summary.results) < expected:
            if interrupted or time.monotonic() > deadline:
                break
            if _supervise(procs, commands, broker, topics, args.partitions, restarts, logs):
                consumer.close()         # the new log starts at 0, perhaps on more partitions: read it all
                consumer, tps = _reader(bootstrap, topics, args.partitions)
            if procs["replay"].poll() not in (None, 0):
                raise InfraError(f"the replay producer failed; see {logs / 'replay.log'}")
            for records in consumer.poll(timeout_ms=200, max_records=2000).values():
                for record in records:
                    if record.topic == topics.results:
                        before = len(summary.results)
                        summary.add_result(messages.decode("result", record.value))
                        bar.update(len(summary.results) - before)
                    else:
                        label = messages.decode("label", record.value)
                        summary.labels[label["id"]] = label["label"]
            live = summary.as_dict()
            if live["processed"]:
                bar.set_postfix(device=live["tier_counts"]["device"], edge=live["tier_counts"]["edge"],
                                cloud=live["tier_counts"]["cloud"], offload=f"{live['offload_rate']:.2f}",
                                cost=f"{live['cost_ratio']:.2f}", refresh=False)
        bar.close()
        label_tps = [tp for tp in tps if tp.topic == topics.labels]
        ends = consumer.end_offsets(label_tps)
        while any(consumer.position(tp) < ends[tp] for tp in label_tps) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200, max_records=5000).values():
                for record in records:
                    if record.topic == topics.labels:
                        label = messages.decode("label", record.value)
                        summary.labels[label["id"]] = label["label"]
        consumer.close()
        result = summary.as_dict()
        result.update({"policy": spec.name, "params": spec.params, "cost_model": spec.cost, "expected": expected,
                       "offload_cost": cost.offload_cloud, "offload_ratio": cost.offload_ratio(meta["num_layers"]),
                       "cost_params": dataclasses.asdict(cost),
                       "complete": len(summary.results) >= expected, "logs": str(logs),
                       "metrics_ports": metrics_ports, "restarts": restarts,
                       "segments": segments(list(summary.results.values())),
                       "dashboard": monitor.url if monitor else None})
        _print_summary(result)
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(result, indent=2) + "\n")
        if args.results_out:
            args.results_out.parent.mkdir(parents=True, exist_ok=True)
            ordered = sorted(summary.results.values(), key=lambda r: (r.get("seq") is None, r.get("seq") or 0))
            args.results_out.write_text("".join(json.dumps(r) + "\n" for r in ordered))
        if args.linger > 0 and monitor is not None:
            print(f"exitflow demo: dashboard stays at {monitor.url} for {args.linger:.0f}s (Ctrl-C to stop)",
                  file=sys.stderr)
            until = time.monotonic() + args.linger
            while time.monotonic() < until and not interrupted:
                time.sleep(0.2)
        return 0 if result["complete"] else 1
    except KeyboardInterrupt:
        print("exitflow demo: interrupted, stopping", file=sys.stderr)
        return 130
    finally:
        if monitor is not None:
            monitor.stop()
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if redis:
            redis.stop()
        if broker:
            broker.stop()


#: Restarts of one worker (exit code 3: Kafka or Redis unreachable past the outage timeout) or of the
#: embedded broker before the demo gives up.
MAX_RESTARTS = 5


def _reader(bootstrap: str, topics: Topics, partitions: int):
    """A consumer of every partition of ``results`` and ``labels``, from the beginning."""
    from kafka import TopicPartition

    from stream import kafka as K
    consumer = K.consumer(bootstrap)
    tps = [TopicPartition(t, p) for t in (topics.results, topics.labels)
           for p in sorted(consumer.partitions_for_topic(t) or range(partitions))]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    return consumer, tps


def _supervise(procs: dict, commands: dict, broker, topics: Topics, partitions: int, restarts: dict,
               logs: Path) -> bool:
    """The demo is the supervisor of what it started: an embedded broker that died is started again on
    its port (memory-only, it comes back empty: the topics are created again and the workers re-base
    their fences, see consumers/worker.py), and a worker that gave up on an outage (exit code 3) is
    restarted. Any other exit, or too many restarts, ends the demo with the worker's log named.
    True when the broker was restarted."""
    from stream import kafka as K
    from stream.errors import InfraError
    if broker is not None and broker.proc is not None and broker.proc.poll() is not None:
        restarts["broker"] = restarts.get("broker", 0) + 1
        if restarts["broker"] > MAX_RESTARTS:
            raise InfraError(f"the embedded broker died {MAX_RESTARTS + 1} times; see {logs / 'broker.log'}")
        print(f"exitflow demo: the embedded broker exited (code {broker.proc.returncode}); restarting it empty on "
              f"{broker.bootstrap}: what it held and no worker had applied yet is lost", file=sys.stderr)
        broker.start()
        K.create_topics(broker.bootstrap, topics.all(), partitions)
        restarted = True
    else:
        restarted = False
    for name, proc in procs.items():
        if name == "replay" or proc.poll() is None:
            continue
        if proc.returncode != 3 or restarts.get(name, 0) >= MAX_RESTARTS:
            raise InfraError(f"the {name} worker exited with code {proc.returncode}; see {logs / name}.log")
        restarts[name] = restarts.get(name, 0) + 1
        print(f"exitflow demo: the {name} worker gave up on an outage (code 3); restart {restarts[name]}",
              file=sys.stderr)
        procs[name] = _spawn(commands[name], logs / f"{name}.log")
    return restarted


def _open_browser(url: str) -> None:
    """Open the dashboard where there is a screen to open it on; on a headless machine the URL is printed."""
    if os.environ.get("DISPLAY") or sys.platform == "darwin":
        import webbrowser
        webbrowser.open(url)


def _print_summary(s: dict) -> None:
    acc = "n/a" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}% ({s['labelled']} labelled)"
    rows = [
        ("processed", f"{s['processed']} / {s['expected']} (duplicates {s['duplicates']})"),
        ("policy", f"{s['policy']} {s['params'] or ''} [{s['cost_model']} costs, o = {s['offload_cost']:g}λ, "
                   f"o/(λL) = {s['offload_ratio']:.3f}]"),
        ("accuracy", acc),
        ("cost / sample", f"{s['cost_per_sample']:.3f} λ vs final exit {s['final_exit_cost_per_sample']:.3f} λ"),
        ("cost ratio", f"{s['cost_ratio']:.3f}"),
        ("offload rate", f"{s['offload_rate']:.3f}"),
        ("tiers", ", ".join(f"{k} {v}" for k, v in s["tier_counts"].items())),
        ("exit layers", ", ".join(f"L{k}: {v}" for k, v in s["exit_layers"].items())),
        ("bytes offloaded", f"{s['bytes_offloaded']:,}"),
        ("throughput", f"{s['samples_per_s']:.1f} samples/s over {s['elapsed_s']:.1f}s" if s["samples_per_s"] else "n/a"),
        ("latency", f"p50 {s['latency_ms_p50']:.0f} ms, p99 {s['latency_ms_p99']:.0f} ms" if s["latency_ms_p50"] else "n/a"),
    ]
    if len(s.get("segments", [])) > 1:   # a scenario: where the policy moved, segment by segment
        for seg in s["segments"]:
            first, after = seg["split_first"], seg["split_after"]
            rows.append((f"segment {seg['source']}"[:24],
                         f"from seq {seg['first_seq']}, {seg['samples']} samples; most-played split {first['most']} "
                         f"({first['count']}/{first['of']}) in the first {SPLIT_WINDOW}"
                         + (f", {after['most']} ({after['count']}/{after['of']}) after" if after["of"] else "")
                         + (f"; new epoch at seq {seg['epoch_at']}" if seg["epoch_at"] is not None else "")))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
