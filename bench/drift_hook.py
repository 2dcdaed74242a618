"""The device worker's drift hook, measured: false alarms on stationary streams and delay at the boundaries.

The hook watches the input embedding's distance to the nearest in-domain class centroid (the SST-2 dev
calibration matrix's, as the demo passes it). Embeddings need only the model's word embeddings (no layer
runs), so every file of a dataset is replayed, not a sample: they are computed once at the worker's
``--max-len`` and cached under ``$EXITFLOW_HOME/drift_hook/``.

* ``stationary``: each dataset shuffled ``--repeats`` times and replayed alone; a detection there is a
  false alarm (rate per 10k samples, over every replayed sample after the first warm-up);
* ``boundaries``: SST-2 dev (872) → IMDb (``--segment-size``) → AG News (``--segment-size``), each segment
  reshuffled per repeat; delay = samples from the boundary to the first detection after it.

* ``--scenario FILE``: where the hook fires on a shipped scenario, against its segments' starts.

``python -m bench drift_hook [--kind page_hinkley|adwin] [--threshold X] [--scenario FILE] [--json OUT]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

#: Datasets replayed as stationary streams: (name, split).
STATIONARY = (("sst2", "dev"), ("sst2", "train"), ("imdb", "test"), ("ag_news", "test"))


def embeddings(dataset: str, split: str, max_len: int = 128, model_dir: Path | None = None,
               batch: int = 256) -> np.ndarray:
    """Input embeddings of every sample of a dataset split, in file order (cached)."""
    import torch

    from stream import datasets
    from stream.config import default_model_dir, home
    from stream.model import MultiExitModel

    model_dir = Path(model_dir or default_model_dir())
    cache = home() / "drift_hook" / f"{model_dir.name}-{dataset}-{split}-{max_len}.npy"
    if cache.is_file():
        return np.load(cache)
    ds = datasets.load(dataset, split)
    model = MultiExitModel.load(model_dir)
    out = []
    with torch.inference_mode():
        for start in range(0, len(ds), batch):
            pairs = ds.text_pairs[start:start + batch] if ds.text_pairs is not None else None
            out.append(model.embed(model.tokenize(ds.texts[start:start + batch], pairs, max_len)).numpy())
    emb = np.concatenate(out).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, emb)
    return emb


def distances(emb: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The drift signal: each embedding's distance to its nearest centroid."""
    from monitoring.drift import reference_distance
    return np.asarray(reference_distance(emb, centroids), dtype=np.float64)


def detections(values: np.ndarray, settings) -> list[int]:
    """Positions (0-based) at which the hook's detector fires on ``values``."""
    from monitoring.drift import HookDetector
    det = HookDetector(settings)
    return [i for i, x in enumerate(values) if det.update(float(x))]


def stationary(signals: dict[str, np.ndarray], settings, repeats: int, seed: int) -> dict[str, dict]:
    out = {}
    for name, values in signals.items():
        alarms, samples = 0, 0
        for r in range(repeats):
            order = np.random.default_rng(seed + r).permutation(len(values))
            alarms += len(detections(values[order], settings))
            samples += len(values)
        out[name] = {"samples": samples, "false_alarms": alarms, "per_10k": 1e4 * alarms / samples}
    return out


def boundaries(segments: list[tuple[str, np.ndarray]], settings, repeats: int, seed: int,
               size: int) -> dict[str, object]:
    """Delay per boundary (median over repeats, missed ones left out) and alarms inside segments."""
    delays: dict[str, list[int]] = {f"{a}->{b}": [] for (a, _), (b, _) in zip(segments, segments[1:])}
    early = 0
    for r in range(repeats):
        rng = np.random.default_rng(seed + 1000 + r)
        parts = [v[rng.permutation(len(v))[:size if name != "sst2-dev" else None]] for name, v in segments]
        starts = np.cumsum([0] + [len(p) for p in parts])
        hits = detections(np.concatenate(parts), settings)
        for k, key in enumerate(delays):
            lo, hi = starts[k + 1], starts[k + 2]
            after = [h - lo for h in hits if lo <= h < hi]
            if after:
                delays[key].append(int(after[0]))
        # a detection before the first boundary, or a second one within a segment, is an alarm too many
        early += sum(1 for h in hits if h < starts[1])
        for k in range(1, len(parts)):
            inside = [h for h in hits if starts[k] <= h < starts[k + 1]]
            early += max(0, len(inside) - 1)
    return {"repeats": repeats, "segment_size": size,
            "delay_median": {k: (float(np.median(v)) if v else None) for k, v in delays.items()},
            "delay_max": {k: (max(v) if v else None) for k, v in delays.items()},
            "detected": {k: f"{len(v)}/{repeats}" for k, v in delays.items()},
            "extra_detections": early}


def scenario(path: Path, centroids: np.ndarray, settings, max_len: int = 128) -> dict[str, object]:
    """Detections on a scenario file's stream, with the position where each segment starts."""
    import torch

    from producers.replay import iter_samples, load_scenario
    from stream.config import default_model_dir
    from stream.model import MultiExitModel

    sc = load_scenario(path)
    samples = [s for s, _ in iter_samples(sc)]
    model = MultiExitModel.load(default_model_dir())
    with torch.inference_mode():
        emb = np.concatenate([model.embed(model.tokenize([s["text"] for s in samples[i:i + 256]], None, max_len)).numpy()
                              for i in range(0, len(samples), 256)])
    starts, prev = [], None
    for i, s in enumerate(samples):
        if s["source"] != prev:
            starts.append({"seq": i, "source": s["source"]})
            prev = s["source"]
    return {"scenario": sc.name, "samples": len(samples), "source_changes": starts,
            "detections": detections(distances(emb, centroids), settings)}


def main(argv: list[str] | None = None) -> int:
    from monitoring.drift import reference_centroids
    from monitoring.drift import HookSettings
    from stream.config import home

    p = argparse.ArgumentParser(prog="python -m bench drift_hook", description=__doc__.split("\n\n")[0])
    defaults = HookSettings()
    p.add_argument("--kind", default=defaults.kind, choices=("page_hinkley", "adwin"))
    p.add_argument("--threshold", type=float, default=defaults.threshold)
    p.add_argument("--delta", type=float, default=None, help="default: the kind's (page_hinkley 0.25, adwin 0.02)")
    p.add_argument("--warmup", type=int, default=defaults.warmup)
    p.add_argument("--reference", type=Path, default=home() / "matrices" / "sst2-dev.npz")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--segment-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenario", type=Path, action="append", default=[], help="also replay this scenario file")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    settings = HookSettings(kind=args.kind, threshold=args.threshold, delta=args.delta, warmup=args.warmup)
    started = time.time()
    centroids = reference_centroids(args.reference)
    signals = {f"{d}-{s}": distances(embeddings(d, s, args.max_len), centroids) for d, s in STATIONARY}
    report = {"settings": settings.as_dict(), "reference": str(args.reference), "max_len": args.max_len,
              "seed": args.seed,
              "stationary": stationary(signals, settings, args.repeats, args.seed),
              "boundaries": boundaries([("sst2-dev", signals["sst2-dev"]), ("imdb", signals["imdb-test"]),
                                        ("ag_news", signals["ag_news-test"])], settings, 20, args.seed,
                                       args.segment_size)}
    total = sum(v["samples"] for v in report["stationary"].values())
    alarms = sum(v["false_alarms"] for v in report["stationary"].values())
    report["stationary_total"] = {"samples": total, "false_alarms": alarms, "per_10k": 1e4 * alarms / total}
    report["scenarios"] = [scenario(f, centroids, settings, args.max_len) for f in args.scenario]
    report["elapsed_s"] = round(time.time() - started, 1)
    print(f"drift hook {settings.describe()}")
    for name, row in report["stationary"].items():
        print(f"  stationary {name:<14} {row['samples']:>7} samples  {row['false_alarms']:>3} alarms  "
              f"{row['per_10k']:.3f}/10k")
    print(f"  stationary total {total} samples, {alarms} alarms, {report['stationary_total']['per_10k']:.3f}/10k")
    b = report["boundaries"]
    for key in b["delay_median"]:
        print(f"  boundary {key:<16} delay median {b['delay_median'][key]}  max {b['delay_max'][key]}  "
              f"detected {b['detected'][key]}")
    print(f"  extra detections in {b['repeats']} boundary replays: {b['extra_detections']}")
    for sc in report["scenarios"]:
        shown = sc["source_changes"]
        changes = ", ".join(f"{c['source']}@{c['seq']}" for c in shown[:4]) + \
            (f", ... ({len(shown)} source changes)" if len(shown) > 4 else "")
        print(f"  scenario {sc['scenario']}: sources {changes}; detections at {sc['detections']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
