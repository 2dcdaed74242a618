"""`exitflow reproduce eenet`: EENet Table 1 (accuracy under an average-cost budget) on SST-2 and AG News.

The protocol (EENet §4): a multi-exit model is calibrated on a labelled validation split for each budget
B ∈ [c_1, c_L] and judged on a test split. EENet trains its scoring networks per budget (Algorithm 1,
budget kept by :func:`policies.eenet.fit_budget`). The baselines score every exit with Eq. 5–7 —
BranchyNet the normalised entropy, MSDNet the max-prob, PABEE the vote (agreement) — and take their
thresholds the way MSDNet does: exit shares p_k ∝ q^k with q solved so that Σ p_k c_k = B, each exit
letting its share of the validation samples go (the highest scores first; a rounding overshoot is
trimmed by the same move as EENet's). PABEE's vote takes only k+1 values and is 1 for every sample at
exit 1, so its ties are broken by the max-prob; ``pabee-patience`` is PABEE's own rule
(:class:`policies.baselines.Patience`) at the largest patience that stays within B on validation (none
below c_2). ``oracle`` is the per-sample hindsight bound at cost ≤ B. With two classes the entropy is a
monotone function of the max-prob, so BranchyNet and MSDNet coincide on SST-2.

Data: SST-2 with the default model (30,000 shuffled train phrases, ``DEFAULT_RECIPE``), validated on
5,000 seeded train phrases that model never saw (the paper holds out 5,000) and tested on GLUE dev
(872); AG News 80/10/10 (:mod:`policies.indomain`). Costs: the ``splitee`` preset at the model's depth,
device only, c_k = k layers + k exits. Budgets are fractions of c_L: 0.2, 0.3, 0.5, 0.8 and the paper's
own (its seconds over the full model's 3.72 s; its BERT has 4 exits, ours one per layer), where the
paper's figures (``papers/eenet.json``) sit beside ours; the sweep adds points for the figure.
Threshold policies are stateless, so one pass over the test split is exact (``--runs`` does not apply).
:func:`run` takes ready matrices, so tests drive it with generated ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from stream.errors import ConfigError

from policies.base import Action, Continue, Exit, Observation, Policy, StateView
from policies.eenet import check_budget, confidence_scores, exit_costs, first_exit, fit_budget, loosen, quotas

DATASETS = ("sst2", "ag_news")
BUDGETS = (0.2, 0.3, 0.5, 0.8)
SWEEP = (0.25, 0.35, 0.4, 0.6, 0.7, 0.9, 1.0)
#: Method → what it is, in the table's order.
METHODS = {"eenet": "EENet (learned scores, Alg. 1, budget kept)", "branchynet": "BranchyNet (entropy, geometric)",
           "msdnet": "MSDNet (max-prob, geometric)", "pabee": "PABEE (vote, geometric)",
           "pabee-patience": "PABEE's patience rule, largest within B", "oracle": "per-sample hindsight bound"}
SCORES = {"branchynet": "entropy", "msdnet": "max", "pabee": "vote"}
SST2_VAL = 5000           # the paper holds out 5,000 training sentences for validation


def score(probs: np.ndarray, kind: str) -> np.ndarray:
    """The baselines' score of the last exit in ``probs`` [..., k, C] (Eq. 5–7; vote ties broken by max-prob)."""
    a = confidence_scores(probs)
    return {"max": a[..., 0], "entropy": a[..., 1], "vote": a[..., 2] + 1e-3 * a[..., 0]}[kind]


def score_matrix(probs: np.ndarray, kind: str) -> np.ndarray:
    """``score`` at every exit: [N, L, C] → [N, L]."""
    return np.stack([score(probs[:, :k], kind) for k in range(1, probs.shape[1] + 1)], axis=1)


class ScoreThresholds(Policy):
    """Exit at the first exit whose score (``max``, ``entropy`` or ``vote``) reaches its threshold t_k.

    MSDNet's inference rule with per-exit thresholds; built by this runner only (not registered).
    """

    name = "score-thresholds"

    def __init__(self, *, kind: str, thresholds, **kw) -> None:
        super().__init__(**kw)
        self.kind, self.thresholds = kind, np.asarray(thresholds, dtype=np.float64)

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind, "thresholds": self.thresholds.tolist(), "seed": self.seed}

    def decide(self, obs: Observation, state: StateView) -> Action:
        if obs.layer:
            seen = np.stack([obs.probs[k] for k in range(1, obs.layer + 1)]).astype(np.float64)
            if obs.layer == self.num_layers or score(seen, self.kind) >= self.thresholds[obs.layer - 1]:
                return Exit()
        return Continue(obs.layer + 1, exits="last")


def geometric_shares(costs: np.ndarray, budget_cost: float) -> tuple[np.ndarray, float]:
    """MSDNet's exit distribution for a budget: p_k ∝ q^k with q such that Σ p_k c_k = B (bisection on log q).

    >>> p, q = geometric_shares(np.array([1.0, 2.0, 3.0]), 2.0)
    >>> p.round(4).tolist(), round(q, 4)
    ([0.3333, 0.3333, 0.3333], 1.0)
    """
    k = np.arange(1, len(costs) + 1)

    def shares(log_q):
        w = np.exp(log_q * k - np.max(log_q * k))
        return w / w.sum()

    lo, hi = -60.0, 60.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if shares(mid) @ costs < budget_cost else (lo, mid)
    return shares((lo + hi) / 2), float(np.exp((lo + hi) / 2))


def calibrate_baseline(val, kind: str, costs: np.ndarray, budget_cost: float) -> dict[str, Any]:
    """Geometric-share thresholds for a score on the validation matrix; a rounding overshoot is trimmed."""
    scores = score_matrix(val.probs.astype(np.float64), kind)
    shares, q = geometric_shares(costs, budget_cost)
    counts = quotas(shares, val.num_samples)
    correct = val.probs.argmax(-1) == val.labels[:, None]
    thresholds, fit = fit_budget(scores, counts, costs, budget_cost, correct, spend=False)
    thresholds = loosen(thresholds)
    at = first_exit(scores, thresholds)
    return {"kind": kind, "q": q, "shares": shares.tolist(), "counts": counts.tolist(),
            "thresholds": thresholds.tolist(),
            "trimmed": fit["moves_down"] > 0, "val_cost": float(costs[at].mean()),
            "val_accuracy": float(correct[np.arange(len(at)), at].mean())}


def patience_exits(probs: np.ndarray, patience: int) -> np.ndarray:
    """0-based exit of PABEE's rule: the first exit whose prediction held for ``patience`` exits (else the last)."""
    pred = probs.argmax(-1)
    streak = np.zeros(pred.shape, dtype=np.int64)
    for k in range(1, pred.shape[1]):
        streak[:, k] = np.where(pred[:, k] == pred[:, k - 1], streak[:, k - 1] + 1, 0)
    hit = streak >= patience
    hit[:, -1] = True
    return hit.argmax(1)


def largest_patience(val, costs: np.ndarray, budget_cost: float) -> int | None:
    """The largest patience whose validation cost is ≤ B (None: even patience 1 costs more)."""
    fits = [p for p in range(1, val.num_layers) if costs[patience_exits(val.probs, p)].mean() <= budget_cost + 1e-9]
    return max(fits) if fits else None


def oracle(matrix, costs: np.ndarray, budget_cost: float) -> tuple[float, float]:
    """Best accuracy (and its cost) any per-sample exit choice reaches at average cost ≤ B, from the labels.

    Every sample starts at exit 1; one whose first correct exit is k gains 1 for c_k − c_1 more, so taking
    the cheapest gains first is optimal (unit values: the knapsack is solved by sorting).
    """
    correct = matrix.probs.argmax(-1) == matrix.labels[:, None]
    n = len(correct)
    extra = np.sort(costs[correct[correct.any(1)].argmax(1)] - costs[0])
    taken = int(np.searchsorted(np.cumsum(extra), n * (budget_cost - costs[0]) + 1e-9, side="right"))
    return taken / n, float(costs[0] + extra[:taken].sum() / n)


def paper_table(name: str = "eenet") -> dict[str, Any]:
    from policies.reproduce import paper_table as load

    return load(name)


def paper_budgets(paper: dict[str, Any], dataset: str) -> dict[float, dict[str, float]]:
    """The paper's rows for ``dataset`` keyed by budget as a fraction of the full model's latency."""
    entry = paper["datasets"].get(dataset)
    if not entry:
        return {}
    return {round(r["budget"] / entry["full"]["latency"], 3): r["accuracy"] for r in entry["rows"]}


def run(matrices: dict[str, tuple[Any, Any]], *, budgets=BUDGETS, sweep: bool = True, seed: int = 0,
        epochs: int = 2000, log=None) -> dict[str, Any]:
    """Table 1 rows for ``{dataset: (validation matrix, test matrix)}`` (labelled, same model)."""
    from stream.costs import preset

    from policies.eenet import EENet, calibrate
    from policies.evaluate import evaluate
    from policies.registry import build

    paper = paper_table()
    protocol = {"seed": seed, "epochs": epochs, "runs": 1, "budgets": list(budgets),
                "sweep": list(SWEEP) if sweep else [], "note": "threshold policies are stateless: one pass is exact"}
    out: dict[str, Any] = {"paper": paper["paper"], "protocol": protocol, "datasets": {}, "rows": []}
    for dataset, (val, test) in matrices.items():
        if val.labels is None or test.labels is None:
            raise ConfigError(f"reproduce eenet: {dataset} needs labelled validation and test matrices")
        layers = test.num_layers
        cost = preset("splitee", num_layers=layers)
        costs = exit_costs(cost, layers)
        published = paper_budgets(paper, dataset)
        low = costs[0] / costs[-1]
        table_budgets = sorted(set(budgets) | set(published))
        grid = sorted(set(table_budgets) | (set(SWEEP) if sweep else set()))
        skipped = [b for b in grid if b < low - 1e-9]
        if skipped and log:
            log(f"{dataset}: budgets {skipped} lie below c_1/c_L = {low:.4f} and cannot be met: skipped")
        out["datasets"][dataset] = {
            "val_samples": val.num_samples, "test_samples": test.num_samples, "layers": layers,
            "cost_model": cost.describe(layers) + "; device only: c_k = k layers + k exits",
            "exit_costs": costs.tolist(), "feasible": [float(low), 1.0], "skipped_budgets": skipped,
            "val_exit_accuracy": val.accuracy().round(4).tolist(),
            "test_exit_accuracy": test.accuracy().round(4).tolist(),
            "val_about": _about(val), "test_about": _about(test),
            "val_path": val.meta.get("path"), "test_path": test.meta.get("path"),
            "paper_full": paper["datasets"].get(dataset, {}).get("full")}
        for budget in (b for b in grid if b not in skipped):
            bcost = check_budget(budget, costs, cost.name, "reproduce eenet")
            if log:
                log(f"{dataset}: budget {budget:g}·c_L = {bcost:.3f}λ")
            paper_row = published.get(round(budget, 3), {})

            def row(method, accuracy, realised, val_cost, val_acc, **extra):
                out["rows"].append({"dataset": dataset, "method": method, "budget": budget, "budget_cost": bcost,
                                    "realised_cost": realised, "accuracy": accuracy, "val_cost": val_cost,
                                    "val_accuracy": val_acc, "paper_acc": paper_row.get(method),
                                    "in_table": budget in table_budgets, **extra})

            cal = calibrate(val, cost=cost, budget=budget, epochs=epochs, seed=seed)
            r = evaluate(EENet(cost=cost, num_layers=layers, num_classes=test.num_classes, calibration=cal), test,
                         keep_curve=False)
            row("eenet", r["accuracy"], r["cost"], cal["validation"]["cost"], cal["validation"]["accuracy"],
                adjustment={k: cal["adjustment"][k] for k in ("expected_cost", "learned_cost", "learned_accuracy",
                                                              "moves_down", "moves_up", "method")},
                exits=list(r["exit_layers"].values()))
            for method, kind in SCORES.items():
                b = calibrate_baseline(val, kind, costs, bcost)
                policy = ScoreThresholds(cost=cost, num_layers=layers, num_classes=test.num_classes, kind=kind,
                                         thresholds=b["thresholds"])
                r = evaluate(policy, test, keep_curve=False)
                row(method, r["accuracy"], r["cost"], b["val_cost"], b["val_accuracy"], q=b["q"], trimmed=b["trimmed"],
                    exits=list(r["exit_layers"].values()))
            patience = largest_patience(val, costs, bcost)
            if patience is None:
                row("pabee-patience", None, None, None, None, patience=None)
            else:
                at = patience_exits(val.probs, patience)
                r = evaluate(build("patience", {"patience": patience}, cost=cost, num_layers=layers,
                                   num_classes=test.num_classes), test, keep_curve=False)
                row("pabee-patience", r["accuracy"], r["cost"], float(costs[at].mean()),
                    float((val.probs.argmax(-1)[np.arange(len(at)), at] == val.labels).mean()), patience=patience)
            acc, spent = oracle(test, costs, bcost)
            row("oracle", acc, spent, None, None)
    return out


def _about(matrix) -> str:
    m = matrix.meta
    where = f"{m.get('dataset', '?')}/{m.get('split', '?')}" + (f" ({m['protocol']})" if "protocol" in m else "")
    return m.get("about") or where


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table(result: dict[str, Any]) -> str:
    """Table 1's shape: per dataset and budget, each method's test accuracy and realised cost, the paper's beside."""
    head = (f"{'dataset':<8} {'B/c_L':>6} {'B λ':>6} {'method':<15} {'acc %':>6} {'cost λ':>7} {'val cost':>8} "
            f"{'val acc':>7} {'paper %':>7}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        if not r["in_table"]:
            continue
        cost = "-" if r["realised_cost"] is None else f"{r['realised_cost']:.3f}"
        val = "-" if r["val_cost"] is None else f"{r['val_cost']:.3f}"
        paper = "" if r["paper_acc"] is None else f"{r['paper_acc']:.2f}"
        lines.append(f"{r['dataset']:<8} {r['budget']:6.3f} {r['budget_cost']:6.3f} {r['method']:<15} "
                     f"{_pct(r['accuracy']):>6} {cost:>7} {val:>8} {_pct(r['val_accuracy']):>7} {paper:>7}")
    for dataset, d in result["datasets"].items():
        full = d["paper_full"]
        lines.append(f"{dataset}: validation {d['val_samples']} = {d['val_about']}; test {d['test_samples']} = "
                     f"{d['test_about']}; final exit "
                     f"{100 * d['test_exit_accuracy'][-1]:.1f}% at {d['exit_costs'][-1]:g}λ; {d['cost_model']}"
                     + (f"; paper: BERT-base 4 exits, {full['accuracy']}% at {full['latency']} s" if full else ""))
    lines.append("cost λ / acc %: test split; val: the calibration split; B/c_L = the paper's seconds / 3.72 s where "
                 "it has a figure; oracle: per-sample hindsight bound at cost <= B")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Accuracy and realised cost against the budget, one column per dataset; the paper's points hollow."""
    from policies.compare import _save, pyplot

    plt = pyplot()

    names = list(result["datasets"])
    fig, axes = plt.subplots(2, max(1, len(names)), figsize=(6 * max(1, len(names)), 8), squeeze=False)
    colors = dict(zip(METHODS, plt.get_cmap("tab10").colors))
    paper = paper_table()
    for col, dataset in enumerate(names):
        top, bottom = axes[0][col], axes[1][col]
        for method in METHODS:
            pts = [r for r in result["rows"]
                   if r["dataset"] == dataset and r["method"] == method and r["accuracy"] is not None]
            if not pts:
                continue
            style = {"color": colors[method], "linestyle": "--" if method == "oracle" else "-", "marker": "o", "ms": 3}
            top.plot([r["budget"] for r in pts], [100 * r["accuracy"] for r in pts], label=method, **style)
            bottom.plot([r["budget"] for r in pts], [r["realised_cost"] / r["budget_cost"] * r["budget"] for r in pts],
                        label=method, **style)
        for budget, accs in paper_budgets(paper, dataset).items():
            for method, acc in accs.items():
                top.scatter([budget], [acc], facecolors="none", edgecolors=colors.get(method, "k"), s=40)
        bottom.plot([0, 1], [0, 1], color="k", linewidth=0.8, linestyle=":", label="cost = B")
        top.set_title(f"{dataset}: test accuracy vs budget (hollow: the paper, BERT)")
        bottom.set_title(f"{dataset}: realised test cost vs budget")
        top.set_ylabel("accuracy %")
        bottom.set_ylabel("realised cost / c_L")
        for ax in (top, bottom):
            ax.set_xlabel("budget B / c_L")
            ax.grid(alpha=0.3)
        top.legend(fontsize=7)
    return _save(fig, path)


def write(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``eenet.json`` (rows + settings), ``eenet_table.txt`` and ``eenet_budget.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eenet.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "eenet_table.txt").write_text(table(result) + "\n")
    return [out_dir / "eenet.json", out_dir / "eenet_table.txt", plot(result, out_dir / "eenet_budget.png")]


def _sst2(*, limit, seed, backbone, train_limit, max_len, log) -> tuple[Any, Any]:
    """The default model (trained if missing), 5,000 train phrases it never saw, and GLUE dev; cached."""
    from stream import datasets
    from stream.config import default_model_dir, home
    from stream.matrix import ConfidenceMatrix
    from stream.model import MultiExitModel
    from stream.train import DEFAULT_RECIPE, export_matrix, prepare_source, select_train

    tag = "" if backbone == "default" and train_limit is None else \
        "-" + "".join(ch if ch.isalnum() else "_" for ch in f"{backbone}-{train_limit}")
    model_dir = default_model_dir() if not tag else home() / "models" / f"minilm-sst2{tag}"
    path, trained = prepare_source("sst2", model_dir, backbone=backbone, limit=train_limit)
    if log and trained:
        log(f"trained the sst2 model into {path}")
    card = json.loads((path / "card.json").read_text())
    train = datasets.load("sst2", "train")
    used = select_train(train, card.get("train_samples", train_limit or DEFAULT_RECIPE["limit"]),
                        card.get("min_words", 0), card.get("seed", 0))
    if len(used) != card.get("train_samples", len(used)):
        raise ConfigError(f"reproduce eenet: cannot rebuild the training selection of {path} from its card")
    seen = set(used.ids)
    unseen = np.array([i for i, sid in enumerate(train.ids) if sid not in seen])
    held = np.sort(np.random.default_rng(seed).choice(unseen, size=min(SST2_VAL, len(unseen)), replace=False))
    dev = datasets.shuffle_limit(datasets.load("sst2", "dev"), limit is not None, seed, limit)
    parts = {"heldout": train.subset(held), "dev": dev}
    model, out = None, []
    for part, ds in parts.items():
        size = f"-{len(ds)}" if part == "heldout" or limit is not None else ""
        file = home() / "reproduce" / model_dir.name / f"eenet-sst2-{part}{size}-len{max_len}-s{seed}.npz"
        if not file.is_file() or file.stat().st_mtime < (path / "model.safetensors").stat().st_mtime:
            model = model or MultiExitModel.load(path)
            if log:
                log(f"exporting sst2/{part} ({len(ds)} samples) with {path}")
            matrix = export_matrix(model, ds, max_len, progress=log is not None)
            matrix.meta.update(part=part, seed=seed, model=str(path))
            matrix.save(file)
        matrix = ConfidenceMatrix.load(file)
        matrix.meta["path"] = str(file)
        matrix.meta["about"] = (f"SST-2 train phrases the model never saw ({len(ds)} of {len(unseen)}, seed {seed})"
                                if part == "heldout" else "GLUE SST-2 dev" + (f", {limit} shuffled" if limit else ""))
        out.append(matrix)
    return out[0], out[1]


def prepare_matrices(names: list[str], *, limit: int | None = None, seed: int = 0, backbone: str = "default",
                     train_limit: int | None = None, max_len: int | None = None, threads: int = 2,
                     log=None) -> dict[str, tuple[Any, Any]]:
    """``{dataset: (validation, test)}``: SST-2 from the default model, AG News by :func:`policies.indomain.prepare`."""
    import torch

    from policies import indomain

    torch.set_num_threads(threads)
    out: dict[str, tuple[Any, Any]] = {}
    for name in names:
        if name == "sst2":
            out[name] = _sst2(limit=limit, seed=seed, backbone=backbone, train_limit=train_limit,
                              max_len=max_len or 64, log=log)
            continue
        m = indomain.prepare(name, seed=seed, backbone=backbone, train_limit=train_limit, max_len=max_len,
                             threads=threads, log=log)
        if max_len and m["test"].meta.get("max_len") != max_len and log:
            log(f"{name}: the cached matrices were exported at {m['test'].meta.get('max_len')} tokens, not {max_len}")
        test = m["test"]
        if limit is not None:
            test = test.subset(np.sort(np.random.default_rng(seed).permutation(test.num_samples)[:limit]))
        out[name] = (m["val"], test)
    return out


def main(args, log) -> int:
    """``exitflow reproduce eenet``: prepare the matrices, run every budget, print the table, write the artifacts."""
    from policies.indomain import RECIPES

    names = [d.strip() for d in (args.datasets or ",".join(DATASETS)).split(",") if d.strip()]
    unknown = [d for d in names if d != "sst2" and d not in RECIPES]
    if unknown:
        raise ConfigError(f"--datasets: no EENet protocol for {unknown}; expected sst2 or one of {sorted(RECIPES)}")
    matrices = prepare_matrices(names, limit=args.limit, seed=args.seed, backbone=args.backbone,
                                train_limit=args.train_limit, max_len=args.max_len, threads=args.threads, log=log)
    result = run(matrices, sweep=not args.no_sweep, seed=args.seed, log=log)
    result["settings"] = {"datasets": names, "limit": args.limit, "seed": args.seed, "backbone": args.backbone,
                          "train_limit": args.train_limit, "max_len": args.max_len, "sst2_validation": SST2_VAL}
    print(table(result))
    for path in write(result, args.out):
        print(f"wrote {path}")
    return 0
