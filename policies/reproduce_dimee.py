"""`exitflow reproduce dimee`: DIMEE Table I and Fig. 3 under the paper's in-domain protocol, beside its numbers.

The protocol (DIMEE §IV): one labelled task split 80/10/10 with a seed (:mod:`policies.indomain`), the
model fine-tuned on the 80%, pools, α (and our μ) from the 10% validation split, results on the 10% test
split; m and n are the paper's 3 and 6 of 12 layers carried to our depth (:func:`policies.dimee.default_split`);
costs are the ``dimee`` preset at our depth (λ_m = 1.5λ, λ_e = λ, o_e = 2.5λ·L/12, o_c = 3λ·L/12, γ = λ_e·L);
every cost is against BERT in the cloud (o_c + γ), as Table I's.

Rows: Table I's BERT (cloud only), Random (a uniform tier per sample), Early-Exit (the whole model on the
mobile, a max-prob threshold from the validation split), Ours-F, Ours-D; then beyond the paper: Eq. 2 as
printed (μ = 1), the linear-probe routers (``dimee-probe``, on the embedding alone and with exit 1), the
pool oracle (each test sample routed to its own Algorithm 1 pool: perfect routing, no labels) and the
hindsight oracle (the cheapest tier and exit that is right, from the labels: the bound of any router).
AdaEE and I-SplitEE are not rerun (their figures stay in the paper's columns).

:func:`run` takes ready matrices, so tests drive it with generated ones; :func:`main` prepares the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from stream.errors import ConfigError

from policies.dimee import (POOLS, assign_pools, centroid_route, cloud_cost, confusion, exit1_features, probe_route,
                            served_layer, tier_costs)

TASKS = ("sst2", "mrpc", "qqp", "rte")
SPECS = (
    ("BERT", "cloud-only"),
    ("Random", "dimee-fixed[router=random]"),
    ("Early-Exit", "static-maxprob[tolerance=0.005]"),
    ("Ours-F", "dimee-fixed"),
    ("Ours-D", "dimee-adaptive"),
    ("Ours-D, tolerance 1 pt", "dimee-adaptive[tolerance=0.01]"),
    ("Ours-D, Eq. 2 as printed (μ = 1)", "dimee-adaptive[mu=1]"),
    ("probe: embedding", "dimee-probe[features=embedding]"),
    ("probe: embedding + exit 1", "dimee-probe"),
    ("probe: embedding + exit 1, tolerance 1 pt", "dimee-probe[tolerance=0.01]"),
)
#: Fig. 3: one cost varied at a time (12-layer figures, carried to L layers like the preset), others fixed.
SWEEPS = {"device_layer": (1.0, 1.5, 2.0, 2.5, 3.0), "edge_layer": (0.5, 1.0, 1.5, 2.0),
          "offload_cloud": (2.0, 3.0, 4.0, 5.0, 6.0), "cloud_fee": (3.0, 6.0, 12.0, 18.0, 24.0)}
PER_LAYER = ("device_layer", "edge_layer")     # per-layer prices are not scaled with depth; the rest are


def oracle(matrix, cost, m: int, n: int) -> dict[str, float]:
    """Hindsight bound: per sample the cheapest (tier, exit) whose prediction is right, else the cheapest option."""
    probs = matrix.probs.astype(np.float64)
    layers = probs.shape[1]
    correct = probs.argmax(-1) == matrix.labels[:, None]
    options = [(0, i) for i in range(1, m + 1)] + [(1, i) for i in range(1, n + 1)] + [(2, layers)]
    price = np.array([tier_costs(np.array([t]), np.array([i]), cost, layers)[0] for t, i in options])
    right = np.stack([correct[:, i - 1] for _, i in options], axis=1)
    masked = np.where(right, price[None, :], np.inf)
    pick = np.where(right.any(1), masked.argmin(1), price.argmin())
    return {"accuracy": float(right[np.arange(len(pick)), pick].mean()), "cost": float(price[pick].mean())}


def pool_oracle(matrix, cost, alpha: float, m: int, n: int) -> dict[str, float]:
    """Every sample routed to the pool Algorithm 1 gives it at α (a perfect router: hindsight confidences, no labels)."""
    probs = matrix.probs.astype(np.float64)
    conf = probs.max(-1)
    pool, _ = assign_pools(conf, alpha, m, n)
    layer = served_layer(conf, pool, alpha, m, n)
    right = probs.argmax(-1)[np.arange(len(pool)), layer - 1] == matrix.labels
    return {"accuracy": float(right.mean()), "cost": float(tier_costs(pool, layer, cost, conf.shape[1]).mean()),
            "alpha": float(alpha)}


def best_pool_oracle(test, val, cost, m: int, n: int, tolerance: float = 0.005) -> dict[str, float]:
    """The perfect router at the cheapest α of the refined grid whose validation accuracy is within ``tolerance``."""
    from policies.dimee import alpha_grid

    conf = val.probs.max(-1)
    final = float(val.accuracy()[-1])
    scored = [(pool_oracle(val, cost, a, m, n), a) for a in alpha_grid(conf, val.num_classes, m, n)]
    ok = [(r["cost"], a) for r, a in scored if r["accuracy"] >= final - tolerance - 1e-12]
    alpha = min(ok)[1] if ok else max(scored, key=lambda s: s[0]["accuracy"])[1]
    return pool_oracle(test, cost, alpha, m, n)


def routing_confusion(matrix, cal: dict[str, Any]) -> list[list[int]]:
    """How the calibrated router's pools on the test split match the pools Algorithm 1 gives the same samples."""
    probs = matrix.probs.astype(np.float64)
    conf = probs.max(-1)
    pool, _ = assign_pools(conf, cal["alpha"], cal["m"], cal["n"])
    emb = matrix.embeddings.astype(np.float64)
    if "probe" not in cal:
        return confusion(pool, centroid_route(emb, cal["centroids"]))
    first = cal.get("features") == "exit1"
    routed = probe_route(emb, exit1_features(probs[:, 0] if first else None, len(emb)), cal["probe"])
    if first:
        routed = np.where(conf[:, 0] >= cal["alpha"], 0, routed)
    return confusion(pool, routed)


def _row(dataset: str, family: str, spec: str, acc: float | None, full: float, cost: float, cloud: float,
         paper: dict[str, Any], tiers: dict[str, float] | None = None) -> dict[str, Any]:
    published = paper["datasets"].get(dataset, {}).get(family)
    return {"dataset": dataset, "policy": family, "spec": spec, "accuracy": acc, "full_model_accuracy": full,
            "delta_acc": None if acc is None else 100 * (acc - full), "cost": cost,
            "cost_ratio_vs_cloud": cost / cloud, "delta_cost": 100 * (cost / cloud - 1), "tiers": tiers,
            "paper_acc": None if published is None else published[0],
            "paper_delta_cost": None if published is None else published[1]}


def run(matrices: dict[str, tuple[Any, Any]], *, runs: int = 20, sweep_runs: int = 1, seed: int = 0,
        sweep: bool = True, log=None) -> dict[str, Any]:
    """Table I rows, routing confusion and Fig. 3 sweeps for ``{dataset: (test matrix, validation matrix)}``."""
    from stream.costs import preset

    from policies.compare import Calibrator, compare
    from policies.dimee import default_split
    from policies.reproduce import paper_table

    paper = paper_table("dimee")
    out: dict[str, Any] = {"paper": paper["paper"], "protocol": paper["protocol"], "runs": runs, "seed": seed,
                           "rows": [], "confusion": {}, "calibration": {}, "sweeps": {}}
    for dataset, (test, val) in matrices.items():
        layers = test.num_layers
        cost = preset("dimee", num_layers=layers)
        m, n = default_split(layers)
        cloud = cloud_cost(cost, layers)
        full = float(test.accuracy()[-1])
        if log:
            log(f"{dataset}: {test.num_samples} test / {val.num_samples} validation samples, m = {m}, n = {n}, "
                f"cloud = {cloud:g}λ, {runs} runs")
        calibrator = Calibrator(val)
        for family, spec in SPECS:
            (r,) = compare([spec], test, cost=cost, calibration=calibrator, runs=runs, seed=seed)
            out["rows"].append(_row(dataset, family, spec, r["accuracy"], full, r["cost"], cloud, paper, r["tiers"]))
        cals = {"centroid": calibrator.calibrate(_cls("dimee-fixed"), cost, {}),
                "probe: embedding": calibrator.calibrate(_cls("dimee-probe"), cost, {"features": "embedding"}),
                "probe: embedding + exit 1": calibrator.calibrate(_cls("dimee-probe"), cost, {})}
        for family, bound in (("pool oracle (perfect routing)", best_pool_oracle(test, val, cost, m, n)),
                              ("hindsight oracle (labels)", oracle(test, cost, m, n))):
            out["rows"].append(_row(dataset, family, "bound", bound["accuracy"], full, bound["cost"], cloud, paper))
        out["confusion"][dataset] = {name: {"validation": c["confusion"], "test": routing_confusion(test, c)}
                                     for name, c in cals.items()}
        out["calibration"][dataset] = {name: {k: c[k] for k in ("alpha", "mu", "m", "n", "counts", "validation",
                                                                "alpha_grid_size")} for name, c in cals.items()}
        if sweep:
            out["sweeps"][dataset] = cost_sweep(test, val, cost, runs=sweep_runs, seed=seed, log=log)
    return out


def _cls(name: str):
    from policies.registry import registry

    return registry()[name]


def cost_sweep(test, val, cost, *, runs: int = 1, seed: int = 0, log=None,
               specs=("dimee-adaptive",)) -> dict[str, Any]:
    """Fig. 3: accuracy and Δcost against the cloud when one cost is varied (α and μ recalibrated each time)."""
    from stream.costs import scaled

    from policies.compare import Calibrator, compare

    layers = test.num_layers
    out: dict[str, Any] = {}
    for field, values in SWEEPS.items():
        used = [v if field in PER_LAYER else scaled(v, layers) for v in values]
        if log:
            log(f"Fig. 3 sweep of {field}: {used}")
        entry: dict[str, Any] = {"paper_values": list(values), "values": used, "accuracy": {}, "delta_cost": {}}
        for v in used:
            c = cost.with_overrides(**{field: v})
            calibrator = Calibrator(val)
            for spec in specs:
                (r,) = compare([spec], test, cost=c, calibration=calibrator, runs=runs, seed=seed)
                entry["accuracy"].setdefault(spec, []).append(r["accuracy"])
                entry["delta_cost"].setdefault(spec, []).append(100 * (r["cost"] / cloud_cost(c, layers) - 1))
        out[field] = entry
    return out


def table(result: dict[str, Any]) -> str:
    """Table I's shape: per dataset and row, ours (accuracy, Δacc, Δcost vs the cloud, tier shares) beside the paper's."""
    head = (f"{'dataset':<7} {'policy':<42} {'acc %':>6} {'Δacc':>6} {'Δcost':>7} {'mobile/edge/cloud':>18} "
            f"{'paper acc':>9} {'paper Δcost':>11}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        tiers = r["tiers"]
        share = "" if not tiers else "/".join(f"{tiers.get(t, 0) / max(1e-9, sum(tiers.values())):.2f}"
                                              for t in ("device", "edge", "cloud"))
        pa = "" if r["paper_acc"] is None else f"{r['paper_acc']:.1f}"
        pc = "" if r["paper_delta_cost"] is None else f"{r['paper_delta_cost']:+.0f}%"
        lines.append(f"{r['dataset']:<7} {r['policy']:<42} {100 * r['accuracy']:6.1f} {r['delta_acc']:+6.1f} "
                     f"{r['delta_cost']:+6.1f}% {share:>18} {pa:>9} {pc:>11}")
    lines.append("Δacc against our full model (final exit); Δcost against BERT in the cloud (o_c + γ); "
                 "paper: BERT-base, 12 layers")
    for dataset, by_router in result["confusion"].items():
        for router, c in by_router.items():
            test = np.asarray(c["test"])
            lines.append(f"{dataset} {router} routing on test, rows = Alg. 1 pool {POOLS}, columns = routed: "
                         f"{test.tolist()} (agreement {np.trace(test) / max(1, test.sum()):.2f})")
    return "\n".join(lines)


def plot(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Table I as a scatter (Δcost vs Δacc, ours and the paper's) and Fig. 3 (one panel per varied cost)."""
    from policies.compare import _save, pyplot

    plt = pyplot()

    out_dir = Path(out_dir)
    datasets = list(dict.fromkeys(r["dataset"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for r in (r for r in result["rows"] if r["dataset"] == dataset):
            (dot,) = ax.plot(r["delta_cost"], r["delta_acc"], "o", label=r["policy"])
            if r["paper_acc"] is not None and r["policy"] != "BERT":
                bert = result_paper_acc(result, dataset)
                ax.plot(r["paper_delta_cost"], r["paper_acc"] - bert, "x", color=dot.get_color())
        ax.set_title(f"{dataset}: ours (o) and the paper's (x)")
        ax.set_xlabel("Δcost vs BERT in the cloud (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Δaccuracy vs the full model (pt)")
    axes[0][-1].legend(fontsize=6)
    paths = [_save(fig, out_dir / "dimee_table1.png")]
    if result["sweeps"]:
        fields = list(SWEEPS)
        fig, axes = plt.subplots(2, len(fields), figsize=(4 * len(fields), 6.5), squeeze=False)
        for k, field in enumerate(fields):
            for dataset, sweeps in result["sweeps"].items():
                entry = sweeps[field]
                for spec in entry["accuracy"]:
                    label = f"{dataset} {spec}"
                    axes[0][k].plot(entry["paper_values"], 100 * np.asarray(entry["accuracy"][spec], float), "o-",
                                    label=label)
                    axes[1][k].plot(entry["paper_values"], entry["delta_cost"][spec], "o-", label=label)
            axes[0][k].set_title(f"{field} varied (12-layer λ units)")
            axes[1][k].set_xlabel(field)
            for row in axes:
                row[k].grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy (%)")
        axes[1][0].set_ylabel("Δcost vs cloud (%)")
        axes[0][-1].legend(fontsize=6)
        paths.append(_save(fig, out_dir / "dimee_fig3.png"))
    return paths


def result_paper_acc(result: dict[str, Any], dataset: str) -> float:
    bert = [r["paper_acc"] for r in result["rows"] if r["dataset"] == dataset and r["policy"] == "BERT"]
    return bert[0] if bert and bert[0] is not None else 0.0


def write(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``dimee.json``, ``dimee_table1.txt`` and the PNGs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dimee.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "dimee_table1.txt").write_text(table(result) + "\n")
    return [out_dir / "dimee.json", out_dir / "dimee_table1.txt"] + plot(result, out_dir)


def main(args, log) -> int:
    """``exitflow reproduce dimee``: fine-tune and export each task (cached), run, print, write."""
    from policies import indomain

    names = [d.strip() for d in (args.datasets or ",".join(TASKS)).split(",") if d.strip()]
    unknown = set(names) - set(indomain.RECIPES)
    if unknown:
        raise ConfigError(f"--datasets: unknown task(s) {sorted(unknown)}; expected some of {sorted(indomain.RECIPES)}")
    matrices = {}
    for task in names:
        parts = indomain.prepare(task, seed=args.seed, backbone=args.backbone, train_limit=args.train_limit,
                                 max_len=args.max_len, threads=args.threads, log=log)
        test = parts["test"] if args.limit is None else parts["test"].subset(np.arange(min(args.limit, parts["test"].num_samples)))
        matrices[task] = (test, parts["val"])
    result = run(matrices, runs=args.runs, sweep_runs=args.sweep_runs, seed=args.seed, sweep=not args.no_sweep, log=log)
    result["settings"] = {"datasets": names, "seed": args.seed, "backbone": args.backbone, "train_limit": args.train_limit,
                          "matrices": {d: {"test": str(t.meta.get("path", "")), "validation": str(v.meta.get("path", ""))}
                                       for d, (t, v) in matrices.items()}}
    print(table(result))
    for path in write(result, args.out):
        print(f"wrote {path}")
    return 0
