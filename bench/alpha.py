"""Benchmark: which rule for SplitEE's α transfers across a domain shift without the target's labels.

``python -m bench alpha [--matrix imdb-2000.npz] [--calibration sst2-dev.npz] [--runs 20] [--json OUT]``

Every candidate sets α from the source's labelled validation split and/or from what the target stream
reveals without labels; the target's labels only score the result. Candidates:

* ``validation`` (the paper, §5.2): the cheapest α within 1 pt of the final exit on the source split;
* ``temperature``: each exit temperature-scaled on the source split (grid search on the NLL), then the
  same rule on the scaled confidences, applied to the scaled target;
* ``online, disagree`` / ``online, teacher``: α learned from agreement with the final exit (policies.alpha);
* ``authors' α = 0.7``: the authors' public code's fixed IMDb threshold (chosen with target knowledge);
* ``hindsight``: the best fixed (split, α) within 1 pt on the target's labels: the bound, not deployable.

All at the depth-scaled o = 5λ·L/12, β = 1, μ = 0.1, with SplitEE's UCB1 bonus (the paper's) and with
exitflow's bounded UCB1-Tuned index.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: bench/ must not shadow the packages next to it
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np


def temperature_scaled(matrix, temps: np.ndarray):
    """The matrix with every exit's probabilities re-tempered (log-probabilities divided by T per exit)."""
    from stream.matrix import ConfidenceMatrix

    logp = np.log(np.clip(matrix.probs.astype(np.float64), 1e-12, 1.0)) / temps[None, :, None]
    p = np.exp(logp - logp.max(-1, keepdims=True))
    return ConfidenceMatrix(probs=(p / p.sum(-1, keepdims=True)).astype(np.float32), labels=matrix.labels,
                            embeddings=matrix.embeddings, ids=matrix.ids, meta=matrix.meta)


def fit_temperatures(matrix) -> np.ndarray:
    """Per-exit temperature minimising the validation NLL (a grid: one parameter per exit needs no optimiser)."""
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 121))
    logp = np.log(np.clip(matrix.probs.astype(np.float64), 1e-12, 1.0))
    rows = np.arange(matrix.num_samples)
    best = []
    for layer in range(matrix.num_layers):
        nll = []
        for t in grid:
            z = logp[:, layer] / t
            z = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
            nll.append(-z[rows, matrix.labels].mean())
        best.append(grid[int(np.argmin(nll))])
    return np.array(best)


def main(argv: list[str] | None = None) -> int:
    from stream.config import home
    from stream.costs import preset
    from stream.matrix import ConfidenceMatrix

    from policies.evaluate import evaluate
    from policies.oracle import best_fixed_split
    from policies.registry import build
    from policies.splitee import choose_alpha

    ap = argparse.ArgumentParser(prog="python -m bench alpha", description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrix", type=Path, default=home() / "matrices" / "imdb-2000.npz")
    ap.add_argument("--calibration", type=Path, default=home() / "matrices" / "sst2-dev.npz")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", type=Path, default=Path("artifacts/bench_alpha.json"))
    args = ap.parse_args(argv)
    for path in (args.matrix, args.calibration):
        if not path.is_file():
            print(f"bench alpha: {path} is missing; export it with `exitflow export-matrix` (see the README)",
                  file=sys.stderr)
            return 2
    target, source = ConfidenceMatrix.load(args.matrix), ConfidenceMatrix.load(args.calibration)
    cost = preset("splitee", num_layers=target.num_layers)
    alpha_val = choose_alpha(source, cost=cost)["alpha"]
    temps = fit_temperatures(source)
    scaled_target = temperature_scaled(target, temps)
    alpha_temp = choose_alpha(temperature_scaled(source, temps), cost=cost)["alpha"]
    candidates = [
        ("validation (paper)", "splitee", target, {"alpha": alpha_val, "alpha_rule": "fixed"}),
        ("temperature-scaled validation", "splitee", scaled_target, {"alpha": alpha_temp, "alpha_rule": "fixed"}),
        ("online, disagree, 1 pt", "splitee", target, {"alpha": alpha_val, "loss": "disagree", "target": 0.01}),
        ("online, teacher, 0.5 pt", "splitee", target, {"alpha": alpha_val, "target": 0.005}),
        ("online, teacher, 1 pt", "splitee", target, {"alpha": alpha_val}),
        ("online, teacher, 1 pt (SplitEE-S)", "splitee-s", target, {"alpha": alpha_val}),
        ("authors' fixed IMDb α = 0.7", "splitee", target, {"alpha": 0.7, "alpha_rule": "fixed"}),
    ]
    rows = []
    for label, name, matrix, params in candidates:
        for bonus in ("ucb1", "tuned"):
            r = evaluate(build(name, {**params, "bonus": bonus}, cost=cost, num_layers=target.num_layers),
                         matrix, runs=args.runs, seed=0, keep_curve=False)
            rows.append({"candidate": label, "policy": name, "bonus": bonus, "alpha_start": params["alpha"],
                         "delta_acc": -100 * r["accuracy_drop"], "cost_ratio": r["cost_ratio"],
                         "offload_rate": r["offload_rate"], "regret_per_t": r["regret_per_t"]})
    bound = best_fixed_split(target, cost)
    print(f"{args.matrix.name} ({target.num_samples} samples), α from {args.calibration.name}; "
          f"{cost.describe(target.num_layers)}; {args.runs} runs; temperatures {np.round(temps, 2).tolist()}")
    print(f"{'candidate':<36} {'bonus':<6} {'α start':>7} {'Δacc pt':>8} {'cost ratio':>10} {'offload':>8}")
    for r in rows:
        print(f"{r['candidate']:<36} {r['bonus']:<6} {r['alpha_start']:7.3f} {r['delta_acc']:+8.2f} "
              f"{r['cost_ratio']:10.3f} {r['offload_rate']:8.2f}")
    print(f"{'hindsight bound (labels)':<36} {'-':<6} {bound['alpha']:7.3f} {bound['delta_acc']:+8.2f} "
          f"{bound['cost_ratio']:10.3f}      split {bound['arm']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"matrix": str(args.matrix), "calibration": str(args.calibration),
                                     "runs": args.runs, "offload_cost": cost.offload_cloud,
                                     "temperatures": temps.tolist(), "rows": rows, "hindsight": bound}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
