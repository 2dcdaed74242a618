"""`exitflow reproduce drift`: drift-aware SplitEE on ordered streams of the default model's matrices.

No paper has this table; the protocol is issue #12's, on SplitEE's cost settings (SplitEE §5.2 as in
`exitflow reproduce splitee`: β = 1, μ = 0.1, o = 5λ·L/12 (the ratio o/(λL) = 5/12 carried over), α
calibrated on the SST-2 dev split only and then learned online, 20 runs). Segments are kept in order
and reshuffled within themselves on each run; regret is dynamic (each segment against its own best
fixed split in hindsight), reported over the whole stream and in the first 500 samples after each
boundary, beside plain ``splitee``'s on the same runs.

Streams (``STREAMS``): SST-2 dev → IMDb (the issue's criterion), IMDb alone (stationary: forgetting
must cost little), IMDb → AG News, SST-2 → IMDb → AG News (the shipped abrupt scenario) and IMDb → AG
News → IMDb (recurring). IMDb is 2,000 test reviews and AG News 2,000 test articles (shuffled, seed 0);
AG News is label-free (its four topics are not the SST-2 model's classes: rewards, regret and the best
fixed split need no labels, accuracy is n/a).

Policies: ``splitee``, ``splitee-drift`` (discounted, bucketed state), and both with the device
worker's drift hook run offline (`exitflow eval --drift-hook`: ADWIN on the input embedding's distance
to the SST-2 dev class centroids; a detection resets plain splitee's state and cuts splitee-drift's
buckets).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from stream.errors import ConfigError

from policies.evaluate import AFTER_BOUNDARY

#: Segment name → (dataset, split, limit, labels) of the default model's matrices.
SEGMENTS = {"sst2": ("sst2", "dev", None, True), "imdb": ("imdb", "test", 2000, True),
            "ag_news": ("ag_news", "test", 2000, False)}
#: Stream name → its segments, in order.
STREAMS = {"sst2-imdb": ("sst2", "imdb"), "imdb": ("imdb",), "imdb-agnews": ("imdb", "ag_news"),
           "sst2-imdb-agnews": ("sst2", "imdb", "ag_news"), "imdb-agnews-imdb": ("imdb", "ag_news", "imdb")}
#: (label, policy spec, drift hook on): plain first, every ratio is against it.
VARIANTS = (("splitee", "splitee", False), ("splitee-drift", "splitee-drift", False),
            ("splitee+hook", "splitee", True), ("splitee-drift+hook", "splitee-drift", True))
#: Issue #12's done-when targets: boundary regret ratio on SST-2 → IMDb, total regret ratio on IMDb alone.
TARGETS = {"boundary": ("sst2-imdb", 0.5), "stationary": ("imdb", 1.1)}


def run(matrices: dict[str, Any], calibration, *, streams: list[str] | None = None, runs: int = 20, seed: int = 0,
        hook_settings: dict[str, str] | None = None, readings: tuple[str, ...] = ("depth", "literal"),
        log=None) -> dict[str, Any]:
    """Every reading × stream × variant; ``matrices``: segment name → matrix, ``calibration``: the labelled
    SST-2 dev matrix (α's calibration and the drift hook's reference centroids). ``readings``: ``depth``
    (o = 5λ·L/12, the issue's settings, its targets) and ``literal`` (o = 5λ as printed for 12 layers)."""
    from monitoring.drift import HookSettings, reference_centroids
    from stream.costs import PAPER_LAYERS, preset

    from policies.compare import Calibrator, compare
    from policies.evaluate import DriftHook, concat_segments

    if calibration.embeddings is None or calibration.labels is None:
        raise ConfigError("reproduce drift: the calibration matrix needs labels and embeddings (the hook's centroids)")
    hook = DriftHook(HookSettings.from_dict(hook_settings or {}), reference_centroids(calibration))
    names = check_streams(streams) or list(STREAMS)
    layers = calibration.num_layers
    costs = {"depth": preset("splitee", num_layers=layers), "literal": preset("splitee", num_layers=PAPER_LAYERS)}
    if not readings or set(readings) - set(costs):
        raise ConfigError(f"reproduce drift: readings must be some of {sorted(costs)}, got {list(readings)}")
    cal = Calibrator(calibration)     # α calibrated once per cost, shared by every variant
    out: dict[str, Any] = {"protocol": {"runs": runs, "seed": seed, "cost": "splitee", "mu": costs["depth"].mu,
                                        "readings": {k: {"offload": costs[k].offload_cloud,
                                                         "offload_ratio": costs[k].offload_ratio(layers)}
                                                     for k in readings},
                                        "drift_hook": hook.describe(), "alpha": "calibrated on sst2 dev, then online"},
                           "streams": {k: {} for k in readings}, "rows": []}
    for reading in readings:
        for name in names:
            parts = STREAMS[name]
            if len(parts) > 1:
                matrix, segments = concat_segments([(p, matrices[p]) for p in parts])
            else:
                matrix, segments = matrices[parts[0]], [(parts[0], 0, matrices[parts[0]].num_samples)]
            reports = {}
            for label, spec, hooked in VARIANTS:
                if log:
                    log(f"{reading} reading (o = {costs[reading].offload_cloud:g}λ), {name}: {label}, {runs} runs")
                r = compare([spec], matrix, cost=costs[reading], calibration=cal, runs=runs, seed=seed,
                            segments=segments, hook=hook if hooked else None)[0]
                r["spec"] = label
                reports[label] = r
            out["streams"][reading][name] = {"segments": [s for s, _, _ in segments], "reports": reports}
            out["rows"].extend(_rows(reading, name, reports))
    out["targets"] = _targets(out["rows"], out["streams"].get("depth", {}))
    return out


def check_streams(names: list[str] | None) -> list[str] | None:
    """``names`` if every one is a known stream; the error lists the known ones."""
    unknown = set(names or ()) - set(STREAMS)
    if unknown:
        raise ConfigError(f"reproduce drift: unknown stream(s) {sorted(unknown)}; expected some of {sorted(STREAMS)}")
    return names


def _rows(reading: str, stream: str, reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stream, variant and segment, with ratios against plain splitee on the same segment and
    ``stale_regret_500``: the hindsight bound on what adapting can save there, the regret of playing the
    previous segment's best split for the segment's first 500 samples (0 where the best split stays)."""
    plain = reports["splitee"]
    rows = []
    for label, r in reports.items():
        for k, s in enumerate(r["segments"]):
            base = plain["segments"][k]
            stale = None
            if k:
                means, before = s["arm_rewards"], r["segments"][k - 1]["best_fixed_arm"]
                stale = min(AFTER_BOUNDARY, s["samples"]) * (max(means) - means[before - 1])
            rows.append({"reading": reading, "stream": stream, "policy": label, "segment": s["name"], "position": k,
                         "start": s["start"], "stale_regret_500": stale,
                         "samples": s["samples"], "best_fixed_arm": s["best_fixed_arm"],
                         "most_played_arm": s["most_played_arm"], "regret": s["regret"],
                         "regret_first_500": s["regret_first_500"], "regret_first_500_std": s["regret_first_500_std"],
                         "ratio_first_500": _ratio(s["regret_first_500"], base["regret_first_500"]),
                         "ratio_regret": _ratio(s["regret"], base["regret"]),
                         "stream_regret": r["regret"], "ratio_stream_regret": _ratio(r["regret"], plain["regret"]),
                         "epochs": s.get("epochs", 0.0), "detection_delay": s.get("detection_delay"),
                         "accuracy": s["accuracy"], "cost": s["cost"], "offload_rate": s["offload_rate"],
                         "arm_rewards": s["arm_rewards"]})
    return rows


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _targets(rows: list[dict[str, Any]], depth: dict[str, Any]) -> dict[str, Any]:
    """Issue #12's two numbers (depth reading), per drift-aware variant, beside their targets and bounds:
    the stale-split bound of the boundary and plain splitee's own regret over the same 500 positions of a
    stream without the shift (its exploration at that age: what no forgetting can remove)."""
    rows = [r for r in rows if r["reading"] == "depth"]
    out = {}
    stream, limit = TARGETS["boundary"]
    after = [r for r in rows if r["stream"] == stream and r["position"] == 1]
    out["boundary"] = {"stream": stream, "target": f"<= {limit}",
                       "ratio_first_500": {r["policy"]: r["ratio_first_500"] for r in after if r["policy"] != "splitee"},
                       "plain_first_500": next((r["regret_first_500"] for r in after if r["policy"] == "splitee"), None),
                       "stale_regret_500": after[0]["stale_regret_500"] if after else None,
                       "plain_same_positions_no_shift": None}
    alone = depth.get(STREAMS[stream][1], {}).get("reports", {}).get("splitee")
    if after and alone is not None:
        lo = after[0]["start"]
        curve = alone["regret_curve"]
        hi = min(lo + AFTER_BOUNDARY, len(curve))
        if hi > lo:
            out["boundary"]["plain_same_positions_no_shift"] = curve[hi - 1] - (curve[lo - 1] if lo else 0.0)
    stream, limit = TARGETS["stationary"]
    out["stationary"] = {"stream": stream, "target": f"<= {limit}", "ratio_regret": {
        r["policy"]: r["ratio_stream_regret"] for r in rows
        if r["stream"] == stream and r["position"] == 0 and r["policy"] != "splitee"}}
    return out


def table(result: dict[str, Any]) -> str:
    """Per reading, stream, variant and segment: best/most-played split, regret after the boundary and its
    ratio to plain splitee's, the stale-split bound, the hook's epochs and delay; then issue #12's targets."""
    head = (f"{'stream':<17} {'policy':<19} {'segment':<9} {'best':>4} {'most':>4} {'first 500':>14} {'ratio':>6} "
            f"{'stale':>6} {'regret':>7} {'epochs':>6} {'delay':>5}")
    lines = []
    for reading, info in result["protocol"]["readings"].items():
        lines += [f"{reading} reading: o = {info['offload']:g}λ (o/(λL) = {info['offload_ratio']:.3f})", head, "-" * len(head)]
        for r in (r for r in result["rows"] if r["reading"] == reading):
            ratio = "-" if r["ratio_first_500"] is None or r["policy"] == "splitee" else f"{r['ratio_first_500']:.2f}"
            delay = "-" if r["detection_delay"] is None else f"{r['detection_delay']:.0f}"
            stale = "-" if r["stale_regret_500"] is None else f"{r['stale_regret_500']:.2f}"
            lines.append(f"{r['stream']:<17} {r['policy']:<19} {r['segment'][:9]:<9} {r['best_fixed_arm']:>4} "
                         f"{r['most_played_arm'] or '-':>4} {r['regret_first_500']:7.2f} ± {r['regret_first_500_std']:4.2f} "
                         f"{ratio:>6} {stale:>6} {r['regret']:7.2f} {r['epochs']:6.2f} {delay:>5}")
        lines.append("")
    t = result["targets"]
    b = t["boundary"]
    lines.append(f"boundary regret (first 500 after {b['stream']}'s boundary, depth reading) vs plain splitee "
                 f"({_fmt(b['plain_first_500'])}), target {b['target']}: "
                 + ", ".join(f"{k} {_fmt(v)}" for k, v in b["ratio_first_500"].items()))
    lines.append(f"  bounds: stale split {_fmt(b['stale_regret_500'])} (what keeping the old best split loses there); "
                 f"plain splitee over the same positions without the shift {_fmt(b['plain_same_positions_no_shift'])}")
    lines.append(f"total regret on {t['stationary']['stream']} alone vs plain splitee, target "
                 f"{t['stationary']['target']}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in t["stationary"]["ratio_regret"].items()))
    p = result["protocol"]
    lines.append(f"μ = {p['mu']}, α {p['alpha']}, {p['runs']} runs, hook {p['drift_hook']}; stale: 500 × (best − the "
                 "previous segment's best split) in mean reward")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def write(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``drift.json`` (curves thinned), ``drift.txt`` and one regret PNG per reading and stream, boundaries marked."""
    from policies.compare import plot_regret, thin_curve

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = [plot_regret(list(s["reports"].values()), out_dir / f"drift-regret-{reading}-{name}.png")
            for reading, streams in result["streams"].items() for name, s in streams.items()]
    slim = {**result, "streams": {reading: {name: {"segments": s["segments"], "reports": {
        k: {**{f: v for f, v in r.items() if f not in ("regret_curve", "regret_band")},
            "regret_curve": thin_curve(r["regret_curve"])} for k, r in s["reports"].items()}}
        for name, s in streams.items()} for reading, streams in result["streams"].items()}}
    (out_dir / "drift.json").write_text(json.dumps(slim, indent=1, default=str))
    (out_dir / "drift.txt").write_text(table(result) + "\n")
    return [out_dir / "drift.json", out_dir / "drift.txt"] + pngs


def prepare_matrices(*, seed: int = 0, max_len: int = 128, threads: int = 2, log=None) -> tuple[dict[str, Any], Any]:
    """The default model (prepared if missing) and its matrices of every segment, cached like
    `exitflow reproduce splitee`'s; the SST-2 dev one doubles as the calibration."""
    import torch

    from stream.config import default_model_dir
    from stream.train import prepare_source

    from policies.reproduce import cached_matrix

    torch.set_num_threads(threads)
    path, trained = prepare_source("sst2", default_model_dir())
    if log and trained:
        log(f"trained the default model into {path}")
    models: dict[Path, Any] = {}
    matrices = {name: cached_matrix(path, ds, split, limit, seed=seed, max_len=max_len, labels=labels, log=log,
                                    models=models, source="sst2")
                for name, (ds, split, limit, labels) in SEGMENTS.items()}
    return matrices, matrices["sst2"]


def main(args, log) -> int:
    """``exitflow reproduce drift``: prepare the matrices, run every stream, print the table, write the artifacts."""
    streams = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    check_streams(streams)      # before any model is trained or matrix exported
    matrices, calibration = prepare_matrices(seed=args.seed, max_len=args.max_len or 128, threads=args.threads,
                                             log=log)
    if args.limit:
        matrices = {k: m.subset(np.arange(min(args.limit, m.num_samples))) for k, m in matrices.items()}
    result = run(matrices, calibration, streams=streams, runs=args.runs, seed=args.seed, log=log)
    result["settings"] = {"streams": streams or list(STREAMS), "limit": args.limit, "seed": args.seed,
                          "matrices": {k: str(m.meta.get("path", "")) for k, m in matrices.items()}}
    print(table(result))
    for path in write(result, args.out):
        print(f"wrote {path}")
    return 0
