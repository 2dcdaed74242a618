"""A live pipeline for benchmarks: embedded broker + Redis, a device and a cloud worker process, results
read as they arrive (with their arrival time), and the latency of each result split by stage.

Used by ``bench latency`` and ``bench speedup``; not a bench itself (no ``main``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stream.config import Topics

#: The stages a result's end-to-end latency is split into (ms), see :func:`breakdown`.
STAGES = ("queue", "device", "hop", "remote", "publish")


def breakdown(result: dict, arrived: float) -> dict[str, float]:
    """One result's latency (ms) by stage, from the timestamps the workers write.

    queue: replay produce → the device's batch began; device: that batch's compute; hop: device batch
    done → the remote batch began (Redis commit, produce, fetch, the cloud's own queue); remote: the
    remote batch's compute; publish: the last batch done → the result seen on ``results`` (Redis commit,
    produce with acks, the reader's fetch). ``total`` = arrival − produce.
    """
    ts_in, ts_dev = result["ts_in"], result.get("ts_device")
    lat = result["latency_ms"]
    out = {"total": (arrived - ts_in) * 1000.0}
    if ts_dev is None:
        return out
    out["queue"] = (ts_dev - ts_in) * 1000.0
    out["device"] = lat["device"] if result["layers"]["device"] or result["tier"] == "device" else 0.0
    done = ts_dev + lat["device"] / 1000.0
    if result["tier"] != "device" and result.get("ts_remote") is not None:
        out["hop"] = (result["ts_remote"] - done) * 1000.0
        out["remote"] = lat["remote"]
        done = result["ts_remote"] + lat["remote"] / 1000.0
    else:
        out["hop"] = out["remote"] = 0.0
    out["publish"] = (arrived - done) * 1000.0
    return out


def setup(bench: str, model: Path | None, sets: list[str], policy: str = "splitee") -> tuple[Path | None, dict]:
    """The model directory (None, said on stderr, when it is not prepared) and the policy's settings:
    ``--set`` ones, else for splitee the start α calibrated by ``make run`` (SST-2 dev), when present."""
    import sys

    from policies.registry import parse_sets
    from stream.config import default_model_dir, home
    model_dir = model or default_model_dir()
    if not (model_dir / "exitflow_model.json").is_file():
        print(f"bench {bench}: no model at {model_dir}; run `exitflow model prepare` first", file=sys.stderr)
        return None, {}
    params = parse_sets(sets)
    calibration = home() / "calibration" / "splitee.json"
    if not params and policy == "splitee" and calibration.is_file():
        params = {"calibration": str(calibration)}
    return model_dir, params


def stream_slice(dataset: str, start: int, n: int, rate: float = 0.0):
    """Samples start..start+n of one shuffled order of ``dataset`` (seed 0): slices never share an id,
    which the device would dead-letter as a duplicate."""
    from producers.replay import Scenario, Segment
    return Scenario(f"{dataset}[{start}:{start + n}]", (Segment(dataset, None, n, True, 0, offset=start),), rate,
                    False)


def percentiles(values, qs=(50, 95, 99)) -> dict[str, float]:
    arr = np.asarray(list(values), dtype=float)
    if not arr.size:
        return {f"p{q}": float("nan") for q in qs}
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


@dataclass
class Collector:
    """Reads ``results`` from its end in a thread; keeps each result with its arrival time."""

    bootstrap: str
    topic: str
    results: list[tuple[dict, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(30)

    def _run(self) -> None:
        from kafka import TopicPartition

        from stream import kafka as K
        from stream import messages
        cons = K.consumer(self.bootstrap, fetch_max_wait_ms=5)
        tps = [TopicPartition(self.topic, p) for p in sorted(cons.partitions_for_topic(self.topic) or ())]
        cons.assign(tps)
        cons.seek_to_end(*tps)
        for tp in tps:
            cons.position(tp)
        self._ready.set()
        try:
            while not self._stop.is_set():
                for records in cons.poll(timeout_ms=100, max_records=2000).values():
                    now = time.time()
                    self.results.extend((messages.decode("result", r.value), now) for r in records)
        finally:
            cons.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


class LivePipeline:
    """Broker, Redis, one device and one cloud worker (``threads`` torch threads each), a policy made active."""

    def __init__(self, model_dir: Path, spec, *, batch_size: int = 32, max_len: int = 128, partitions: int = 1,
                 logs: Path = Path("artifacts/bench_live_logs"), worker_args: tuple[str, ...] = (),
                 threads: int = 1, cloud_threads: int | None = None, clouds: int = 1) -> None:
        self.model_dir, self.spec, self.batch_size, self.max_len = model_dir, spec, batch_size, max_len
        self.logs, self.worker_args = logs, list(worker_args)
        self.threads, self.cloud_threads, self.clouds = threads, cloud_threads, clouds
        self.partitions = max(partitions, clouds)
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "LivePipeline":
        import redis as redis_lib

        from policies.control import PolicyControl
        from stream import kafka as K
        from stream.infra import Broker, RedisServer
        self.logs.mkdir(parents=True, exist_ok=True)
        self.broker, self.redis = Broker().start(), RedisServer().start()
        self.topics = Topics(f"live{int(time.time() * 1000) % 10**8}.")
        K.create_topics(self.broker.bootstrap, self.topics.all(), partitions=self.partitions)
        info = json.loads((self.model_dir / "exitflow_model.json").read_text())
        layers = info["num_layers"]
        PolicyControl(redis_lib.Redis.from_url(self.redis.url)).use(self.spec.name, self.spec.params,
                                                                   cost=self.spec.cost, num_layers=layers,
                                                                   num_classes=info["num_classes"])
        cmd = [sys.executable, "-m", "stream.cli", "worker"]
        common = ["--model", str(self.model_dir), "--bootstrap", self.broker.bootstrap, "--redis-url",
                  self.redis.url, "--prefix", self.topics.prefix, "--batch-size", str(self.batch_size),
                  "--max-len", str(self.max_len), "--policy", self.spec.name, *self.worker_args]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "TOKENIZERS_PARALLELISM": "false"}
        for stage in ["device"] + ["cloud"] * self.clouds:
            threads = str(self.cloud_threads if stage == "cloud" and self.cloud_threads else self.threads)
            self.procs.append(subprocess.Popen(cmd + [stage] + common + ["--threads", threads],
                                               env={**env, "OMP_NUM_THREADS": threads}, stdout=subprocess.DEVNULL,
                                               stderr=open(self.logs / f"{stage}{len(self.procs)}.log", "wb")))
        self.collector = Collector(self.broker.bootstrap, self.topics.results)
        return self

    def warm(self) -> None:
        """64 SST-2 dev samples through both workers before any clock starts (model loaded, leases held)."""
        from producers.replay import single
        self.run(single("sst2", "dev", 64, True, 1), 64, timeout=300)

    def send(self, scenario, limit: int | None = None) -> int:
        from producers.replay import replay
        return replay(scenario, self.broker.bootstrap, self.topics, limit, progress=False)

    def run(self, scenario, n: int, timeout: float = 1800.0) -> list[tuple[dict, float]]:
        """Replay ``scenario`` (n samples) and wait for all of their results; returns only theirs."""
        before = len(self.collector.results)
        seen_before = {r["id"] for r, _ in self.collector.results}
        self.send(scenario, n)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, (proc, stage) in enumerate(zip(self.procs, ["device"] + ["cloud"] * self.clouds)):
                if proc.poll() is not None:
                    tail = (self.logs / f"{stage}{i}.log").read_text(errors="replace").strip().splitlines()[-3:]
                    raise RuntimeError(f"the {stage} worker exited with code {proc.returncode}: " + " | ".join(tail))
            fresh = self.collector.results[before:]
            if len({r["id"] for r, _ in fresh if r["id"] not in seen_before}) >= n:
                break
            time.sleep(0.2)
        else:
            raise TimeoutError(f"only {len(self.collector.results) - before} of {n} results after {timeout:.0f}s "
                               f"(worker logs in {self.logs})")
        return self.collector.results[before:]

    def __exit__(self, *exc) -> None:
        self.collector.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.stop()
        self.broker.stop()
