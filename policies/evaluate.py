"""Offline evaluation: stream a confidence matrix through a policy with the live decision loop.

Every sample is decided by :func:`policies.engine.run_device` and, if offloaded, finished by
:func:`policies.engine.run_remote`, exactly as in the pipeline; only the layers come from the matrix
instead of the model, and the state is a :class:`MemoryStore`. Each of ``runs`` runs streams a fresh
shuffle (SplitEE §5.2 uses 20) into a fresh state, in batches of ``batch_size``: the device decides a
batch with a snapshot of the state plus what the batch has learned so far, the offloaded samples'
feedback is learned ``feedback_delay`` batches later (0: at the end of the same batch), and the batch's
deltas are then applied once per sample id.

Regret is measured against the best fixed arm in hindsight (the split layer of highest mean Eq. 1
reward over the matrix, from the policy's own ``arm_rewards`` or a reference SplitEE's). For arm
policies it is the pseudo-regret of SplitEE Eq. 3, Σ_t E[r(i*)] − E[r(i_t)]; for the others the
realized Σ_t r_{i*}(x_t) − r(x_t), with r(x_t) = C − μ·cost of what the policy really did.

>>> from stream.costs import splitee
>>> from policies.registry import build
>>> m = synthetic_matrix(200, layers=4, seed=1)
>>> p = build("final-exit", cost=splitee(), num_layers=4)
>>> r = evaluate(p, m, runs=1)
>>> r["cost"], r["cost_ratio"], r["offload_rate"]
(4.0, 1.0, 0.0)
>>> r["accuracy"] == r["final_exit_accuracy"]
True
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from typing import Any

import numpy as np

from stream.costs import TIERS
from stream.errors import ConfigError

from policies.base import Observation, Policy, StateView
from policies.engine import feedback_event, learn_feedback, new_epoch, remote_trace, run_device, run_remote
from policies.state import MemoryStore, flush

CHECKPOINTS = (100, 250, 500, 1000, 2000, 5000, 10000, 20000)


class MatrixRunner:
    """A :class:`~policies.engine.LayerRunner` that reads exits from matrix rows instead of running layers."""

    def __init__(self, probs: np.ndarray, rows: list[int] | np.ndarray) -> None:
        self.probs = probs
        self.rows = rows

    def __call__(self, indices, from_layer, to_layer, exits):
        out = []
        for i in indices:
            row = self.probs[self.rows[i]]
            if exits == "each":
                out.append({layer: row[layer - 1] for layer in range(from_layer + 1, to_layer + 1)})
            else:
                out.append({to_layer: row[to_layer - 1]})
        return out


@dataclasses.dataclass
class StreamResult:
    """Per-sample outcomes of one run, in stream order."""

    rows: np.ndarray            # matrix row of each sample
    tier: np.ndarray            # index into TIERS
    exit_layer: np.ndarray      # 1-based layer whose exit predicted
    prediction: np.ndarray
    confidence: np.ndarray
    cost: np.ndarray            # [T, 4] device, edge, offload, fee
    arm: np.ndarray             # context["arm"] (0: the policy has no arms)
    detections: list[int] = dataclasses.field(default_factory=list)  # stream positions where the hook fired


@dataclasses.dataclass(frozen=True)
class DriftHook:
    """The device worker's drift hook, offline: the same detector (:class:`monitoring.drift.HookDetector`) on
    the same signal (each input embedding's distance to the nearest reference class centroid), fed in stream
    order; a detection starts a new epoch of the policy's state (:func:`policies.engine.new_epoch`, ``reset``
    / ``decay`` or the policy's own cut) once the detecting batch is committed, as the worker's batch commit
    does. ``centroids``: :func:`monitoring.drift.reference_centroids` of a labelled in-domain matrix."""

    settings: Any               # monitoring.drift.HookSettings
    centroids: np.ndarray

    def describe(self) -> str:
        return self.settings.describe()


def stream(policy: Policy, matrix, order: np.ndarray, *, batch_size: int = 32, feedback_delay: int = 0,
           store: MemoryStore | None = None, hook: DriftHook | None = None) -> StreamResult:
    """Stream ``matrix`` rows in ``order`` through ``policy``; see the module docstring."""
    if batch_size < 1:
        raise ConfigError(f"eval: batch_size must be >= 1, got {batch_size}")
    if feedback_delay < 0:
        raise ConfigError(f"eval: feedback_delay must be >= 0, got {feedback_delay}")
    if policy.num_layers != matrix.num_layers:
        raise ConfigError(f"policy {policy.name!r} was built for {policy.num_layers} layers, "
                          f"the matrix has {matrix.num_layers}")
    hindsight = policy.offline_only
    if hindsight and matrix.labels is None:
        raise ConfigError(f"policy {policy.name!r} reads labels: the matrix has none")
    store = store if store is not None else MemoryStore()
    policy.epoch = store.epoch(policy.base_namespace())
    ns = policy.namespace()
    detector, distance = _hook_detector(hook, matrix)
    probs, layers = matrix.probs, matrix.num_layers
    ids = matrix.ids if matrix.ids is not None else [str(i) for i in range(matrix.num_samples)]
    t = len(order)
    res = StreamResult(np.asarray(order), np.zeros(t, np.int8), np.zeros(t, np.int16), np.zeros(t, np.int64),
                       np.zeros(t), np.zeros((t, 4)), np.zeros(t, np.int16))
    queue: deque[tuple[int, str, list]] = deque()   # (due batch, namespace that decided, feedback events)
    tier_index = {name: k for k, name in enumerate(TIERS)}

    def record(pos: int, tier: str, layer: int, p: np.ndarray, trace, context) -> None:
        c = policy.cost.breakdown(trace)
        res.tier[pos], res.exit_layer[pos] = tier_index[tier], layer
        res.prediction[pos], res.confidence[pos] = int(np.argmax(p)), float(np.max(p))
        res.cost[pos] = (c.device, c.edge, c.offload, c.fee)
        res.arm[pos] = int(context.get("arm", 0))

    for b, start in enumerate(range(0, t, batch_size)):
        rows = [int(r) for r in order[start:start + batch_size]]
        obs = [Observation(ids[r], layers,
                           embedding=None if matrix.embeddings is None else matrix.embeddings[r],
                           hindsight=probs[r] if hindsight else None,
                           label=int(matrix.labels[r]) if hindsight else None) for r in rows]
        view = StateView(store.snapshot(ns))
        outcomes = run_device(policy, view, obs, MatrixRunner(probs, rows))
        off = [i for i, o in enumerate(outcomes) if o.offloaded]
        for i, o in enumerate(outcomes):
            if not o.offloaded:
                record(start + i, "device", o.observation.layer, o.probs, o.trace, o.context)
        if off:
            remote = run_remote([outcomes[i].observation.layer for i in off], [outcomes[i].action for i in off],
                                layers, MatrixRunner(probs, [rows[i] for i in off]))
            events = []
            for i, rem in zip(off, remote):
                o = outcomes[i]
                trace = remote_trace(o.trace, rem)
                record(start + i, o.trace.tier, rem.exit_layer, rem.probs, trace, o.context)
                events.append(feedback_event(o.observation.sample_id, o.context, trace, rem.feedback()))
            queue.append((b + feedback_delay, ns, events))
        while queue and queue[0][0] <= b:
            _, decided_in, events = queue.popleft()
            if decided_in == ns:
                learn_feedback(policy, view, events)
            else:   # decided before an epoch began: that epoch learns its reward (as in the device worker)
                old = StateView(store.snapshot(decided_in))
                learn_feedback(policy, old, events)
                flush(store, decided_in, old)
        flush(store, ns, view)
        found = next((i for i, r in enumerate(rows) if detector.update(distance[r])), None) if detector else None
        if found is not None:
            settings = hook.settings
            info = {"at": ids[rows[found]], "position": start + found, "reason": f"drift:distance/{settings.kind}",
                    "mode": settings.mode, "factor": settings.factor if settings.mode == "decay" else None}
            start_epoch = new_epoch(policy, StateView(store.snapshot(ns)), mode=settings.mode,
                                    factor=settings.factor, key=ids[rows[found]], info=info)
            if store.start_epoch(start_epoch):
                policy.epoch = store.epoch(policy.base_namespace())
                ns = policy.namespace()
                res.detections.append(start + found)
            detector.restart()
    while queue:  # feedback still in flight when the stream ended
        _, decided_in, events = queue.popleft()
        view = StateView(store.snapshot(decided_in))
        learn_feedback(policy, view, events)
        flush(store, decided_in, view)
    return res


def _hook_detector(hook: DriftHook | None, matrix):
    """The hook's detector and every row's drift signal, or ``(None, None)`` without a hook."""
    if hook is None:
        return None, None
    from monitoring.drift import HookDetector, reference_distance

    if matrix.embeddings is None:
        raise ConfigError("eval: the drift hook watches input embeddings; the matrix has none "
                          "(export it again with `exitflow export-matrix`)")
    if matrix.embeddings.shape[1] != hook.centroids.shape[-1]:
        raise ConfigError(f"eval: the drift hook's reference centroids have dimension {hook.centroids.shape[-1]}, "
                          f"the matrix's embeddings {matrix.embeddings.shape[1]}: use a reference from the same model")
    return HookDetector(hook.settings), reference_distance(matrix.embeddings, hook.centroids)


def reference_rewards(policy: Policy, matrix, reference: Any = None) -> tuple[np.ndarray, bool]:
    """Hindsight arm rewards ``[N, L]`` and whether ``policy`` itself plays those arms."""
    own = hasattr(policy, "arm_rewards")
    ref = policy if own else reference
    if ref is None:
        from policies.splitee import SplitEE
        ref = SplitEE(cost=policy.cost, num_layers=matrix.num_layers, num_classes=matrix.num_classes)
    return ref.arm_rewards(matrix.probs.astype(np.float64)), own


def regret_curve(res: StreamResult, arm_rewards: np.ndarray, own_arms: bool, mu: float) -> np.ndarray:
    """Cumulative regret after each sample of one run (see the module docstring)."""
    means = arm_rewards.mean(0)
    best = int(np.argmax(means))
    if own_arms:
        step = means[best] - means[res.arm.astype(int) - 1]
    else:
        step = arm_rewards[res.rows, best] - (res.confidence - mu * res.cost.sum(1))
    return np.cumsum(step)


def dynamic_regret_steps(res: StreamResult, segments: list[dict[str, Any]], own_arms: bool, mu: float) -> np.ndarray:
    """Per-sample regret of an ordered run against the best fixed arm of each sample's segment.

    ``segments``: ``start``/``end`` (stream positions, which are also the rows of the concatenated matrix)
    and ``rewards`` (that segment's hindsight arm rewards ``[n, L]``). Same rule as :func:`regret_curve`.
    """
    step = np.zeros(len(res.rows))
    for seg in segments:
        lo, hi, rewards = seg["start"], seg["end"], seg["rewards"]
        means = rewards.mean(0)
        best = int(np.argmax(means))
        if own_arms:
            step[lo:hi] = means[best] - means[res.arm[lo:hi].astype(int) - 1]
        else:
            got = res.confidence[lo:hi] - mu * res.cost[lo:hi].sum(1)
            step[lo:hi] = rewards[res.rows[lo:hi] - lo, best] - got
    return step


def check_segments(named: list[tuple[str, Any]]) -> None:
    """Every segment must have the first one's exits and classes; the error names both."""
    if not named:
        raise ConfigError("eval: no matrix to evaluate")
    first_name, first = named[0]
    for name, m in named[1:]:
        if (m.num_layers, m.num_classes) != (first.num_layers, first.num_classes):
            raise ConfigError(f"eval --in-order: {first_name} has {first.num_layers} exits and {first.num_classes} "
                              f"classes but {name} has {m.num_layers} and {m.num_classes}; every segment must come "
                              f"from the same model")


def concat_segments(named: list[tuple[str, Any]]) -> tuple[Any, list[tuple[str, int, int]]]:
    """Matrices kept in order as one: the concatenated matrix and each segment's ``(name, start, end)``.

    Every segment must have the same exits and classes (one model); sample ids are prefixed by the segment's
    name (a repeated name gets ``#2``…) so that no two samples share a dedup key. Labels, embeddings and
    ``hidden_bytes`` are kept where every segment has them alike.
    """
    from stream.matrix import ConfidenceMatrix

    check_segments(named)
    names: list[str] = []
    for name, m in named:
        label, k = name, 2
        while label in names:
            label, k = f"{name}#{k}", k + 1
        names.append(label)
    bounds, start = [], 0
    for label, (_, m) in zip(names, named):
        bounds.append((label, start, start + m.num_samples))
        start += m.num_samples
    mats = [m for _, m in named]
    ids = [f"{label}:{i}" for label, m in zip(names, mats)
           for i in (m.ids if m.ids is not None else range(m.num_samples))]
    labels = np.concatenate([m.labels for m in mats]) if all(m.labels is not None for m in mats) else None
    dims = {None if m.embeddings is None else m.embeddings.shape[1] for m in mats}
    embeddings = np.concatenate([m.embeddings for m in mats]) if len(dims) == 1 and None not in dims else None
    sizes = [m.hidden_bytes for m in mats]
    hidden = sizes[0] if all(s is not None and np.array_equal(s, sizes[0]) for s in sizes) else None
    matrix = ConfidenceMatrix(probs=np.concatenate([m.probs for m in mats]), labels=labels, embeddings=embeddings,
                              hidden_bytes=hidden, ids=ids, meta={"segments": [b[0] for b in bounds]})
    return matrix, bounds


def evaluate_ordered(policy: Policy, matrix, segments: list[tuple[str, int, int]], *, runs: int = 1,
                     seed: int = 0, batch_size: int = 32, feedback_delay: int = 0, reference: Any = None,
                     keep_curve: bool = True, hook: DriftHook | None = None) -> dict[str, Any]:
    """Run ``policy`` over segments kept in order, each reshuffled within itself per run (seeded), with one
    state across the boundaries; the report adds dynamic regret and ``segments`` (see :func:`summarize`)."""
    if runs < 1:
        raise ConfigError(f"eval: runs must be >= 1, got {runs}")
    rng = np.random.default_rng(seed)
    results = []
    for _ in range(runs):
        order = np.concatenate([start + rng.permutation(end - start) for _, start, end in segments])
        results.append(stream(policy, matrix, order, batch_size=batch_size, feedback_delay=feedback_delay, hook=hook))
    return summarize(policy, matrix, results, reference=reference, keep_curve=keep_curve, segments=segments,
                     hook=hook)


def evaluate(policy: Policy, matrix, *, runs: int = 1, seed: int = 0, batch_size: int = 32,
             feedback_delay: int = 0, reference: Any = None, keep_curve: bool = True,
             hook: DriftHook | None = None) -> dict[str, Any]:
    """Run ``policy`` over ``matrix`` ``runs`` times (reshuffled) and summarise; see the module docstring."""
    if runs < 1:
        raise ConfigError(f"eval: runs must be >= 1, got {runs}")
    rng = np.random.default_rng(seed)
    results = [stream(policy, matrix, rng.permutation(matrix.num_samples), batch_size=batch_size,
                      feedback_delay=feedback_delay, hook=hook) for _ in range(runs)]
    return summarize(policy, matrix, results, reference=reference, keep_curve=keep_curve, hook=hook)


#: Samples after a boundary over which the regret of adapting is reported (``regret_first_500``).
AFTER_BOUNDARY = 500


def summarize(policy: Policy, matrix, results: list[StreamResult], reference: Any = None,
              keep_curve: bool = True, segments: list[tuple[str, int, int]] | None = None,
              hook: DriftHook | None = None) -> dict[str, Any]:
    """The report of ``results``. With ``segments`` (ordered runs) ``regret`` is dynamic: each segment
    against its own best fixed arm in hindsight (same rule as a single matrix), ``static_regret`` against
    the best fixed arm of the whole stream, and ``segments`` lists per segment ``name``, ``start``,
    ``samples``, ``best_fixed_arm``, ``most_played_arm``, ``arm_rewards``, ``regret``, ``regret_first_500``
    (mean and std over the runs of the regret in its first min(500, n) samples), accuracy and cost."""
    layers = matrix.num_layers
    final_cost = policy.cost.final_exit_cost(layers)
    acc = [float((r.prediction == matrix.labels[r.rows]).mean()) for r in results] if matrix.labels is not None else []
    cost = [float(r.cost.sum(1).mean()) for r in results]
    arm_rewards, own = reference_rewards(policy, matrix, reference)
    curves = np.stack([regret_curve(r, arm_rewards, own, policy.cost.mu) for r in results])
    mean_curve = curves.mean(0)
    t = len(mean_curve)
    tiers = np.concatenate([r.tier for r in results])
    exits = np.concatenate([r.exit_layer for r in results])
    arms = np.concatenate([r.arm for r in results])
    breakdown = np.concatenate([r.cost for r in results]).mean(0)
    played = Counter(int(a) for a in arms if a)
    report: dict[str, Any] = {
        "policy": policy.name, "params": policy.params(), "namespace": policy.namespace(),
        "cost_model": policy.cost.name, "offload_cost": policy.cost.offload_cloud,
        "offload_ratio": policy.cost.offload_ratio(layers), "mu": policy.cost.mu,
        "samples": t, "runs": len(results),
        "accuracy": float(np.mean(acc)) if acc else None,
        "accuracy_std": float(np.std(acc)) if acc else None,
        "final_exit_accuracy": float(matrix.accuracy()[-1]) if matrix.labels is not None else None,
        "cost": float(np.mean(cost)), "cost_std": float(np.std(cost)),
        "final_exit_cost": final_cost, "cost_ratio": float(np.mean(cost)) / final_cost,
        "cost_breakdown": dict(zip(("device", "edge", "offload", "fee"), map(float, breakdown))),
        "offload_rate": float((tiers != 0).mean()),
        "tiers": {name: int((tiers == k).sum()) / len(results) for k, name in enumerate(TIERS)},
        "exit_layers": {str(layer): int((exits == layer).sum()) / len(results) for layer in range(1, layers + 1)},
        "most_played_arm": played.most_common(1)[0][0] if played else None,
        "best_fixed_arm": int(np.argmax(arm_rewards.mean(0))) + 1,
        "arm_rewards": [round(float(x), 6) for x in arm_rewards.mean(0)],
        "regret_kind": "pseudo" if own else "realized",
        "regret": float(mean_curve[-1]),
        "regret_per_t": {str(c): float(mean_curve[c - 1] / c) for c in CHECKPOINTS if c <= t},
    }
    if report["accuracy"] is not None:
        report["accuracy_drop"] = report["final_exit_accuracy"] - report["accuracy"]
    if hook is not None:
        report["drift_hook"] = hook.describe()
        report["epochs_per_run"] = float(np.mean([len(r.detections) for r in results]))
    if segments is not None:
        curves, report["segments"] = _segments(policy, matrix, results, segments, reference, own)
        mean_curve = curves.mean(0)
        report.update(static_regret=report["regret"], regret=float(mean_curve[-1]),
                      regret_reference="best fixed arm of each segment",
                      regret_per_t={str(c): float(mean_curve[c - 1] / c) for c in CHECKPOINTS if c <= t},
                      boundaries=[start for _, start, _ in segments[1:]])
    if keep_curve:
        report["regret_curve"] = mean_curve.tolist()
        # 95% band of the mean curve over the runs (normal approximation, as in SplitEE Fig. 7)
        band = 1.96 * curves.std(0, ddof=1) / np.sqrt(len(results)) if len(results) > 1 else np.zeros(t)
        report["regret_band"] = band.tolist()
    return report


def _segments(policy: Policy, matrix, results: list[StreamResult], bounds: list[tuple[str, int, int]],
              reference: Any, own: bool) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Dynamic regret curves ``[runs, T]`` and the per-segment summaries of an ordered evaluation."""
    segs = []
    for name, start, end in bounds:
        rewards, _ = reference_rewards(policy, matrix.subset(np.arange(start, end)), reference)
        segs.append({"name": name, "start": start, "end": end, "rewards": rewards})
    steps = np.stack([dynamic_regret_steps(r, segs, own, policy.cost.mu) for r in results])
    curves = np.cumsum(steps, 1)
    out = []
    for seg in segs:
        lo, hi = seg["start"], seg["end"]
        head = steps[:, lo:min(hi, lo + AFTER_BOUNDARY)].sum(1)
        played = Counter(int(a) for r in results for a in r.arm[lo:hi] if a)
        rows = [r.rows[lo:hi] for r in results]
        acc = ([float((r.prediction[lo:hi] == matrix.labels[rw]).mean()) for r, rw in zip(results, rows)]
               if matrix.labels is not None else [])
        means = seg["rewards"].mean(0)
        # the hook's first epoch start inside this segment, in samples after its boundary (per run; None: none)
        delays = [next((d - lo for d in r.detections if lo <= d < hi), None) for r in results]
        out.append({"name": seg["name"], "start": lo, "samples": hi - lo,
                    "epochs": float(np.mean([sum(lo <= d < hi for d in r.detections) for r in results])),
                    "detection_delay": (float(np.median([d for d in delays if d is not None]))
                                        if any(d is not None for d in delays) else None),
                    "best_fixed_arm": int(np.argmax(means)) + 1,
                    "most_played_arm": played.most_common(1)[0][0] if played else None,
                    "arm_rewards": [round(float(x), 6) for x in means],
                    "regret": float(steps[:, lo:hi].sum(1).mean()),
                    "regret_first_500": float(head.mean()), "regret_first_500_std": float(head.std()),
                    "accuracy": float(np.mean(acc)) if acc else None,
                    "final_exit_accuracy": (float((matrix.probs[lo:hi, -1].argmax(-1) == matrix.labels[lo:hi]).mean())
                                            if matrix.labels is not None else None),
                    "cost": float(np.mean([r.cost[lo:hi].sum(1).mean() for r in results])),
                    "offload_rate": float(np.mean([(r.tier[lo:hi] != 0).mean() for r in results]))})
    return curves, out


def synthetic_matrix(n: int = 1000, layers: int = 6, classes: int = 2, dim: int = 8, seed: int = 0):
    """A labelled confidence matrix with easy and hard samples, for tests and demos.

    Each sample has a difficulty h in [0, 1]; the true class's logit margin grows with depth, faster for
    easy samples, plus noise, so confidence and accuracy rise with the layer. The embedding is h along a
    fixed direction plus noise, so DIMEE's pools have something to find.
    """
    from stream.matrix import ConfidenceMatrix

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    hard = rng.beta(2.0, 2.0, n)
    depth = np.arange(1, layers + 1) / layers
    noise = np.cumsum(rng.normal(0, 0.5, (n, layers)), 1) / np.sqrt(np.arange(1, layers + 1))
    margin = 2.5 * depth[None, :] * (1.25 - hard[:, None]) + 1.4 * noise
    logits = rng.normal(0, 0.3, (n, layers, classes))
    logits[np.arange(n), :, labels] += margin
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    direction = rng.normal(0, 1, dim)
    embeddings = (hard[:, None] * direction[None, :] * 2 + rng.normal(0, 0.5, (n, dim))).astype(np.float32)
    return ConfidenceMatrix(probs=probs, labels=labels.astype(np.int64), embeddings=embeddings,
                            ids=[f"s{i}" for i in range(n)], meta={"synthetic": True, "seed": seed})
