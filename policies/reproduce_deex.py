"""`exitflow reproduce deex`: DEEx Figs. 3-5 (exit shares, inference time, accuracy vs p_d) on our model.

The paper (DEEx §IV-V) sweeps the decision threshold p_d of a three-exit BranchyNet on CIFAR-10 and
plots, as functions of p_d, the share of samples at each exit, the time to infer the test set and the
accuracy of each exit on the samples it received; p_cross is where the early exit's accuracy passes the
backbone's. We sweep p_d (1/C..1 in steps of 0.01, plus 0.995 and 0.999) on SST-2 dev (872) and 2,000
shuffled IMDb test reviews with the default SST-2 model (6 layers), in two shapes of the policy:

* ``paper`` (``max_layer=2``): the paper's three exits: exit 1 decides, exit 2 infers every sample kept
  (EE N-1, so p_tar is unused), the backbone (exit 6) runs in the cloud;
* ``deep`` (``max_layer=5``, ``p_tar=0.9``): device exits 2..5 at p_tar, exit 5 infers the rest.

Time is measured on this machine, not counted in λ: embeddings, each layer and each exit head of the real
model at batch 1 (the paper's streaming setting, a sample at a time), median of ``runs`` repeats, at a
ladder of token lengths, interpolated at each sample's real token length (tokenisation excluded). A
sample's time is what ran for it on the device, plus, if offloaded, a :class:`Link`: RTT + its float16
hidden state (tokens × hidden × 2 bytes) over the uplink + the cloud's remaining layers and final head
divided by ``cloud_speedup``. Reading ``paper`` is the paper's Fig. 4 (no communication delay, the
backbone on the same machine); reading ``network`` assumes 20 Mbit/s, 20 ms RTT and a 10× faster cloud (the
paper gives no figures for these). Beside: the λ cost of the same decisions under ``preset("splitee")``
for 6 layers (o = 2.5λ) and as printed (o = 5λ).

Crossings: ``p_cross`` (the paper's, Fig. 5) is the first p_d from which on the device exits' accuracy on
the samples they keep is at least the backbone's on the samples it receives (where each holds ≥ 1%);
``p_match`` the first at which the overall accuracy reaches the backbone's (p_d = 1, all offloaded). The
time saving at each is against p_d = 1. DEEx decides each sample alone, so runs differ only in timing;
the sweep uses :meth:`Deex.route`, checked against ``exitflow eval``'s decision loop at the paper's p_d.

Why DEEx "never offloads at o = 5λ": see :mod:`policies.deex`; the ``calibration`` rows show the
calibrated p_d under 5λ, 2.5λ and measured milliseconds, and where an offload would pay.

>>> t = Timing([10, 30], [1.0, 3.0], [[1.0] * 2, [3.0] * 2], [[0.1] * 2, [0.3] * 2], hidden_size=4)
>>> link = Link(rtt_ms=5.0, mbps=0.128)          # 20 tokens × 4 × 2 bytes = 1280 bits: 10 ms on the wire
>>> sample_times(t, [20, 20], stop=[1, 1], offload=[False, True], link=link).round(2).tolist()
[4.2, 21.4]
>>> p_grid(2, fine=False).tolist()[:4]
[0.5, 0.55, 0.6, 0.65]
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream.errors import ConfigError

from policies.deex import Deex, offload_pays, path_costs
from policies.reproduce import paper_table

DATASETS = ("sst2", "imdb")
SHAPES = {"paper": {"max_layer": 2, "p_tar": 0.9}, "deep": {"max_layer": 5, "p_tar": 0.9}}
PAPER_PD = (0.2, 0.55, 0.75, 0.85)
LENGTHS = (8, 16, 24, 32, 48, 64, 96, 128)
MIN_SHARE = 0.01
PAPER_NAMES = {"cifar10-binary": "binary", "cifar10": "full"}
LABELS = {"accuracy": "all", "accuracy_device": "device exits", "accuracy_cloud": "backbone"}


@dataclasses.dataclass(frozen=True)
class Link:
    """How an offloaded sample reaches the cloud, and how fast the cloud runs a layer relative to us."""

    rtt_ms: float = 0.0
    mbps: float = math.inf
    cloud_speedup: float = 1.0

    def comm_ms(self, nbytes):
        return self.rtt_ms + np.asarray(nbytes, dtype=np.float64) * 8 / (self.mbps * 1e3)


LINKS = {"paper": Link(), "network": Link(rtt_ms=20.0, mbps=20.0, cloud_speedup=10.0)}


@dataclasses.dataclass
class Timing:
    """Median ms at batch 1 by token length: embeddings [T], each layer [T, L], each exit head [T, L]."""

    lengths: list[int]
    embed: list[float]
    layers: list[list[float]]
    heads: list[list[float]]
    hidden_size: int
    meta: dict = dataclasses.field(default_factory=dict)

    def pieces(self, tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The three tables interpolated linearly at each sample's token length (clamped at the ends)."""
        x, t = np.asarray(self.lengths, float), np.asarray(tokens, float)
        at = lambda table: np.stack([np.interp(t, x, col) for col in np.asarray(table, float).T], 1)  # noqa: E731
        return np.interp(t, x, self.embed), at(self.layers), at(self.heads)


def _ms(fn) -> float:
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1e6


def measure_timing(model, *, lengths=LENGTHS, repeats: int = 20, threads: int = 2, log=None) -> Timing:
    """Time ``model``'s pieces on this machine (synthetic ids, batch 1); ``meta['check']`` compares their sum
    with one uninterrupted pass through every layer and exit at each length."""
    import platform

    import torch

    torch.set_num_threads(threads)
    layers = model.num_layers
    out: dict[str, list] = {"embed": [], "layers": [], "heads": []}
    check = {}
    with torch.inference_mode():
        for length in lengths:
            mask = torch.ones(1, length, dtype=torch.long)
            batch = {"input_ids": torch.randint(1000, 20000, (1, length)), "attention_mask": mask,
                     "token_type_ids": torch.zeros_like(mask)}
            states = [model.start(batch)[0]]
            for k in range(layers):
                states.append(model.run(states[-1], mask, k, k + 1, exits=[])[0])
            layer = [lambda k=k: model.run(states[k], mask, k, k + 1, exits=[]) for k in range(layers)]
            head = [lambda k=k: torch.softmax(model.heads[k](states[k + 1], mask), -1) for k in range(layers)]
            whole = lambda: model.run(*model.start(batch), 0, layers, exits="each")  # noqa: E731
            pieces = [lambda: model.start(batch), *layer, *head, whole]
            rows = [[_ms(fn) for fn in pieces] for _ in range(repeats + 2)]  # the first two warm up
            med = np.median(np.asarray(rows[2:]), 0)
            out["embed"].append(float(med[0]))
            out["layers"].append(med[1:1 + layers].tolist())
            out["heads"].append(med[1 + layers:1 + 2 * layers].tolist())
            check[str(length)] = {"sum_of_pieces_ms": round(float(med[:-1].sum()), 4),
                                  "one_pass_ms": round(float(med[-1]), 4)}
            if log:
                log(f"timing at {length} tokens: layer {np.mean(out['layers'][-1]):.3f} ms, head "
                    f"{np.mean(out['heads'][-1]):.3f} ms, pieces {med[:-1].sum():.2f} ms vs one pass {med[-1]:.2f} ms")
    meta = {"batch_size": 1, "repeats": repeats, "statistic": "median", "threads": threads,
            "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "model": str(model.path), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "check": check}
    return Timing(list(lengths), out["embed"], out["layers"], out["heads"], model.hidden_size, meta)


def sample_times(timing: Timing, tokens, stop, offload, link: Link) -> np.ndarray:
    """Ms per sample: embeddings + ``stop`` layers with their exits on the device; if offloaded, + the link
    (RTT + float16 hidden state) + the remaining layers and the final head at the cloud's speed."""
    embed, layer, head = timing.pieces(tokens)
    rows, k = np.arange(len(embed)), np.asarray(stop) - 1
    device = embed + np.cumsum(layer + head, 1)[rows, k]
    cloud = (layer.sum(1) - np.cumsum(layer, 1)[rows, k] + head[:, -1]) / link.cloud_speedup
    comm = link.comm_ms(np.asarray(tokens) * timing.hidden_size * 2)
    return device + np.asarray(offload, bool) * (comm + cloud)


def measured_cost(timing: Timing, tokens, link: Link):
    """A :class:`~stream.costs.CostModel` in milliseconds at the median token length (for calibration and
    :func:`policies.deex.offload_pays`); the embeddings, common to every path, are left out."""
    from stream.costs import CostModel

    t = float(np.median(tokens))
    _, layer, head = (a[0] for a in timing.pieces([t]))
    return CostModel(name="measured-ms", device_layer=float(layer.mean()), device_exit=float(head.mean()),
                     cloud_layer=float(layer.mean()) / link.cloud_speedup, offload_edge=0.0,
                     offload_cloud=float(link.comm_ms(t * timing.hidden_size * 2)),
                     cloud_fee=float(head[-1]) / link.cloud_speedup)


def break_even(timing: Timing, tokens, link: Link, num_layers: int, max_layer: int) -> dict:
    """When an offload after the decision exit beats staying to ``max_layer`` (median token length): the most the
    link may take (device layers 2..max_layer minus the cloud's 2..L and final head), and the uplink that
    needs at the link's RTT (``None``: no uplink is fast enough)."""
    cost = measured_cost(timing, tokens, Link(cloud_speedup=link.cloud_speedup))
    budget = (max_layer - 1) * cost.lam - (num_layers - 1) * cost.cloud_layer - cost.cloud_fee
    bits = float(np.median(tokens)) * timing.hidden_size * 16
    return {"budget_ms": budget, "rtt_ms": link.rtt_ms, "cloud_speedup": link.cloud_speedup,
            "mbps_needed": bits / ((budget - link.rtt_ms) * 1e3) if budget > link.rtt_ms else None}


def p_grid(num_classes: int, fine: bool = True) -> np.ndarray:
    """1/C..1 in steps of 0.01 (0.05 if not ``fine``), the paper's values above 1/C, and 0.995, 0.999."""
    step = 0.01 if fine else 0.05
    lo = math.ceil(round(1 / num_classes / step, 6)) * step
    extra = [p for p in PAPER_PD if p >= 1 / num_classes] + ([0.995, 0.999] if fine else [])
    return np.unique(np.round(np.concatenate([np.arange(lo, 1 + 1e-9, step), extra]), 4))


def sweep(matrix, timing: Timing, tokens, *, max_layer: int, p_tar: float, grid, links=None, costs=None) -> dict:
    """Per p_d: exit shares, accuracy (overall, device-kept, cloud-received), ms per sample per link, λ costs."""
    from stream.costs import preset

    links = LINKS if links is None else links
    if costs is None:
        costs = {"o=2.5λ": preset("splitee", num_layers=matrix.num_layers), "o=5λ": preset("splitee")}
    if matrix.labels is None:
        raise ConfigError("reproduce deex: the matrix needs labels")
    probs, layers = matrix.probs.astype(np.float64), matrix.num_layers
    correct = probs.argmax(-1) == matrix.labels[:, None]
    out: dict[str, Any] = {"max_layer": max_layer, "p_tar": p_tar, "p_d": [],
                           "shares": {"cloud": [], **{f"exit {k}": [] for k in range(2, max_layer + 1)}},
                           "accuracy": [], "accuracy_device": [], "accuracy_cloud": [],
                           "time_ms": {name: [] for name in links}, "cost": {name: [] for name in costs}}
    for p_d in grid:
        policy = Deex(cost=preset("splitee"), num_layers=layers, num_classes=matrix.num_classes, p_d=float(p_d),
                      p_tar=p_tar, max_layer=max_layer)
        stop, off = policy.route(probs)
        ok = correct[np.arange(len(stop)), np.where(off, layers, stop) - 1]
        out["p_d"].append(float(p_d))
        out["shares"]["cloud"].append(float(off.mean()))
        for k in range(2, max_layer + 1):
            out["shares"][f"exit {k}"].append(float(((stop == k) & ~off).mean()))
        out["accuracy"].append(float(ok.mean()))
        out["accuracy_device"].append(float(ok[~off].mean()) if (~off).any() else None)
        out["accuracy_cloud"].append(float(ok[off].mean()) if off.any() else None)
        for name, link in links.items():
            out["time_ms"][name].append(float(sample_times(timing, tokens, stop, off, link).mean()))
        for name, cost in costs.items():
            out["cost"][name].append(float(path_costs(cost, stop, off, layers).mean()))
    return out


def crossings(sw: dict, min_share: float = MIN_SHARE) -> dict:
    """p_cross and p_match (see the module docstring), each with its shares, accuracy and time saving."""
    p = np.asarray(sw["p_d"])
    if p[-1] != 1.0:
        raise ConfigError("reproduce deex: the p_d grid must end at 1 (the backbone)")
    cloud = np.asarray(sw["shares"]["cloud"])
    nan = lambda xs: np.array([np.nan if x is None else x for x in xs])  # noqa: E731
    dev, rem, acc = nan(sw["accuracy_device"]), nan(sw["accuracy_cloud"]), np.asarray(sw["accuracy"])
    valid = (cloud >= min_share) & (1 - cloud >= min_share)
    below = valid & (dev < rem)
    stays = np.flip(np.cumsum(np.flip(below))) == 0                      # no valid p_d from here on is below

    def point(i):
        if i is None:
            return None
        return {"p_d": float(p[i]), "early_share": float(1 - cloud[i]), "accuracy": float(acc[i]),
                "accuracy_device": sw["accuracy_device"][i], "accuracy_cloud": sw["accuracy_cloud"][i],
                "time_saving": {n: 1 - t[i] / t[-1] for n, t in sw["time_ms"].items()},
                "cost_saving": {n: 1 - c[i] / c[-1] for n, c in sw["cost"].items()}}

    first = lambda mask: int(np.argmax(mask)) if mask.any() else None  # noqa: E731
    i_cross = first(valid & stays)
    return {"backbone_accuracy": float(acc[-1]), "offload_begins": float(p[first(cloud > 0)]),
            "crossed": bool(i_cross is not None and (valid[:i_cross] & (dev[:i_cross] < rem[:i_cross])).any()),
            "p_cross": point(i_cross), "p_match": point(first(acc >= acc[-1] - 1e-12)), "all_early": point(0)}


def check_eval_loop(matrix, sw: dict, p_ds=PAPER_PD) -> float:
    """Largest gap between the sweep and ``exitflow eval``'s streamed decision loop at the paper's p_d."""
    from policies.evaluate import evaluate
    from policies.registry import build
    from stream.costs import preset

    gap = 0.0
    for p_d in (p for p in p_ds if p in sw["p_d"]):
        i = sw["p_d"].index(p_d)
        settings = {"p_d": str(p_d), "p_tar": str(sw["p_tar"]), "max_layer": str(sw["max_layer"])}
        r = evaluate(build("deex", settings, cost=preset("splitee", num_layers=matrix.num_layers),
                           num_layers=matrix.num_layers, num_classes=matrix.num_classes), matrix, keep_curve=False)
        gap = max(gap, abs(r["accuracy"] - sw["accuracy"][i]), abs(r["offload_rate"] - sw["shares"]["cloud"][i]),
                  abs(r["cost"] - sw["cost"]["o=2.5λ"][i]) if "o=2.5λ" in sw["cost"] else 0.0)
    return gap


def calibrations(validation, tokens, timing: Timing, targets: dict) -> list[dict]:
    """``Deex.calibrate`` on the labelled validation matrix under 5λ, 2.5λ and measured ms, per shape, and
    the share of each target it then offloads."""
    from stream.costs import preset

    costs = {"o=5λ": preset("splitee"), "o=2.5λ": preset("splitee", num_layers=validation.num_layers),
             **{f"ms, {n} link": measured_cost(timing, tokens, link) for n, link in LINKS.items()}}
    rows = []
    for shape, spec in SHAPES.items():
        for name, cost in costs.items():
            cal = Deex.calibrate(validation, cost=cost, max_layer=spec["max_layer"])
            policy = Deex(cost=cost, num_layers=validation.num_layers, num_classes=validation.num_classes,
                          calibration=cal)
            rows.append({"shape": shape, "cost_model": name, "p_d": cal["p_d"], "p_tar": cal["p_tar"],
                         "offload_pays_from": cal["offload_pays_from"], **cal["validation"],
                         "targets": {d: {"offloaded": float(policy.route(m.probs.astype(np.float64))[1].mean())}
                                     for d, m in targets.items()}})
    return rows


def run(matrices: dict, timing: Timing, tokens: dict, *, calibration=None, fine: bool = True, log=None) -> dict:
    """Sweeps and crossings for ``{dataset: matrix}`` with per-dataset token lengths, and the calibration rows
    for ``calibration`` = (labelled validation matrix, its token lengths)."""
    paper = paper_table("deex")
    links = {n: {k: None if v == math.inf else v for k, v in dataclasses.asdict(link).items()}  # JSON has no inf
             for n, link in LINKS.items()}
    out: dict[str, Any] = {"paper": paper["paper"], "timing": dataclasses.asdict(timing), "links": links,
                           "shapes": SHAPES, "min_share": MIN_SHARE, "sweeps": {}, "calibration": []}
    for dataset, matrix in matrices.items():
        out["sweeps"][dataset] = {}
        for shape, spec in SHAPES.items():
            if log:
                log(f"{dataset}: {shape} shape (max_layer {spec['max_layer']}), {matrix.num_samples} samples")
            sw = sweep(matrix, timing, tokens[dataset], grid=p_grid(matrix.num_classes, fine), **spec)
            gap = check_eval_loop(matrix, sw)
            if gap > 1e-9:
                raise ConfigError(f"reproduce deex: {dataset}/{shape}: the sweep and `exitflow eval`'s decision "
                                  f"loop disagree by {gap:g}")
            sw.update(crossings(sw), eval_loop_gap=gap, samples=matrix.num_samples,
                      mean_tokens=float(np.mean(tokens[dataset])),
                      break_even={n: break_even(timing, tokens[dataset], link, matrix.num_layers, spec["max_layer"])
                                  for n, link in LINKS.items()})
            out["sweeps"][dataset][shape] = sw
    if calibration is not None:
        if log:
            log("calibrating DEEx on the validation matrix under 5λ, 2.5λ and measured ms")
        out["calibration"] = calibrations(*calibration, timing, matrices)
    return out


def _break_even_text(b: dict) -> str:
    if b["budget_ms"] <= 0:
        return f"never (cloud ×{b['cloud_speedup']:g}: its remaining layers alone take longer)"
    need = "no uplink is fast enough" if b["mbps_needed"] is None else f"≥ {b['mbps_needed']:.0f} Mbit/s"
    return f"if it takes < {b['budget_ms']:.2f} ms (cloud ×{b['cloud_speedup']:g}; {need} at {b['rtt_ms']:g} ms RTT)"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def table(result: dict) -> str:
    """Per dataset and shape, rows of p_d (0.05 steps, p_cross, p_match); then ours beside the paper's figures."""
    blocks = []
    for dataset, shapes in result["sweeps"].items():
        for shape, sw in shapes.items():
            exits = list(sw["shares"])
            head = (f"{'p_d':>6} " + " ".join(f"{e.replace('exit ', 'e'):>5}" for e in exits)
                    + f" {'acc %':>6} {'dev %':>6} {'cld %':>6} "
                    + " ".join(f"{'ms ' + n:>9} {'vs bb':>6}" for n in sw["time_ms"])
                    + " " + " ".join(f"{n:>7}" for n in sw["cost"]))
            lines = [f"{dataset} · {shape} shape (decision exit 1, device exits 2..{sw['max_layer']}, p_tar "
                     f"{sw['p_tar']:g}; backbone = exit 6 in the cloud), {sw['samples']} samples, "
                     f"{sw['mean_tokens']:.0f} tokens on average", head, "-" * len(head)]
            marks = {(sw[k] or {}).get("p_d"): k for k in ("p_match", "p_cross")}
            for i, p in enumerate(sw["p_d"]):
                if not (abs(p * 20 - round(p * 20)) < 1e-9 or p in marks):
                    continue
                times = " ".join(f"{t[i]:9.2f} {100 * (t[i] / t[-1] - 1):+5.1f}%" for t in sw["time_ms"].values())
                lines.append(f"{p:6.3f} " + " ".join(f"{_pct(sw['shares'][e][i]):>5}" for e in exits)
                             + f" {_pct(sw['accuracy'][i]):>6} {_pct(sw['accuracy_device'][i]):>6} "
                             f"{_pct(sw['accuracy_cloud'][i]):>6} {times} "
                             + " ".join(f"{c[i]:7.2f}" for c in sw["cost"].values()) + f" {marks.get(p, '')}")
            lines.append(f"an offload after exit 1 is faster than staying to exit {sw['max_layer']}: "
                         + "; ".join(f"{n} link {_break_even_text(b)}" for n, b in sw["break_even"].items()))
            blocks.append("\n".join(lines))
    blocks.append(beside(result))
    if result["calibration"]:
        head = (f"{'shape':<6} {'calibrated under':<17} {'p_d':>6} {'p_tar':>6} {'acc %':>6} {'offload %':>9} "
                f"{'pays from':>9}  targets")
        lines = ["calibration on SST-2 dev (Deex.calibrate, tolerance 1 pt of the final exit)", head, "-" * len(head)]
        for r in result["calibration"]:
            targets = ", ".join(f"{d} {_pct(t['offloaded'])}% offloaded" for d, t in r["targets"].items())
            pays = "never" if r["offload_pays_from"] is None else f"exit {r['offload_pays_from']}"
            lines.append(f"{r['shape']:<6} {r['cost_model']:<17} {r['p_d']:6.3f} {r['p_tar']:6.3f} "
                         f"{_pct(r['accuracy']):>6} {_pct(r['offloaded']):>9} {pays:>9}  {targets}")
        blocks.append("\n".join(lines))
    meta = result["timing"]["meta"]
    links = "; ".join(f"{n}: RTT {v['rtt_ms']:g} ms, {'∞' if v['mbps'] is None else format(v['mbps'], 'g')} Mbit/s, "
                      f"cloud ×{v['cloud_speedup']:g}" for n, v in result["links"].items())
    check = ", ".join(f"{n} tok {c['sum_of_pieces_ms']:.2f}/{c['one_pass_ms']:.2f} ms"
                      for n, c in meta.get("check", {}).items())
    blocks.append(f"time: batch 1, median of {meta.get('repeats')} repeats, {meta.get('threads')} threads, at each "
                  f"sample's token length; vs bb = against p_d = 1 (all at the backbone); links ({links}); dev/cld % "
                  f"= accuracy of the device exits / the backbone on the samples each received; sum of the timed "
                  f"pieces / one uninterrupted pass: {check or 'n/a'}")
    return "\n\n".join(blocks)


def beside(result: dict) -> str:
    """Ours (paper-reading times) next to the paper's figures from ``policies/papers/deex.json``."""
    paper = paper_table("deex")["datasets"]
    cols = [(f"{d} {s}", sw) for d, shapes in result["sweeps"].items() for s, sw in shapes.items()]
    rt = lambda sw, key: None if sw[key] is None else sw[key]["time_saving"]["paper"]  # noqa: E731
    get = lambda sw, key, field: None if sw[key] is None else sw[key][field]  # noqa: E731
    metrics = [
        ("accuracy, all at the early exits", lambda sw: sw["all_early"]["accuracy"], "accuracy_early", _pct),
        ("accuracy, all at the backbone", lambda sw: sw["backbone_accuracy"], "accuracy_backbone", _pct),
        ("time saving, all early vs backbone %", lambda sw: rt(sw, "all_early"), "time_saving_early", _pct),
        ("p_d where offloading begins", lambda sw: sw["offload_begins"], "offload_begins", lambda x: f"{x:.2f}"),
        ("p_cross (early exit ≥ backbone)", lambda sw: get(sw, "p_cross", "p_d"), "p_cross",
         lambda x: "" if x is None else f"{x:.3f}"),
        ("share at the early exits at p_cross %", lambda sw: get(sw, "p_cross", "early_share"),
         "early_share_at_cross", _pct),
        ("time saving at p_cross %", lambda sw: rt(sw, "p_cross"), "time_saving_at_cross", _pct),
        ("p_match (accuracy ≥ backbone's)", lambda sw: get(sw, "p_match", "p_d"), None,
         lambda x: "" if x is None else f"{x:.3f}"),
        ("time saving at p_match %", lambda sw: rt(sw, "p_match"), None, _pct),
        ("ms per sample at the backbone", lambda sw: sw["time_ms"]["paper"][-1], "ms_per_sample_backbone",
         lambda x: f"{x:.2f}"),
    ]
    head = (f"{'':<40}" + "".join(f"{c:>13}" for c, _ in cols)
            + "".join(f"{'paper ' + PAPER_NAMES.get(d, d):>14}" for d in paper))
    lines = ["ours (time: paper link) beside DEEx (CIFAR-10 cat/dog and 10 classes, Figs. 3-5)", head, "-" * len(head)]
    for name, ours, key, fmt in metrics:
        theirs = "".join(f"{'' if key is None or paper[d].get(key) is None else fmt(paper[d][key]):>14}" for d in paper)
        lines.append(f"{name:<40}" + "".join(f"{fmt(ours(sw)):>13}" for _, sw in cols) + theirs)
    lines.append("paper time saving at p_cross: text 10% / 20%, captions of Figs. 6-7 14% / 29%; "
                 f"'crossed' (early exit below the backbone first, as in the paper): "
                 + ", ".join(f"{c} {'yes' if sw['crossed'] else 'no'}" for c, sw in cols))
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    """Figs. 3-5 per dataset and shape: exit shares, ms per sample (each link), accuracy; p_cross and p_match."""
    from policies.compare import _save, pyplot

    plt = pyplot()

    cols = [(f"{d} · {s}", sw) for d, shapes in result["sweeps"].items() for s, sw in shapes.items()]
    fig, axes = plt.subplots(3, len(cols), figsize=(4.2 * len(cols), 10), squeeze=False)
    for j, (title, sw) in enumerate(cols):
        p = sw["p_d"]
        for name, share in sw["shares"].items():
            axes[0][j].plot(p, share, label=name)
        for name, t in sw["time_ms"].items():
            axes[1][j].plot(p, t, label=f"{name} link")
        cloud = np.asarray(sw["shares"]["cloud"])
        shown = {"accuracy": np.ones_like(cloud, bool), "accuracy_device": 1 - cloud >= result["min_share"],
                 "accuracy_cloud": cloud >= result["min_share"]}
        for name in ("accuracy", "accuracy_device", "accuracy_cloud"):
            axes[2][j].plot(p, [a if a is not None and ok else np.nan for a, ok in zip(sw[name], shown[name])],
                            label=LABELS[name])
        for key, style in (("p_cross", ":"), ("p_match", "--")):
            if sw[key]:
                for ax in axes[:, j]:
                    ax.axvline(sw[key]["p_d"], color="grey", linestyle=style, linewidth=1)
        axes[0][j].set_title(title)
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
        axes[2][j].set_xlabel("p_d  (dotted: p_cross, dashed: p_match)")
    for i, label in enumerate(("share of samples", "ms per sample", "accuracy")):
        axes[i][0].set_ylabel(label)
        axes[i][-1].legend(fontsize=7)
    return _save(fig, path)


def write(result: dict, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "deex.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "deex_table.txt").write_text(table(result) + "\n")
    return [out_dir / "deex.json", out_dir / "deex_table.txt", plot(result, out_dir / "deex_pd.png")]


def token_lengths(model, matrix, max_len: int) -> np.ndarray:
    """Each matrix row's real token count (what the device ran), from its dataset by sample id."""
    from stream import datasets

    ds = datasets.load(matrix.meta["dataset"], matrix.meta["split"])
    where = {sid: i for i, sid in enumerate(ds.ids)}
    rows = [where[sid] for sid in matrix.ids]
    texts = [ds.texts[i] for i in rows]
    pairs = None if ds.text_pairs is None else [ds.text_pairs[i] for i in rows]
    enc = model.tokenizer(texts, pairs, truncation=True, max_length=max_len)
    return np.array([len(ids) for ids in enc["input_ids"]], dtype=np.int64)


def main(args, log) -> int:
    """``exitflow reproduce deex``: prepare the matrices, time the model, sweep p_d, print, write the artifacts."""
    names = [d.strip() for d in (args.datasets or ",".join(DATASETS)).split(",") if d.strip()]
    unknown = set(names) - set(DATASETS)
    if unknown:
        raise ConfigError(f"--datasets: unknown dataset(s) {sorted(unknown)}; expected some of {list(DATASETS)}")
    from stream.model import MultiExitModel

    from policies.reproduce import prepare_matrices

    max_len = args.max_len or 128
    imdb, sst2 = prepare_matrices(["imdb"], limit=args.limit or 2000, seed=args.seed, backbone=args.backbone,
                                  train_limit=args.train_limit, max_len=max_len, threads=args.threads, log=log)["imdb"]
    if args.limit is not None and args.limit < sst2.num_samples:
        sst2 = sst2.subset(np.arange(args.limit))
    matrices = {d: {"sst2": sst2, "imdb": imdb}[d] for d in names}
    model = MultiExitModel.load(sst2.meta["model"])
    tokens = {d: token_lengths(model, m, max_len) for d, m in matrices.items()}
    lengths = tuple(sorted({min(x, max_len) for x in LENGTHS} | {max_len}))
    log(f"timing {model.path} at batch 1, {args.runs} repeats, lengths {list(lengths)}")
    timing = measure_timing(model, lengths=lengths, repeats=args.runs, threads=args.threads, log=log)
    cal_tokens = tokens["sst2"] if "sst2" in tokens else token_lengths(model, sst2, max_len)
    result = run(matrices, timing, tokens, calibration=(sst2, cal_tokens), fine=not args.no_sweep, log=log)
    result["settings"] = {"command": "exitflow reproduce deex", "datasets": names, "limit": args.limit,
                          "seed": args.seed, "backbone": args.backbone, "train_limit": args.train_limit,
                          "max_len": max_len, "threads": args.threads, "timing_repeats": args.runs,
                          "matrices": {d: m.meta.get("path", "") for d, m in matrices.items()}}
    print(table(result))
    for path in write(result, args.out):
        print(f"wrote {path}")
    return 0
