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
from policies.engine import feedback_event, learn_feedback, remote_trace, run_device, run_remote
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


def stream(policy: Policy, matrix, order: np.ndarray, *, batch_size: int = 32, feedback_delay: int = 0,
           store: MemoryStore | None = None) -> StreamResult:
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
    ns = policy.namespace()
    probs, layers = matrix.probs, matrix.num_layers
    ids = matrix.ids if matrix.ids is not None else [str(i) for i in range(matrix.num_samples)]
    t = len(order)
    res = StreamResult(np.asarray(order), np.zeros(t, np.int8), np.zeros(t, np.int16), np.zeros(t, np.int64),
                       np.zeros(t), np.zeros((t, 4)), np.zeros(t, np.int16))
    queue: deque[tuple[int, list]] = deque()
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
            queue.append((b + feedback_delay, events))
        while queue and queue[0][0] <= b:
            learn_feedback(policy, view, queue.popleft()[1])
        flush(store, ns, view)
    while queue:  # feedback still in flight when the stream ended
        view = StateView(store.snapshot(ns))
        learn_feedback(policy, view, queue.popleft()[1])
        flush(store, ns, view)
    return res


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


def evaluate(policy: Policy, matrix, *, runs: int = 1, seed: int = 0, batch_size: int = 32,
             feedback_delay: int = 0, reference: Any = None, keep_curve: bool = True) -> dict[str, Any]:
    """Run ``policy`` over ``matrix`` ``runs`` times (reshuffled) and summarise; see the module docstring."""
    if runs < 1:
        raise ConfigError(f"eval: runs must be >= 1, got {runs}")
    rng = np.random.default_rng(seed)
    results = [stream(policy, matrix, rng.permutation(matrix.num_samples), batch_size=batch_size,
                      feedback_delay=feedback_delay) for _ in range(runs)]
    return summarize(policy, matrix, results, reference=reference, keep_curve=keep_curve)


def summarize(policy: Policy, matrix, results: list[StreamResult], reference: Any = None,
              keep_curve: bool = True) -> dict[str, Any]:
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
    if keep_curve:
        report["regret_curve"] = mean_curve.tolist()
        # 95% band of the mean curve over the runs (normal approximation, as in SplitEE Fig. 7)
        band = 1.96 * curves.std(0, ddof=1) / np.sqrt(len(results)) if len(results) > 1 else np.zeros(t)
        report["regret_band"] = band.tolist()
    return report


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
