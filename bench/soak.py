"""Soak: a long stream through the embedded pipeline with random worker kills; nothing lost or doubled.

One device and one cloud worker (separate processes) consume N samples (SST-2 train phrases, looped);
every ~``kill_every`` results one of them, chosen at random, is SIGKILLed and restarted. Reports
throughput, each recovery time (kill → the first result written by the restarted stage), lost and
duplicated results, and the RSS of each worker 8 s after its (re)start and at the end. A small random model (``random:L=4,H=64``) is used
by default so the run measures the pipeline, not the transformer; pass --model for a real one.

    python -m bench soak [--samples 100000] [--kill-every 10000]
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
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench_soak.json"))
    args = ap.parse_args(argv)

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
            return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / f"{stage}.log", "ab"),
                                    env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)

        procs = {"device": start("device"), "cloud": start("cloud")}
        born = {stage: time.monotonic() for stage in procs}
        memory = {stage: {"start_mb": None, "end_mb": None} for stage in procs}
        replay(single("sst2", "train", args.samples, True, args.seed, loop=True), broker.bootstrap, topics,
               args.samples, progress=False)
        reader = K.consumer(broker.bootstrap)
        tps = [TopicPartition(topics.results, p) for p in range(2)]
        reader.assign(tps)
        reader.seek_to_beginning(*tps)
        seen: Counter = Counter()
        kills, recoveries = [], []
        next_kill = args.kill_every
        pending_kill: tuple[str, float, int] | None = None
        started = time.monotonic()
        first_ts = last_ts = None
        while len(seen) < args.samples and time.monotonic() - started < 4 * 3600:
            for records in reader.poll(timeout_ms=500, max_records=5000).values():
                for r in records:
                    msg = messages.decode("result", r.value)
                    seen[msg["id"]] += 1
                    if pending_kill and msg["stage"] == pending_kill[0] and msg["ts"] > pending_kill[3]:
                        recoveries.append(time.monotonic() - pending_kill[1])
                        pending_kill = None
                    first_ts = msg["ts_in"] if first_ts is None else min(first_ts, msg["ts_in"])
                    last_ts = msg["ts"] if last_ts is None else max(last_ts, msg["ts"])
            for stage, proc in procs.items():
                # "start" = once the (re)started worker has loaded its model and run for a few seconds
                if memory[stage]["start_mb"] is None and time.monotonic() - born[stage] > 8:
                    memory[stage]["start_mb"] = _rss_mb(proc.pid)
            if len(seen) >= next_kill and pending_kill is None and len(seen) < args.samples - 1000:
                stage = rng.choice(sorted(procs))
                os.killpg(procs[stage].pid, signal.SIGKILL)
                procs[stage].wait()
                procs[stage] = start(stage)
                born[stage] = time.monotonic()
                memory[stage]["start_mb"] = None  # the new process's memory is measured again
                kills.append({"stage": stage, "at_results": len(seen)})
                pending_kill = (stage, time.monotonic(), len(seen), time.time())
                next_kill += args.kill_every
            sys.stdout.write(f"\rsoak: {len(seen)}/{args.samples} results, {len(kills)} kills")
            sys.stdout.flush()
        print()
        time.sleep(3)
        for records in reader.poll(timeout_ms=2000, max_records=50000).values():
            for r in records:
                seen[messages.decode("result", r.value)["id"]] += 1
        for stage, proc in procs.items():
            memory[stage]["end_mb"] = _rss_mb(proc.pid)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        reader.close()
    result = {
        "samples": args.samples, "results": len(seen), "lost": args.samples - len(seen),
        "duplicated_results": sum(c - 1 for c in seen.values()), "kills": kills,
        "recovery_s": recoveries, "max_recovery_s": max(recoveries, default=None),
        "samples_per_s": len(seen) / (last_ts - first_ts) if first_ts and last_ts else None,
        "memory_mb": memory, "model": str(model_dir), "logs": str(work),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("kills", "recovery_s")}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["lost"] == 0 and result["duplicated_results"] == 0 else 1
