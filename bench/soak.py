"""Soak: a long stream through the embedded pipeline with random worker kills; nothing lost or doubled.

One device and one cloud worker (separate processes) consume N samples (SST-2 train phrases, looped);
every ~``kill_every`` results one of them (each once per round, in a random order) is SIGKILLed and
restarted. Reports throughput, each recovery time (kill → the first result written by the restarted stage), lost and
duplicated results, and the RSS of each worker 8 s after its (re)start and at the end. A small random model (``random:L=4,H=64``) is used
by default so the run measures the pipeline, not the transformer; pass --model for a real one.

    python -m bench soak [--samples 100000] [--kill-every 10000] [--chaos]

``--chaos`` (issue #11): every fault point is a device SIGKILL, a cloud SIGKILL or a Redis kill -9 and
restart (AOF), each kind once per round of three in a random order, and the middle one restarts the
embedded broker empty on its port, recreates the topics and replays the tail (every sample without a result yet). A sample applied but whose result sat
unread in the broker's memory comes back as a duplicate: the device dead-letters it and the report counts
it as "lost with the broker", apart from lost. Recovery is reported per fault kind, and the final policy
state is checked for its invariants (t = samples applied once, Σ n_i + expired = t, no pending pull:
pulls whose feedback was lost with the broker expire after ``--pending-timeout``). An equal-state
comparison with an uninterrupted run is not made: with two partitions, offload feedback and the online α,
the state depends on the interleaving, not only on the stream.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from stream.config import Topics


def _rss_mb(pid: int) -> float:
    import psutil
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--kill-every", type=int, default=10_000)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: a small random model)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pending-timeout", type=float, default=10.0,
                    help="the device's pending timeout (s): pulls whose feedback was lost expire after it")
    ap.add_argument("--chaos", action="store_true", help="also Redis kill -9 and one empty broker restart")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default artifacts/bench_soak[_chaos].json)")
    args = ap.parse_args(argv)
    args.out = args.out or Path("artifacts/bench_soak_chaos.json" if args.chaos else "artifacts/bench_soak.json")

    from kafka import TopicPartition

    from producers.replay import replay, single
    from stream import kafka as K
    from stream import messages
    from stream.infra import Broker, RedisServer
    from stream.model import MultiExitModel

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="exitflow-soak-"))
    model_dir = args.model
    if model_dir is None:
        model_dir = work / "model"
        MultiExitModel.from_backbone("random:L=4,H=64,A=2,I=128", 2, seed=0).save(model_dir)
    prefix = "soak."
    topics = Topics(prefix)
    with Broker(log_path=work / "broker.log") as broker, RedisServer(data_dir=work / "redis") as redis:
        K.create_topics(broker.bootstrap, topics.all(), partitions=2)

        def start(stage: str) -> subprocess.Popen:
            cmd = [sys.executable, "-m", "stream.cli", "worker", stage, "--model", str(model_dir), "--bootstrap",
                   broker.bootstrap, "--redis-url", redis.url, "--prefix", prefix, "--batch-size",
                   str(args.batch_size), "--max-len", "64", "--policy", "splitee", "--set", "alpha=0.6"]
            if stage == "device":
                cmd += ["--pending-timeout", str(args.pending_timeout)]
            return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / f"{stage}.log", "ab"),
                                    env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)

        def open_reader():
            cons = K.consumer(broker.bootstrap)
            parts = [TopicPartition(topics.results, p) for p in range(2)]
            cons.assign(parts)
            cons.seek_to_beginning(*parts)
            return cons

        def replay_tail():
            """Send again every sample of the stream that has no result yet (the broker lost them)."""
            from producers.replay import iter_samples
            producer = K.producer(broker.bootstrap)
            n = 0
            for sample, _ in iter_samples(scenario, args.samples):
                if sample["id"] not in seen:
                    sample["ts"] = time.time()
                    producer.send(topics.samples, key=sample["id"].encode(), value=messages.encode("sample", sample))
                    n += 1
            producer.flush()
            producer.close()
            return n

        procs = {"device": start("device"), "cloud": start("cloud")}
        born = {stage: time.monotonic() for stage in procs}
        memory = {stage: {"start_mb": None, "end_mb": None} for stage in procs}
        scenario = single("sst2", "train", args.samples, True, args.seed, loop=True)
        replay(scenario, broker.bootstrap, topics, args.samples, progress=False)
        reader = open_reader()
        seen: Counter = Counter()
        broker_fault_at = (args.samples // args.kill_every // 2) * args.kill_every if args.chaos else None
        tail_replayed = 0
        kills, recoveries = [], []
        kinds, cycle = ["device", "cloud"] + (["redis"] if args.chaos else []), []
        next_kill = args.kill_every
        pending_kill: tuple[str, float, int] | None = None
        started = time.monotonic()
        first_ts = last_ts = None
        progress_at, count_at = time.monotonic(), 0
        while len(seen) < args.samples and time.monotonic() - started < 4 * 3600:
            if len(seen) != count_at:
                progress_at, count_at = time.monotonic(), len(seen)
            elif time.monotonic() - progress_at > 60:   # the rest will not come (lost with the broker)
                print(f"\nsoak: no new result for 60 s at {len(seen)}; stopping")
                break
            for records in reader.poll(timeout_ms=500, max_records=5000).values():
                for r in records:
                    msg = messages.decode("result", r.value)
                    seen[msg["id"]] += 1
                    if pending_kill and pending_kill[0] in ("", msg["stage"]) and msg["ts"] > pending_kill[3]:
                        recoveries.append({"kind": kills[-1]["kind"], "s": time.monotonic() - pending_kill[1]})
                        pending_kill = None
                    first_ts = msg["ts_in"] if first_ts is None else min(first_ts, msg["ts_in"])
                    last_ts = msg["ts"] if last_ts is None else max(last_ts, msg["ts"])
            for stage, proc in procs.items():
                # "start" = once the (re)started worker has loaded its model and run for a few seconds
                if memory[stage]["start_mb"] is None and time.monotonic() - born[stage] > 8:
                    memory[stage]["start_mb"] = _rss_mb(proc.pid)
            if len(seen) >= next_kill and pending_kill is None and len(seen) < args.samples - 1000:
                if not cycle:   # every kind once per round, in a random order: each kind is sure to occur
                    cycle = rng.sample(kinds, len(kinds))
                kind = "broker" if next_kill == broker_fault_at else cycle.pop()
                t0 = time.monotonic()
                if kind == "redis":
                    redis.kill()
                    time.sleep(1.0)
                    redis.start()
                elif kind == "broker":
                    reader.close()
                    broker.kill()
                    time.sleep(1.0)
                    broker.start()
                    K.create_topics(broker.bootstrap, topics.all(), partitions=2)
                    reader = open_reader()
                    tail_replayed = replay_tail()
                else:
                    os.killpg(procs[kind].pid, signal.SIGKILL)
                    procs[kind].wait()
                    procs[kind] = start(kind)
                    born[kind] = time.monotonic()
                    memory[kind]["start_mb"] = None  # the new process's memory is measured again
                kills.append({"kind": kind, "at_results": len(seen)})
                # recovery: the fault → the next result (of the killed stage, for a worker kill)
                pending_kill = (kind if kind in procs else "", t0, len(seen), time.time())
                next_kill += args.kill_every
            sys.stdout.write(f"\rsoak: {len(seen)}/{args.samples} results, {len(kills)} kills")
            sys.stdout.flush()
        print()
        time.sleep(3)
        for records in reader.poll(timeout_ms=2000, max_records=50000).values():
            for r in records:
                seen[messages.decode("result", r.value)["id"]] += 1
        if args.chaos:      # pulls whose feedback the broker lost expire after the pending timeout
            from policies.control import PolicyControl as _Control
            from stream.checkpoint import Checkpointer as _Checkpointer
            client, until = redis.client(), time.monotonic() + args.pending_timeout + 45
            while time.monotonic() < until:
                left = sum(v for ns in _Control(client).namespaces()
                           for k, v in _Checkpointer(client, "x").state(ns).items() if k[:1] == "p" and k[1:].isdigit())
                if not left:
                    break
                time.sleep(1.0)
        lost_with_broker = 0
        if tail_replayed:   # replayed samples applied before the restart: dead-lettered as duplicates, no result
            from producers.replay import iter_samples
            missing = {sample["id"] for sample, _ in iter_samples(scenario, args.samples)} - set(seen)
            dead = {r.key.decode() for r in K.read_all(broker.bootstrap, topics.dlq)
                    if r.key and b"duplicate sample id" in r.value}
            lost_with_broker = len(missing & dead)
        for stage, proc in procs.items():
            memory[stage]["end_mb"] = _rss_mb(proc.pid)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        reader.close()
        from policies.control import PolicyControl
        from stream.checkpoint import Checkpointer
        client = redis.client()
        states = {ns: Checkpointer(client, "x").state(ns) for ns in PolicyControl(client).namespaces()}
        expired = Checkpointer(client, "x").expired()
    by_kind: dict[str, list[float]] = {}
    for rec in recoveries:
        by_kind.setdefault(rec["kind"], []).append(round(rec["s"], 1))
    invariants = {ns: {"t": st.get("t"), "sum_n": sum(v for k, v in st.items() if k[:1] == "n" and k[1:].isdigit()),
                       "pending": sum(v for k, v in st.items() if k[:1] == "p" and k[1:].isdigit()),
                       "expired": expired.get(ns, 0)}
                  for ns, st in states.items()}
    result = {
        "samples": args.samples, "results": len(seen),
        "lost": args.samples - len(seen) - lost_with_broker, "lost_with_broker": lost_with_broker,
        "tail_replayed": tail_replayed,
        "duplicated_results": sum(c - 1 for c in seen.values()), "kills": kills,
        "recovery_s": by_kind, "max_recovery_s": max((r["s"] for r in recoveries), default=None),
        "state_invariants": invariants,
        "samples_per_s": len(seen) / (last_ts - first_ts) if first_ts and last_ts else None,
        "memory_mb": memory, "model": str(model_dir), "logs": str(work),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("kills", "recovery_s")}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["lost"] == 0 and result["duplicated_results"] == 0 else 1
