"""What early exit buys in speed: live ``splitee`` vs live ``final-exit`` vs the raw model, on one stream.

Three runs on the same IMDb reviews (shuffled, seed 0), each live run in a fresh pipeline (embedded
broker + Redis, a device and a cloud worker, one torch thread each, warmed up first):

1. live ``final-exit``: every sample runs all L layers on the device;
2. live ``splitee`` with the SplitEE issue's defaults (α learned online from the SST-2-dev start, the
   preset's depth-scaled offload cost o = 5λ·L/12);
3. the raw model, in process with two torch threads, running exactly the layers live ``splitee`` ran
   for each sample (device layers, then the rest from the float16 hidden state for an offload),
   batched by depth: the most the same layer mix allows, with no Kafka, Redis or serialisation.

samples/s = N / (last result read − first sample sent). ``splitee_vs_final_exit`` = (2) / (1);
``pipeline_vs_raw`` = (2) / (3); ``layer_fraction`` = mean layers run / L, whose inverse bounds
the speed-up early exit can give.

    python -m bench speedup [--samples 1000] [--json artifacts/bench_speedup.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from bench.live import LivePipeline, setup, stream_slice


def live_run(model_dir: Path, spec, texts_scenario, n: int, batch_size: int, max_len: int, logs: Path,
             threads: int = 1, cloud_threads: int | None = None, clouds: int = 1):
    with LivePipeline(model_dir, spec, batch_size=batch_size, max_len=max_len, logs=logs, threads=threads,
                      cloud_threads=cloud_threads, clouds=clouds) as live:
        live.warm()
        started = time.time()
        got = live.run(texts_scenario, n)
    fresh = {r["id"]: (r, a) for r, a in got}
    last = max(a for _, a in fresh.values())
    results = [r for r, _ in fresh.values()]
    return n / (last - started), results, busy(results, last - started)


def busy(results: list[dict], wall_s: float) -> dict[str, float]:
    """Share of the wall time each stage spent computing batches (a batch counted once, by its start)."""
    device = {r["ts_device"]: r["latency_ms"]["device"] for r in results if r.get("ts_device") is not None}
    remote = {r["ts_remote"]: r["latency_ms"]["remote"] for r in results if r.get("ts_remote") is not None}
    return {"device": sum(device.values()) / 1000.0 / wall_s, "cloud": sum(remote.values()) / 1000.0 / wall_s,
            "device_batches": len(device), "cloud_batches": len(remote)}


def raw_run(model, texts: list[str], depths: list[tuple[int, int]], batch_size: int, max_len: int) -> float:
    """Samples/s of the model alone running ``depths[i]`` = (device layers, total layers) for sample i."""
    import torch
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, d in enumerate(depths):
        groups[d].append(i)
    started = time.perf_counter()
    with torch.inference_mode():
        for (device, total), idx in sorted(groups.items()):
            for lo in range(0, len(idx), batch_size):
                batch = model.tokenize([texts[i] for i in idx[lo:lo + batch_size]], max_len=max_len)
                model.embed(batch)                                   # the device computes it for every sample
                hidden, mask = model.start(batch)
                if device:
                    hidden, _ = model.run(hidden, mask, 0, device, "last")
                if total > device:
                    model.run(hidden.half().float(), mask, device, total, "last")
    return len(texts) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench speedup", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--dataset", default="imdb")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    ap.add_argument("--clouds", type=int, default=1, help="cloud worker processes (inputs get as many partitions)")
    ap.add_argument("--cloud-threads", type=int, default=None, help="torch threads of the cloud worker "
                    "(default: --threads)")
    ap.add_argument("--set", action="append", default=[], help="splitee setting KEY=VALUE (default: the make-run "
                    "splitee, α calibrated on SST-2 dev, then learned online)")
    ap.add_argument("--json", type=Path, default=Path("artifacts/bench_speedup.json"), dest="out")
    args = ap.parse_args(argv)

    import torch

    from policies.control import ActiveSpec
    from producers.replay import iter_samples
    from stream.model import MultiExitModel

    model_dir, params = setup("speedup", args.model, args.set)
    if model_dir is None:
        return 1
    stream = stream_slice(args.dataset, 0, args.samples)
    texts = {s["id"]: s["text"] for s, _ in iter_samples(stream)}
    logs = Path("artifacts/bench_speedup_logs")

    final_sps, _, final_busy = live_run(model_dir, ActiveSpec("final-exit", {}, "splitee"), stream, args.samples,
                            args.batch_size, args.max_len, logs / "final-exit", args.threads)
    print(f"live final-exit: {final_sps:.1f} samples/s (busy: device {final_busy['device']:.2f})", flush=True)
    split_sps, results, split_busy = live_run(model_dir, ActiveSpec("splitee", params, "splitee"), stream, args.samples,
                                  args.batch_size, args.max_len, logs / "splitee", args.threads,
                                              args.cloud_threads, args.clouds)
    print(f"live splitee: {split_sps:.1f} samples/s (busy: device {split_busy['device']:.2f}, "
          f"cloud {split_busy['cloud']:.2f})", flush=True)

    model = MultiExitModel.load(model_dir)
    L = model.num_layers
    ids = [r["id"] for r in results]
    depths = [(r["layers"]["device"], r["layers"]["device"] + r["layers"]["edge"] + r["layers"]["cloud"])
              for r in results]
    torch.set_num_threads(2)
    raw_run(model, [texts[i] for i in ids[:64]], depths[:64], args.batch_size, args.max_len)   # warm-up
    raw_sps = raw_run(model, [texts[i] for i in ids], depths, args.batch_size, args.max_len)
    raw_full = raw_run(model, [texts[i] for i in ids], [(L, L)] * len(ids), args.batch_size, args.max_len)
    fraction = sum(t for _, t in depths) / (len(depths) * L)
    offload = sum(r["tier"] != "device" for r in results) / len(results)
    result = {"dataset": args.dataset, "samples": args.samples, "batch_size": args.batch_size,
              "max_len": args.max_len, "threads_per_worker": args.threads, "cloud_threads": args.cloud_threads, "clouds": args.clouds, "splitee_params": params,
              "final_exit_samples_per_s": final_sps, "splitee_samples_per_s": split_sps,
              "raw_same_mix_samples_per_s": raw_sps, "raw_full_samples_per_s": raw_full,
              "splitee_vs_final_exit": split_sps / final_sps, "pipeline_vs_raw": split_sps / raw_sps,
              "final_exit_vs_raw_full": final_sps / raw_full,
              "busy": {"final-exit": final_busy, "splitee": split_busy}, "layer_fraction": fraction, "offload_rate": offload,
              "cost_ratio": sum(r["cost"]["total"] for r in results) / (len(results) * L)}
    print(f"raw model, same layer mix: {raw_sps:.1f} samples/s; raw full pass: {raw_full:.1f} samples/s\n"
          f"splitee / final-exit = {result['splitee_vs_final_exit']:.2f}x (layers run {fraction:.2f} of L, "
          f"offload {offload:.2f}); pipeline / raw (same mix) = {result['pipeline_vs_raw']:.2f}; "
          f"final-exit pipeline / raw full = {result['final_exit_vs_raw_full']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
