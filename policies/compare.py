"""Several policies side by side on one matrix: specs, calibration on a labelled split, table, plots.

``exitflow eval`` is a thin wrapper around :func:`compare` and :func:`table`. A policy that needs a
labelled validation split (``calibration`` parameter) is calibrated on ``--calibration`` (once per
calibration function, cost model and settings, so SplitEE, SplitEE-S and Random-exit share one α).

>>> parse_spec("splitee-s[side_info=oracle,beta=2]")
('splitee-s', {'side_info': 'oracle', 'beta': '2'})
>>> expand_specs("splitee,splitee-s[side_info=oracle,beta=2]")
['splitee', 'splitee-s[side_info=oracle,beta=2]']
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np

from stream.errors import ConfigError

from policies.base import Policy
from policies.evaluate import evaluate, evaluate_ordered

#: ``--policy all``: every registered policy, plus SplitEE-S with the paper's side information.
EXTRA_SPECS = ("splitee-s[side_info=oracle]",)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``'splitee-s[side_info=oracle,beta=2]'`` → ``('splitee-s', {'side_info': 'oracle', 'beta': '2'})``."""
    name, _, rest = spec.strip().partition("[")
    params: dict[str, str] = {}
    if rest:
        if not rest.endswith("]"):
            raise ConfigError(f"eval: policy spec {spec!r} must look like NAME or NAME[key=value,...]")
        for item in filter(None, rest[:-1].split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"eval: policy spec {spec!r}: {item!r} is not key=value")
            params[key.strip()] = value.strip()
    return name.strip(), params


def expand_specs(policies: str) -> list[str]:
    """``all`` or a comma list of specs (commas inside [...] belong to the spec)."""
    from policies.registry import registry

    if policies.strip() == "all":
        return sorted(registry()) + list(EXTRA_SPECS)
    out, depth, cur = [], 0, ""
    for ch in policies:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [s.strip() for s in out + [cur] if s.strip()]


def settings(cls) -> tuple[set[str], set[str]]:
    """The settings a policy class takes: constructor keywords, and its calibration's keywords."""
    from policies.registry import parameters

    cal = set()
    if hasattr(cls, "calibrate"):
        cal = {k for k, p in inspect.signature(cls.calibrate).parameters.items()
               if p.kind is p.KEYWORD_ONLY and k != "cost"}
    return set(parameters(cls)), cal


class Calibrator:
    """Builds policies for evaluation, calibrating on a labelled matrix where a policy needs it (cached)."""

    def __init__(self, matrix=None) -> None:
        self.matrix = matrix
        self._cache: dict[tuple, dict] = {}

    def calibrate(self, cls, cost, params: dict[str, Any]) -> dict:
        from policies.registry import _coerce

        fn = cls.calibrate
        sig = inspect.signature(fn).parameters
        kwargs = {k: _coerce(cls.name, k, v, sig[k].default) for k, v in params.items()
                  if k in sig and sig[k].kind is sig[k].KEYWORD_ONLY and k != "cost"}
        owner = getattr(fn, "__self__", None)  # a classmethod calibrates per class; a function is shared
        key = (fn.__module__, fn.__qualname__, owner, cost, tuple(sorted(kwargs.items())))
        if key not in self._cache:
            self._cache[key] = fn(self.matrix, cost=cost, **kwargs)
        return self._cache[key]

    def build(self, spec: str, shared: dict[str, str], cost, num_layers: int, num_classes: int,
              strict: bool = True) -> Policy:
        """Policy for ``spec``; ``shared`` (--set) keys it does not take are an error only when ``strict``."""
        from policies.registry import build, registry

        name, own = parse_spec(spec)
        classes = registry()
        if name not in classes:
            raise ConfigError(f"unknown policy {name!r}; expected one of {', '.join(sorted(classes))} or all")
        cls = classes[name]
        own_keys, cal_keys = settings(cls)
        merged = {**shared, **own}
        unknown = set(own) - own_keys - cal_keys if not strict else set(merged) - own_keys - cal_keys
        if unknown:
            raise ConfigError(f"policy {name!r}: unknown parameter(s) {sorted(unknown)}; it takes "
                              f"{sorted(own_keys | cal_keys) or 'none'}")
        params = {k: v for k, v in merged.items() if k in own_keys}
        if "calibration" in own_keys and "calibration" not in params and self.matrix is not None:
            params["calibration"] = self.calibrate(cls, cost, {k: v for k, v in merged.items() if k in cal_keys})
        return build(name, params, cost=cost, num_layers=num_layers, num_classes=num_classes)


def label(spec: str) -> str:
    return spec.replace(" ", "")


def compare(specs: list[str], matrix, *, cost, shared: dict[str, str] | None = None, calibration=None,
            runs: int = 1, seed: int = 0, batch_size: int = 32, feedback_delay: int = 0,
            log=None, segments: list[tuple[str, int, int]] | None = None, hook=None) -> list[dict[str, Any]]:
    """Evaluate several policy specs on ``matrix``; specs that cannot be built in an ``all`` run are skipped.

    ``calibration``: the labelled validation matrix, or a :class:`Calibrator` to share its calibrations.
    ``segments``: ``(name, start, end)`` of matrices kept in order (:func:`policies.evaluate.concat_segments`):
    each run reshuffles within segments only, and regret is dynamic (:func:`policies.evaluate.evaluate_ordered`).
    ``hook``: a :class:`policies.evaluate.DriftHook` run beside every policy (the device worker's drift hook).
    """
    shared = dict(shared or {})
    strict = len(specs) == 1
    cal = calibration if isinstance(calibration, Calibrator) else Calibrator(calibration)
    reference = None
    try:
        reference = cal.build("splitee", shared, cost, matrix.num_layers, matrix.num_classes, strict=False)
    except ConfigError:
        pass
    if shared and not strict:
        from policies.registry import registry

        known = set().union(*(a | c for a, c in map(settings, registry().values())))
        unknown = set(shared) - known
        if unknown:
            raise ConfigError(f"eval: no policy takes parameter(s) {sorted(unknown)}")
    reports = []
    for spec in specs:
        try:
            policy = cal.build(spec, shared, cost, matrix.num_layers, matrix.num_classes, strict=strict)
        except ConfigError as exc:
            if strict:
                raise
            if log:
                log(f"skipping {spec}: {exc}")
            continue
        kw = dict(runs=runs, seed=seed, batch_size=batch_size, feedback_delay=feedback_delay, reference=reference,
                  hook=hook)
        report = (evaluate(policy, matrix, **kw) if segments is None
                  else evaluate_ordered(policy, matrix, segments, **kw))
        report["spec"] = label(spec)
        reports.append(report)
        if log:
            log(f"{label(spec)}: done")
    return reports


def table(reports: list[dict[str, Any]]) -> str:
    """The comparison, shaped like SplitEE Table 2 / DIMEE Table I: accuracy and cost against final exit."""
    head = (f"{'policy':<30} {'acc %':>6} {'Δacc':>6} {'cost/λ':>7} {'Δcost':>7} {'offload':>7} "
            f"{'dev/edge/cloud %':>17} {'arm':>7} {'regret/T':>9}")
    lines = [head, "-" * len(head)]
    for r in reports:
        acc = "   n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:6.1f}"
        drop = "   n/a" if r["accuracy"] is None else f"{-100 * r['accuracy_drop']:+6.1f}"
        tiers = "/".join(f"{100 * r['tiers'][t] / r['samples']:.0f}" for t in ("device", "edge", "cloud"))
        arm = f"{r['most_played_arm'] or '-'}/{r['best_fixed_arm']}"
        if "segments" in r:   # ordered: per segment, in order
            arm = "/".join("→".join(str(s[k] or "-") for s in r["segments"]) for k in ("most_played_arm", "best_fixed_arm"))
        rpt = r["regret"] / r["samples"]
        lines.append(f"{r.get('spec', r['policy']):<30} {acc} {drop} {r['cost']:7.2f} "
                     f"{100 * (r['cost_ratio'] - 1):+6.1f}% {r['offload_rate']:7.2f} {tiers:>17} {arm:>7} "
                     f"{rpt:9.4f}")
    if reports:
        r = reports[0]
        fe = r["final_exit_accuracy"]
        lines.append(f"final exit: accuracy {'n/a' if fe is None else f'{100 * fe:.1f}%'}, cost "
                     f"{r['final_exit_cost']:.2f} λ per sample ({r['cost_model']} cost model, o = "
                     f"{r['offload_cost']:g}λ, o/(λL) = {r['offload_ratio']:.3f}, μ = {r['mu']:g}); Δ against it. arm = most played / best fixed (hindsight); "
                     f"regret/T after {r['samples']} samples, mean of {r['runs']} runs")
        if "segments" in r:
            lines.append("in order: " + " → ".join(f"{s['name']} ({s['samples']})" for s in r["segments"])
                         + "; regret is dynamic (vs the best fixed arm of each segment)")
    return "\n".join(lines)


def segments_table(reports: list[dict[str, Any]]) -> str:
    """Ordered evaluations, per policy and segment: best fixed and most played arm, regret, regret after the
    boundary (its first 500 samples, mean ± std over the runs); with the drift hook, the epochs it started in
    the segment (mean per run) and the median delay of the first one after the boundary."""
    hooked = any("drift_hook" in r for r in reports)
    head = f"{'policy':<30} {'segment':<16} {'best':>4} {'most':>4} {'regret':>8} {'first 500':>16} {'acc %':>6} {'cost/λ':>7}"
    head += f" {'epochs':>6} {'delay':>5}" if hooked else ""
    lines = [head, "-" * len(head)]
    for r in reports:
        for s in r.get("segments", []):
            acc = "   n/a" if s["accuracy"] is None else f"{100 * s['accuracy']:6.1f}"
            first = f"{s['regret_first_500']:.2f} ± {s['regret_first_500_std']:.2f}"
            line = (f"{r.get('spec', r['policy']):<30} {s['name'][:16]:<16} {s['best_fixed_arm']:>4} "
                    f"{s['most_played_arm'] or '-':>4} {s['regret']:8.2f} {first:>16} {acc} {s['cost']:7.2f}")
            if hooked:
                delay = "-" if s.get("detection_delay") is None else f"{s['detection_delay']:.0f}"
                line += f" {s.get('epochs', 0):6.2f} {delay:>5}"
            lines.append(line)
    return "\n".join(lines)


def offload_sweep(specs: list[str], matrix, *, cost, offloads=(1, 2, 3, 4, 5), depth_scaled: bool = True,
                  **kw) -> dict[str, Any]:
    """Accuracy and cost of each spec for offload costs o (SplitEE Figs. 3–6); α recalibrated per o.

    ``offloads`` are the paper's figures for 12 layers; with ``depth_scaled`` each is used as o·L/12 on the
    matrix's L layers (the ratio o/(λL) carries over), otherwise literally. ``offload`` lists what was used.
    """
    from stream.costs import scaled

    used = [scaled(float(o), matrix.num_layers) if depth_scaled else float(o) for o in offloads]
    out: dict[str, Any] = {"offload": used, "offload_paper": list(offloads), "depth_scaled": depth_scaled,
                           "accuracy": {}, "cost": {}, "cost_ratio": {}}
    for o in used:
        overrides = {"offload_cloud": float(o)}
        if cost.name != "dimee":
            overrides["offload_edge"] = float(o)
        for r in compare(specs, matrix, cost=cost.with_overrides(**overrides), **kw):
            for key in ("accuracy", "cost", "cost_ratio"):
                out[key].setdefault(r["spec"], []).append(r[key])
    return out


def plot_regret(reports: list[dict[str, Any]], path: str | Path) -> Path:
    """Mean cumulative regret against the best fixed arm (SplitEE Fig. 7); ordered runs: dynamic regret,
    the boundaries marked."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, r in enumerate(reports):
        curve = r.get("regret_curve")
        if curve is None or r["regret_kind"] != "pseudo":
            continue
        ax.plot(np.arange(1, len(curve) + 1), curve, label=r["spec"], linestyle=("-", "--", "-.", ":")[k % 4])
    segments = next((r["segments"] for r in reports if "segments" in r), None)
    for s in (segments or [])[1:]:    # ordered runs: the boundaries, each labelled with the segment it opens
        ax.axvline(s["start"] + 0.5, color="0.4", linewidth=0.8, linestyle=":")
        ax.annotate(s["name"], (s["start"] + 0.5, 1), xycoords=("data", "axes fraction"), fontsize=7,
                    rotation=90, va="top", ha="right", color="0.3")
    ax.set_xlabel("samples")
    ax.set_ylabel("cumulative regret (vs best fixed split" + (" of each segment)" if segments else ")"))
    ax.set_title(f"regret, mean of {reports[0]['runs']} runs" if reports else "regret")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on servers and in CI)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> Path:
    """Write a figure as PNG (creating its folder) and free it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(sweep: dict[str, Any], path: str | Path) -> Path:
    """Accuracy and cost against the offload cost o, one line per policy."""
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = plt.get_cmap("tab20").colors
    for k, (spec, accs) in enumerate(sweep["accuracy"].items()):
        style = {"marker": "os^vD"[k % 5], "color": colors[k % len(colors)], "label": spec}
        if accs[0] is not None:
            left.plot(sweep["offload"], [100 * a for a in accs], **style)
        right.plot(sweep["offload"], sweep["cost"][spec], **style)
    left.set_xlabel("offload cost o (λ)")
    left.set_ylabel("accuracy %")
    right.set_xlabel("offload cost o (λ)")
    right.set_ylabel("cost per sample (λ)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def thin_curve(curve: list[float], points: int = 400) -> dict[str, list]:
    """A regret curve subsampled for JSON: sample counts and values."""
    t = len(curve)
    idx = sorted(set(np.unique(np.linspace(1, t, min(points, t)).astype(int)).tolist()))
    return {"t": idx, "regret": [curve[i - 1] for i in idx]}
