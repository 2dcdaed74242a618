"""Benchmarks of the monitoring layer.

``python -m bench.monitoring metrics``: µs of metric updates per sample, against a device worker's
per-sample time (``--sample-ms``, or measured on a MiniLM-sized encoder layer with torch).

``python -m bench.monitoring drift``: the drift detectors on a replay of confidence matrices, e.g.
SST-2 dev → IMDb → AG News: detection delay per boundary and false alarms per 10k samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: bench/ must not shadow the monitoring package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _record(i: int) -> dict:
    offloaded = i % 5 == 0
    return {"id": f"s{i}", "source": "sst2", "seq": i, "prediction": i % 2, "confidence": 0.93,
            "tier": "cloud" if offloaded else "device", "exit_layer": 6 if offloaded else 1 + i % 3,
            "layers": {"device": 2, "edge": 0, "cloud": 4 if offloaded else 0}, "exits_evaluated": 2,
            "decision": {"layer": 2, "confidence": 0.71 + (i % 29) / 100},
            "cost": {"device": 2.0, "edge": 0.0, "offload": 5.0 if offloaded else 0.0, "fee": 0.0,
                     "total": 7.0 if offloaded else 2.0},
            "bytes_offloaded": 12288 if offloaded else 0, "policy": {"name": "splitee", "version": 1, "ns": "x"},
            "latency_ms": {"device": 3.0, "remote": 4.0, "total": 9.0}, "ts": 0.0, "ts_in": 0.0,
            "embedding_distance": 1.5, "stage": "device"}


def metrics_cost_us(n: int = 50_000, batch: int = 32) -> dict[str, float]:
    """µs per sample of what a worker reports: result + latency per sample, batch/state/lag per batch."""
    from prometheus_client import CollectorRegistry

    from monitoring.metrics import StageMetrics
    m = StageMetrics("device", CollectorRegistry())
    records = [_record(i) for i in range(1000)]
    for r in records:
        m.result(r)
    out = {}
    t0 = time.perf_counter()
    for i in range(n):
        m.result(records[i % 1000])
    out["result_us"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for i in range(n):
        m.latency(0.004)
    out["latency_us"] = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for i in range(n // batch):
        m.batch(batch)
        m.state_write(0.0008)
        m.lag("exitflow.samples", 0, i)
    out["per_batch_us"] = (time.perf_counter() - t0) / (n // batch) * 1e6
    out["per_sample_us"] = out["result_us"] + out["latency_us"] + out["per_batch_us"] / batch
    return out


def layer_ms_per_sample(seq: int = 32, batch: int = 32, repeats: int = 10) -> float:
    """ms per sample of one MiniLM-sized encoder layer (hidden 384, 12 heads, FF 1536) on this CPU."""
    import torch
    torch.set_num_threads(1)
    layer = torch.nn.TransformerEncoderLayer(384, 12, 1536, batch_first=True).eval()
    x = torch.randn(batch, seq, 384)
    with torch.inference_mode():
        layer(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            layer(x)
    return (time.perf_counter() - t0) / repeats / batch * 1e3


def cmd_metrics(args) -> int:
    cost = metrics_cost_us(args.samples)
    if args.sample_ms is not None:
        rows = [("given per-sample time", args.sample_ms)]
    else:
        layer = layer_ms_per_sample(args.seq)
        rows = [(f"exit after layer 1 (1 layer, seq {args.seq})", layer),
                (f"full device pass (6 layers, seq {args.seq})", 6 * layer)]
    print(f"metric updates per sample: {cost['per_sample_us']:.2f} µs "
          f"(result {cost['result_us']:.2f}, latency {cost['latency_us']:.2f}, "
          f"batch+state+lag {cost['per_batch_us']:.2f} per batch of 32)")
    print(f"{'device per-sample work':<40} {'ms':>8} {'overhead':>9}")
    for name, ms in rows:
        print(f"{name:<40} {ms:>8.3f} {100 * cost['per_sample_us'] / (ms * 1000):>8.2f}%")
    worst = max(100 * cost["per_sample_us"] / (ms * 1000) for _, ms in rows)
    print(f"target < 5%: {'met' if worst < 5 else 'NOT met'} (worst case {worst:.2f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps({"cost_us": cost, "work_ms": dict(rows), "worst_pct": worst}, indent=1))
    return 0 if worst < 5 else 1


def _find(directory: Path, *needles: str) -> Path | None:
    for path in sorted(directory.glob("*.npz")):
        name = path.name.lower().replace("-", "").replace("_", "")
        if all(n in name for n in needles):
            return path
    return None


def _segments(args) -> list[tuple[str, object]]:
    """(name, ConfidenceMatrix or synthetic tuple) per segment, in stream order."""
    from monitoring import drifteval
    if args.synthetic:
        spec = [("sst2-like", 0.93, 0.0, 872), ("imdb-like", 0.85, 0.7, 5000), ("agnews-like", 0.78, 1.5, 5000)]
        return [(name, drifteval.synthetic_segment(n, confidence=c, centre=centre, seed=k))
                for k, (name, c, centre, n) in enumerate(spec)]
    from stream.matrix import ConfidenceMatrix
    items = args.segment or []
    if not items:
        directory = Path(args.matrices).expanduser()
        found = [("sst2", _find(directory, "sst2", "dev")), ("imdb", _find(directory, "imdb")),
                 ("agnews", _find(directory, "agnews"))]
        items = [f"{name}={path}:{count}" for (name, path), count in zip(found, (0, 5000, 5000)) if path]
        if len(items) < 2:
            raise SystemExit(f"bench drift: need at least two matrices (SST-2 dev, IMDb, AG News) in {directory}; "
                             f"found {[str(p) for _, p in found if p]}. Use --segment NAME=PATH[:COUNT] or --synthetic.")
    out = []
    for item in items:
        name, _, rest = item.partition("=")
        path, _, count = rest.partition(":")
        matrix = ConfidenceMatrix.load(path)
        out.append((name, (matrix, int(count or 0))))
    return out


def _take(segment, count: int, seed: int):
    """Shuffle a segment (fixed seed) and keep ``count`` samples (0: all)."""
    import numpy as np
    if isinstance(segment, tuple) and len(segment) == 2:
        matrix, limit = segment
        probs, labels, emb = matrix.probs, matrix.labels, matrix.embeddings
        if labels is not None and labels.max() >= probs.shape[2]:
            labels = None  # a task with other classes (AG News under a binary model): no error signal
        count = limit
    else:
        probs, labels, emb = segment
    order = np.random.default_rng(seed).permutation(len(probs))
    if count:
        order = order[:count]
    pick = lambda a: None if a is None else a[order]  # noqa: E731
    return probs[order], pick(labels), pick(emb)


def _replay(segments, rep: int, args, params) -> tuple:
    """One seeded shuffle of every segment, replayed through the policy: (signals per segment, sources)."""
    from monitoring import drifteval
    parts, sources, reference = [], [], None
    for k, (name, seg) in enumerate(segments):
        probs, labels, emb = _take(seg, 0, seed=1000 * rep + k)
        if emb is not None and reference is None:  # DIMEE's centroids: the start of the first segment
            ref = slice(0, min(args.reference, len(probs)))
            reference = (emb[ref], probs[ref, -1].argmax(-1))
        parts.append(drifteval.signals_for(probs, labels, emb, reference, policy_name=args.policy,
                                           params=params, cost=args.cost))
        sources.append([name] * len(probs))
    return parts, sources


def cmd_drift(args) -> int:
    import numpy as np

    from monitoring import drifteval
    from monitoring.drift import DEFAULT_DETECTORS, kswin
    from policies.registry import parse_sets
    segments = _segments(args)
    params = parse_sets(args.set)
    detectors = dict(DEFAULT_DETECTORS)
    if args.kswin:
        for sig in ("confidence", "distance"):
            detectors[sig] = detectors[sig] + (kswin(),)
    names = [name for name, _ in segments]
    delays: dict[tuple[str, str], list[list]] = {}
    alarms: dict[tuple[str, str], list[int]] = {}   # [on the shifted stream, on stationary replays]
    n_shift = n_still = 0
    t0 = time.perf_counter()
    for rep in range(args.repeats):
        parts, sources = _replay(segments, rep, args, params)
        has = [{sig for sig in drifteval.SIGNALS if not np.isnan(getattr(p, sig)).all()} for p in parts]
        pairs = [(sig, spec.kind) for sig, group in detectors.items() for spec in group if any(sig in h for h in has)]
        # the stream with its shifts: delay at each boundary, detections away from them
        signals = drifteval.Signals.concat(parts)
        boundaries = [int(b) for b in np.cumsum([len(p) for p in parts])[:-1]]
        events = drifteval.detect(signals, detectors, sources=[s for src in sources for s in src])
        n_shift += len(signals)
        for sc in drifteval.score(events, boundaries, len(signals), args.tolerance, pairs):
            key = (sc.signal, sc.detector)
            row = delays.setdefault(key, [[] for _ in boundaries])
            for b, d in enumerate(sc.delays):
                if sc.signal in has[b + 1]:
                    row[b].append(d)
            alarms.setdefault(key, [0, 0])[0] += sc.false_alarms
        # every segment alone: nothing changes, so every detection is a false alarm
        for part in parts:
            n_still += len(part)
            for sc in drifteval.score(drifteval.detect(part, detectors), [], len(part), args.tolerance, pairs):
                alarms.setdefault((sc.signal, sc.detector), [0, 0])[1] += sc.false_alarms
    lengths = [len(p) for p in parts]
    print(f"stream: {' → '.join(f'{n} ({c})' for n, c in zip(names, lengths))}; policy {args.policy} "
          f"{params or ''}; {args.repeats} shuffles; tolerance {args.tolerance} samples; "
          f"{time.perf_counter() - t0:.1f}s")
    head = "".join(f"{'delay ' + names[b] + '→' + names[b + 1]:>22}" for b in range(len(segments) - 1))
    print(f"{'signal':<11}{'detector':<13}{head}{'FA/10k shifted':>16}{'FA/10k stationary':>19}")
    table = []
    order = lambda kv: (drifteval.SIGNALS.index(kv[0][0]), kv[0][1] == "any", kv[0][1])  # noqa: E731
    for (signal, detector), row in sorted(delays.items(), key=order):
        cells = []
        for found in row:
            hit = [d for d in found if d is not None]
            cells.append(f"{int(np.median(hit)) if hit else '-'} ({len(hit)}/{len(found)})" if found else "n/a")
        shift_fa, still_fa = (1e4 * x / n for x, n in zip(alarms[(signal, detector)], (n_shift, n_still)))
        print(f"{signal:<11}{detector:<13}" + "".join(f"{c:>22}" for c in cells) + f"{shift_fa:>16.2f}{still_fa:>19.2f}")
        table.append({"signal": signal, "detector": detector, "delays": row, "false_alarms_per_10k_shifted": shift_fa,
                      "false_alarms_per_10k_stationary": still_fa})
    print("delay: median samples from a boundary to the first detection (detected/shuffles; n/a: no such signal "
          "after it). FA shifted: detections not within the tolerance after a boundary; FA stationary: every "
          "detection on each segment replayed alone.")
    if args.json:
        Path(args.json).write_text(json.dumps({"segments": names, "lengths": lengths, "policy": args.policy,
                                               "params": params, "repeats": args.repeats, "tolerance": args.tolerance,
                                               "samples_shifted": n_shift, "samples_stationary": n_still,
                                               "rows": table}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.monitoring", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("metrics", help="µs of metric updates per sample vs a device worker's per-sample time")
    m.add_argument("--samples", type=int, default=50_000)
    m.add_argument("--sample-ms", type=float, help="device per-sample time in ms (default: measure a layer)")
    m.add_argument("--seq", type=int, default=32, help="sequence length for the measured layer")
    m.add_argument("--json", help="write the numbers here")
    m.set_defaults(func=cmd_metrics)
    d = sub.add_parser("drift", help="detection delay and false alarms on a replay of confidence matrices")
    d.add_argument("--matrices", default="~/.cache/exitflow/matrices", help="where to look for *.npz")
    d.add_argument("--segment", action="append", metavar="NAME=PATH[:COUNT]",
                   help="a segment of the stream, in order (repeat); COUNT samples after a seeded shuffle")
    d.add_argument("--synthetic", action="store_true", help="synthetic segments instead of matrices")
    d.add_argument("--policy", default="static-maxprob")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", default=None,
                   help="policy settings (default threshold=0.9 max_layer=3 for static-maxprob)")
    d.add_argument("--cost", default="splitee")
    d.add_argument("--repeats", type=int, default=5, help="seeded shuffles of every segment")
    d.add_argument("--tolerance", type=int, default=1000, help="a detection this many samples after a boundary counts")
    d.add_argument("--reference", type=int, default=300, help="samples whose class centroids define the distance")
    d.add_argument("--kswin", action="store_true", help="also run KSWIN on confidence and distance (slow)")
    d.add_argument("--json", help="write the table here")
    d.set_defaults(func=cmd_drift)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # `python -m bench` runs every bench with its defaults
        code = main(["metrics"])
        directory = Path(d.get_default("matrices")).expanduser()
        found = [p for p in (_find(directory, "sst2", "dev"), _find(directory, "imdb")) if p]
        if len(found) < 2:
            print(f"no SST-2 dev and IMDb confidence matrices in {directory}: drift on synthetic segments")
        return main(["drift"] + ([] if len(found) == 2 else ["--synthetic", "--repeats", "3"])) or code
    args = parser.parse_args(argv)
    if args.what == "drift" and args.set is None and args.policy == "static-maxprob":
        args.set = ["threshold=0.9", "max_layer=3"]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
