"""Throughput of the default model: a full forward and the first k layers (k = 1..L), batch 1 and 32.

Inputs are real IMDb test reviews (shuffled with seed 0) truncated to --max-len tokens (128 by
default; nearly every review is longer, so batches are full-length). A prefix of k layers is
``start`` + layers 1..k with every exit evaluated, i.e. what the device stage does for a sample
that exits at layer k. Also re-measures how much a float16 round trip of the hidden state moves the
exit probabilities (SST-2 dev). Prints a table and writes artifacts/bench_model.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def _time(fn, batches, repeats: int) -> float:
    """Best-of-``repeats`` wall time of running ``fn`` over all ``batches``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        best = min(best, time.perf_counter() - start)
    return best


def fp16_round_trip(model, ds, max_len: int, batch_size: int = 64) -> dict:
    """Max abs exit-probability change when the hidden state after layer k travels as float16, k = 1..L-1."""
    import torch

    from stream.train import _batch, _eval_batches

    layers = model.num_layers
    worst = [0.0] * (layers - 1)
    flips = 0
    with torch.inference_mode():
        for idx in _eval_batches(model, ds, max_len, batch_size):
            hidden, mask = model.start(_batch(model, ds, idx, max_len))
            _, exact = model.run(hidden, mask, 0, layers)
            for k in range(1, layers):
                hidden, _ = model.run(hidden, mask, k - 1, k, exits=[])
                _, resumed = model.run(hidden.half(), mask, k, layers)
                worst[k - 1] = max(worst[k - 1], max((resumed[j] - exact[j]).abs().max().item() for j in resumed))
                flips += int((resumed[layers].argmax(-1) != exact[layers].argmax(-1)).sum())
    return {"dataset": f"{ds.name}/{ds.split}", "samples": len(ds), "max_abs_prob_diff_by_split_layer":
            {k: round(d, 6) for k, d in enumerate(worst, start=1)}, "final_exit_prediction_flips": flips}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory (default: the default model; if it is not "
                        "prepared, the default backbone with untrained heads, which runs at the same speed)")
    parser.add_argument("--max-len", type=int, default=128, help="tokens per input")
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--samples", type=int, default=128, help="samples timed per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-fp16", action="store_true", help="skip the float16 round-trip check on SST-2 dev")
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench_model.json"), help="JSON results")
    args = parser.parse_args(argv)

    import torch

    from stream import datasets
    from stream.config import default_model_dir
    from stream.model import MultiExitModel

    torch.set_num_threads(args.threads)
    path = args.model or default_model_dir()
    if (path / "model.safetensors").is_file():
        model, source = MultiExitModel.load(path), str(path)
    else:
        model, source = MultiExitModel.from_backbone("default", 2), "default backbone, untrained heads"
    texts = datasets.shuffle_limit(datasets.load("imdb"), shuffle=True, seed=0, limit=args.samples).texts
    layers = model.num_layers
    rows = []
    with torch.inference_mode():
        for size in (int(s) for s in args.batch_sizes.split(",")):
            batches = [model.tokenize(texts[i:i + size], max_len=args.max_len) for i in range(0, len(texts), size)]
            tokens = float(sum(b["attention_mask"].sum() for b in batches)) / len(texts)

            def prefix(batch, k):
                hidden, mask = model.start(batch)
                return model.run(hidden, mask, 0, k, exits="each")

            _time(lambda b: prefix(b, layers), batches[:2], 1)  # warm-up
            times = {k: _time(lambda b, k=k: prefix(b, k), batches, args.repeats) for k in range(1, layers + 1)}
            full = times[layers]
            for k in range(1, layers + 1):
                rows.append({"batch_size": size, "layers": k, "samples_per_s": round(len(texts) / times[k], 1),
                             "ms_per_sample": round(1000 * times[k] / len(texts), 3),
                             "share_of_full": round(times[k] / full, 3), "mean_tokens": round(tokens, 1)})

    print(f"model: {source}; inputs: {len(texts)} IMDb reviews truncated to {args.max_len} tokens; "
          f"{args.threads} threads; best of {args.repeats}")
    print(f"{'batch':>5} {'layers':>6} {'samples/s':>10} {'ms/sample':>10} {'share of full':>14}")
    for r in rows:
        label = f"{r['layers']}" + (" (full)" if r["layers"] == layers else "")
        print(f"{r['batch_size']:>5} {label:>6} {r['samples_per_s']:>10.1f} {r['ms_per_sample']:>10.2f} "
              f"{r['share_of_full']:>14.3f}")
    big = max(r["batch_size"] for r in rows)
    layer_ms = next(r["ms_per_sample"] for r in rows if r["batch_size"] == big and r["layers"] == layers) / layers
    print(f"one device layer: {layer_ms:.2f} ms per sample (full pass at batch {big} / {layers} layers; "
          f"`--layer-ms` of `--link`)")
    fp16 = None
    if not args.no_fp16:
        fp16 = fp16_round_trip(model, datasets.load("sst2", "dev"), args.max_len)
        print(f"float16 hidden-state round trip on {fp16['dataset']} ({fp16['samples']} samples): max abs exit-"
              f"probability change by split layer {fp16['max_abs_prob_diff_by_split_layer']}, "
              f"{fp16['final_exit_prediction_flips']} final-exit predictions changed")
    result = {"bench": "model", "model": source, "num_layers": layers, "inputs": "imdb test, shuffled seed 0",
              "max_len": args.max_len, "samples": len(texts), "threads": args.threads, "repeats": args.repeats,
              "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows, "layer_ms": round(layer_ms, 3),
              "fp16_round_trip": fp16}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
