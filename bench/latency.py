"""End-to-end latency of the live pipeline under paced streams at fractions of its measured capacity.

One live pipeline (embedded broker + Redis, a device and a cloud worker, one torch thread each):
capacity = samples/s of an unpaced burst of ``--capacity-samples`` IMDb reviews; then, for every load
in ``--loads``, a stream paced at load × capacity for ``--seconds``, the first ``--warmup`` s of it
left out. Latency = replay produce → the result read on ``results``; p50/p95/p99 overall and split by
stage (queue before the device, device compute, the Kafka hop to the cloud, cloud compute, result
publish; see :func:`bench.live.breakdown`).

    python -m bench latency [--loads 0.25,0.5,0.75] [--seconds 40] [--json artifacts/bench_latency.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.live import STAGES, LivePipeline, breakdown, percentiles, setup, stream_slice


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench latency", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--dataset", default="imdb")
    ap.add_argument("--loads", default="0.25,0.5,0.75", help="fractions of the measured capacity")
    ap.add_argument("--seconds", type=float, default=40.0, help="length of each paced stream")
    ap.add_argument("--warmup", type=float, default=8.0, help="seconds of each paced stream left out")
    ap.add_argument("--capacity-samples", type=int, default=400)
    ap.add_argument("--capacity", type=float, default=None, help="samples/s, instead of measuring it")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--policy", default="splitee")
    ap.add_argument("--set", action="append", default=[], help="policy setting KEY=VALUE (default: the make-run "
                    "splitee, α calibrated on SST-2 dev)")
    ap.add_argument("--worker-arg", action="append", default=[], help="extra argument for both workers")
    ap.add_argument("--json", type=Path, default=Path("artifacts/bench_latency.json"), dest="out")
    args = ap.parse_args(argv)

    from policies.control import ActiveSpec

    model_dir, params = setup("latency", args.model, args.set, args.policy)
    if model_dir is None:
        return 1
    spec = ActiveSpec(args.policy, params, "splitee")
    loads = [float(x) for x in args.loads.split(",")]
    rows = []
    with LivePipeline(model_dir, spec, batch_size=args.batch_size, max_len=args.max_len,
                      worker_args=tuple(args.worker_arg)) as live:
        live.warm()
        capacity = args.capacity
        if capacity is None:
            started = time.time()
            got = live.run(stream_slice(args.dataset, 0, args.capacity_samples), args.capacity_samples)
            capacity = args.capacity_samples / (max(a for _, a in got) - started)
        print(f"capacity: {capacity:.1f} samples/s ({args.dataset}, batch {args.batch_size}, {spec.name})")
        start = args.capacity_samples
        for load in loads:
            rate = load * capacity
            n = max(20, int(rate * args.seconds))
            got = live.run(stream_slice(args.dataset, start, n, rate), n)
            start += n
            first = min(r["ts_in"] for r, _ in got)
            kept = [(r, a) for r, a in got if r["ts_in"] >= first + args.warmup]
            parts = [breakdown(r, a) for r, a in kept]
            row = {"load": load, "rate": rate, "samples": len(kept),
                   **{f"{k}_ms": v for k, v in percentiles(p["total"] for p in parts).items()},
                   "offload_rate": sum(r["tier"] != "device" for r, _ in kept) / max(1, len(kept)),
                   "stages": {s: percentiles(p[s] for p in parts if s in p) for s in STAGES}}
            rows.append(row)
            stages = "  ".join(f"{s} {row['stages'][s]['p50']:.0f}/{row['stages'][s]['p99']:.0f}" for s in STAGES)
            print(f"load {load:.2f} ({rate:.1f}/s, {len(kept)} samples): p50 {row['p50_ms']:.0f} ms, "
                  f"p95 {row['p95_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms | p50/p99 ms: {stages}", flush=True)
    result = {"dataset": args.dataset, "policy": spec.name, "params": spec.params, "batch_size": args.batch_size,
              "max_len": args.max_len, "capacity_samples_per_s": capacity, "worker_args": args.worker_arg,
              "loads": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
