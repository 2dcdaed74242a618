"""`exitflow reproduce splitee`: SplitEE Table 2 and Figs. 3–7 under the paper's protocol, beside its numbers.

The protocol (SplitEE §5.2–5.3): a model fine-tuned on a labelled source task is evaluated, without
labels, on a shifted target (SST-2 → IMDb, RTE → SciTail, MRPC → QQP); 20 reshuffled runs; β = 1,
μ = 0.1; offload cost o ∈ {1..5}λ, 5λ for the table; thresholds (α, DeeBERT's entropy, ElasticBERT's
max-prob) from the source's validation split. The paper's figures are data (``papers/splitee.json``).

Costs: the paper's o is for 12 layers. The table is written twice: ``depth`` carries o/(λL) over
(o = 5λ·L/12) and ``literal`` uses o = 5λ as printed. Every policy runs twice where the two readings of
the paper differ: ``[paper]`` (α fixed from the source's validation split, UCB1 bonus; SplitEE-S with
the paper's side information, C_L read in hindsight) and exitflow's defaults (online α by agreement
with the final exit, UCB1-Tuned bounded index; SplitEE-S with the deployable side information).

:func:`run` takes ready matrices, so tests drive it with generated ones; :func:`prepare_matrices` trains the
source models and exports the matrices (cached under ``$EXITFLOW_HOME``).
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from stream.errors import ConfigError

#: Target dataset → the source dataset its model is fine-tuned on (SplitEE §5.2).
PAIRS = {"imdb": "sst2", "scitail": "rte", "qqp": "mrpc"}
PAPER_VARIANT = "alpha_rule=fixed,bonus=ucb1"
SPECS = (
    ("final-exit", "final-exit"),
    ("random-exit", "random-exit[alpha_rule=fixed]"),
    ("static-entropy", "static-entropy"),
    ("static-maxprob", "static-maxprob"),
    ("splitee", f"splitee[{PAPER_VARIANT}]"),
    ("splitee-s", f"splitee-s[{PAPER_VARIANT},side_info=oracle]"),
    ("random-exit", "random-exit"),
    ("splitee", "splitee"),
    ("splitee-s", "splitee-s"),
    ("oracle", "oracle"),
)
SWEEP = ("splitee", f"splitee[{PAPER_VARIANT}]", "splitee-s", f"splitee-s[{PAPER_VARIANT},side_info=oracle]")


def paper_table(name: str = "splitee") -> dict[str, Any]:
    """A paper's published figures, from ``policies/papers/NAME.json``."""
    try:
        text = resources.files("policies").joinpath(f"papers/{name}.json").read_text()
    except FileNotFoundError:
        raise ConfigError(f"no published table for paper {name!r}") from None
    return json.loads(text)


def _row(dataset: str, family: str, report: dict[str, Any], paper: dict[str, Any], reading: str) -> dict[str, Any]:
    delta = paper["datasets"][dataset]["delta"].get(family)
    fe = report["final_exit_accuracy"]
    return {"dataset": dataset, "reading": reading, "policy": report["spec"], "family": family,
            "accuracy": report["accuracy"], "final_exit_accuracy": fe,
            "delta_acc": None if report["accuracy"] is None else 100 * (report["accuracy"] - fe),
            "cost": report["cost"], "cost_ratio": report["cost_ratio"],
            "delta_cost": 100 * (report["cost_ratio"] - 1), "offload_rate": report["offload_rate"],
            "offload_cost": report["offload_cost"], "offload_ratio": report["offload_ratio"],
            "most_played_arm": report["most_played_arm"], "best_fixed_arm": report["best_fixed_arm"],
            "regret_per_t": report["regret_per_t"],
            "paper_delta_acc": None if delta is None else delta[0],
            "paper_delta_cost": None if delta is None else delta[1]}


def _bound_row(dataset: str, reading: str, target, cost) -> dict[str, Any]:
    """The hindsight bound of a fixed (split, α) on the same samples, shaped like a policy row."""
    from policies.oracle import best_fixed_split

    b = best_fixed_split(target, cost)
    return {"dataset": dataset, "reading": reading, "policy": f"bound: split {b['arm']}, α {b['alpha']:g} (labels)",
            "family": "bound", "accuracy": b["accuracy"], "final_exit_accuracy": b["accuracy"] - b["delta_acc"] / 100,
            "delta_acc": b["delta_acc"], "cost": b["cost"], "cost_ratio": b["cost_ratio"],
            "delta_cost": 100 * (b["cost_ratio"] - 1), "offload_rate": None, "offload_cost": cost.offload_cloud,
            "offload_ratio": cost.offload_ratio(target.num_layers), "most_played_arm": b["arm"],
            "best_fixed_arm": b["arm"], "regret_per_t": {}, "paper_delta_acc": None, "paper_delta_cost": None}


def run(matrices: dict[str, tuple[Any, Any]], *, runs: int = 20, sweep_runs: int = 5, seed: int = 0,
        offloads=(1, 2, 3, 4, 5), sweep: bool = True, log=None) -> dict[str, Any]:
    """Table 2 rows, o-sweeps and regret curves for ``{dataset: (target matrix, source validation matrix)}``."""
    from stream.costs import PAPER_LAYERS, preset

    from policies.compare import compare, offload_sweep

    paper = paper_table("splitee")
    out: dict[str, Any] = {"paper": paper["paper"], "protocol": {"runs": runs, "sweep_runs": sweep_runs, "seed": seed,
                                                                 "beta": 1.0, "mu": 0.1, "offloads": list(offloads)},
                           "rows": [], "sweeps": {}, "regret": {}}
    for dataset, (target, calibration) in matrices.items():
        if dataset not in paper["datasets"]:
            raise ConfigError(f"reproduce splitee: no published row for dataset {dataset!r}; "
                              f"expected some of {sorted(paper['datasets'])}")
        layers = target.num_layers
        readings = {"depth": preset("splitee", num_layers=layers),
                    "literal": preset("splitee", num_layers=PAPER_LAYERS)}
        for reading, cost in readings.items():
            if log:
                log(f"{dataset}: {reading} reading, o = {cost.offload_cloud:g}λ, {runs} runs")
            reports = compare([spec for _, spec in SPECS], target, cost=cost, calibration=calibration, runs=runs,
                              seed=seed)
            by_spec = {r["spec"]: r for r in reports}
            for family, spec in SPECS:
                if spec in by_spec:
                    out["rows"].append(_row(dataset, family, by_spec[spec], paper, reading))
            if target.labels is not None:
                out["rows"].append(_bound_row(dataset, reading, target, cost))
            if reading == "depth":
                out["regret"][dataset] = {r["spec"]: {"mean": r["regret_curve"], "band": r["regret_band"]}
                                          for r in reports if r["spec"] in SWEEP}
        if sweep:
            if log:
                log(f"{dataset}: o-sweep {list(offloads)}λ·L/12, {sweep_runs} runs")
            out["sweeps"][dataset] = offload_sweep(list(SWEEP) + ["static-maxprob", "static-entropy"], target,
                                                   cost=readings["depth"], offloads=offloads,
                                                   calibration=calibration, runs=sweep_runs, seed=seed)
    return out


def table(result: dict[str, Any], reading: str = "depth") -> str:
    """Table 2's shape: per dataset and policy, ours (accuracy, Δacc, cost ratio, Δcost) beside the paper's Δ."""
    head = (f"{'dataset':<8} {'policy':<56} {'acc %':>6} {'Δacc':>6} {'Δcost':>7} {'offload':>7} {'arm':>5} "
            f"{'paper Δacc':>10} {'paper Δcost':>11}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        if r["reading"] != reading:
            continue
        acc = "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}"
        dacc = "n/a" if r["delta_acc"] is None else f"{r['delta_acc']:+.1f}"
        pa = "" if r["paper_delta_acc"] is None else f"{r['paper_delta_acc']:+.1f}"
        pc = "" if r["paper_delta_cost"] is None else f"{r['paper_delta_cost']:+.1f}%"
        arm = f"{r['most_played_arm'] or '-'}/{r['best_fixed_arm']}"
        offload = "" if r["offload_rate"] is None else f"{r['offload_rate']:.2f}"
        lines.append(f"{r['dataset']:<8} {r['policy']:<56} {acc:>6} {dacc:>6} {r['delta_cost']:+6.1f}% "
                     f"{offload:>7} {arm:>5} {pa:>10} {pc:>11}")
    rows = [r for r in result["rows"] if r["reading"] == reading]
    if rows:
        lines.append(f"o = {rows[0]['offload_cost']:g}λ (o/(λL) = {rows[0]['offload_ratio']:.3f}); Δ against our final "
                     f"exit; arm = most played / best fixed in hindsight; paper: 12-layer ElasticBERT, o = 5λ")
    return "\n".join(lines)


def plot(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Figs. 3–6 (accuracy and cost vs o, per dataset) and Fig. 7 (cumulative regret, mean ± 95% band)."""
    from policies.compare import _save, plot_sweep, pyplot

    plt = pyplot()

    out_dir = Path(out_dir)
    paths = [plot_sweep(sweep, out_dir / f"fig3-6_{dataset}.png") for dataset, sweep in result["sweeps"].items()]
    if result["regret"]:
        fig, axes = plt.subplots(1, len(result["regret"]), figsize=(5.5 * len(result["regret"]), 4.2), squeeze=False)
        for ax, (dataset, curves) in zip(axes[0], result["regret"].items()):
            for spec, curve in curves.items():
                mean, band = np.asarray(curve["mean"]), np.asarray(curve["band"])
                t = np.arange(1, len(mean) + 1)
                ax.plot(t, mean, label=spec)
                ax.fill_between(t, mean - band, mean + band, alpha=0.2)
            ax.set_title(f"{dataset}: regret vs best fixed split")
            ax.set_xlabel("samples")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("cumulative regret (mean, 95% band)")
        axes[0][-1].legend(fontsize=7)
        paths.append(_save(fig, out_dir / "fig7_regret.png"))
    return paths


def write(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """The JSON (``rows`` + settings; regret curves thinned), both tables as text, and the PNGs."""
    from policies.compare import thin_curve

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slim = {**result, "regret": {d: {s: {"mean": thin_curve(c["mean"]), "band": thin_curve(c["band"])}
                                     for s, c in curves.items()} for d, curves in result["regret"].items()}}
    (out_dir / "splitee.json").write_text(json.dumps(slim, indent=1, default=str))
    text = "\n\n".join(f"[{reading} reading]\n{table(result, reading)}" for reading in ("depth", "literal"))
    (out_dir / "table2.txt").write_text(text + "\n")
    return [out_dir / "splitee.json", out_dir / "table2.txt"] + plot(result, out_dir)


def prepare_matrices(targets: list[str], *, limit: int | None = None, seed: int = 0, backbone: str = "default",
                     train_limit: int | None = None, max_len: int = 128, threads: int = 2,
                     log=None) -> dict[str, tuple[Any, Any]]:
    """Train the source models and export target + source-validation matrices, reusing what is cached.

    Cache: ``$EXITFLOW_HOME/models/minilm-<source>`` (the SST-2 one is the default model) and
    ``$EXITFLOW_HOME/reproduce/<model>/<dataset>-<split>[-<limit>]-s<seed>.npz``; a non-default backbone or
    train limit gets its own folders, so test models never mix with the real ones.
    """
    import torch

    from stream import datasets
    from stream.config import default_model_dir, home
    from stream.train import prepare_source

    torch.set_num_threads(threads)
    tag = "" if backbone == "default" and train_limit is None else \
        "-" + "".join(ch if ch.isalnum() else "_" for ch in f"{backbone}-{train_limit}")
    out: dict[str, tuple[Any, Any]] = {}
    for target in targets:
        source, split = PAIRS[target], datasets.default_split(target)
        model_dir = default_model_dir() if source == "sst2" and not tag else home() / "models" / f"minilm-{source}{tag}"
        path, trained = prepare_source(source, model_dir, backbone=backbone, limit=train_limit)
        if log and trained:
            log(f"trained the {source} model into {path}")
        models: dict[Path, Any] = {}
        out[target] = tuple(cached_matrix(path, name, part, lim, seed=seed, max_len=max_len, log=log, models=models,
                                          source=source)
                            for name, part, lim in ((target, split, limit), (source, datasets.default_split(source), None)))
    return out


def cached_matrix(model_path: Path, name: str, part: str, limit: int | None, *, seed: int = 0, max_len: int = 128,
                  labels: bool = True, log=None, models: dict | None = None, source: str = "") -> Any:
    """The confidence matrix of ``name``/``part`` (shuffled with ``seed``, first ``limit``) under the model in
    ``model_path``, exported once into ``$EXITFLOW_HOME/reproduce/<model>/`` and again when the model is newer.
    ``labels=False``: a label-free matrix (a dataset whose classes are not the model's). ``models`` caches loads."""
    from stream import datasets
    from stream.config import home
    from stream.matrix import ConfidenceMatrix
    from stream.model import MultiExitModel
    from stream.train import export_matrix

    stem = f"{name}-{part}{'' if limit is None else f'-{limit}'}-s{seed}{'' if labels else '-nolabels'}"
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem)   # a file's path as a dataset name
    file = home() / "reproduce" / model_path.name / f"{stem}.npz"
    weights = model_path / "model.safetensors"
    if not file.is_file() or (weights.is_file() and file.stat().st_mtime < weights.stat().st_mtime):
        models = {} if models is None else models
        if model_path not in models:
            models[model_path] = MultiExitModel.load(model_path)
        model = models[model_path]
        ds = datasets.shuffle_limit(datasets.load(name, part), True, seed, limit)
        if not labels:
            ds = dataclasses.replace(ds, labels=None, label_names=None)
        if log:
            log(f"exporting {name}/{part} ({len(ds)} samples{'' if labels else ', no labels'}) with the "
                f"{source or model_path.name} model")
        matrix = export_matrix(model, ds, max_len)
        matrix.meta.update(shuffle=True, seed=seed, limit=limit, model=str(model_path))
        file.parent.mkdir(parents=True, exist_ok=True)
        matrix.save(file)
    matrix = ConfidenceMatrix.load(file)
    matrix.meta["path"] = str(file)
    return matrix


def main(args, log) -> int:
    """``exitflow reproduce splitee``: prepare the matrices, run, print both tables, write the artifacts."""
    names = [d.strip() for d in (args.datasets or ",".join(PAIRS)).split(",") if d.strip()]
    unknown = set(names) - set(PAIRS)
    if unknown:
        raise ConfigError(f"--datasets: unknown target(s) {sorted(unknown)}; expected some of {sorted(PAIRS)}")
    max_len = args.max_len or 128
    matrices = prepare_matrices(names, limit=args.limit, seed=args.seed, backbone=args.backbone,
                                train_limit=args.train_limit, max_len=max_len, threads=args.threads, log=log)
    result = run(matrices, runs=args.runs, sweep_runs=args.sweep_runs, seed=args.seed, sweep=not args.no_sweep, log=log)
    result["settings"] = {"datasets": names, "limit": args.limit, "seed": args.seed, "backbone": args.backbone,
                          "train_limit": args.train_limit, "max_len": max_len,
                          "matrices": {d: {"target": str(t.meta.get("path", "")), "calibration": str(c.meta.get("path", ""))}
                                       for d, (t, c) in matrices.items()}}
    print(table(result, "depth"))
    print()
    print(table(result, "literal"))
    for path in write(result, args.out):
        print(f"wrote {path}")
    return 0
