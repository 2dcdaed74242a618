"""Offline evaluation of the drift detectors: replay confidence matrices through a policy, as the live
pipeline would, feed each sample's signals to a :class:`DriftMonitor` and score the detections
against the segment boundaries (delay in samples, misses, false alarms per 10k samples).

The policy runs through the same decision engine as the device worker (``policies.engine``), so the
confidence at the decision exit and the offload indicator are what the live results would carry. The
distance signal is the distance of a sample's embedding to the nearest class centroid of a reference
window at the start of the first segment (DIMEE's routing signal), when the matrices hold embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from monitoring.drift import SIGNALS, DetectorSpec, DriftMonitor

NAN = float("nan")


@dataclasses.dataclass
class Signals:
    """Per-sample signals of a replayed stream (NaN where a sample has none)."""

    confidence: np.ndarray
    offload: np.ndarray
    distance: np.ndarray
    error: np.ndarray
    layer: np.ndarray  # the device layer where the policy decided (the stratum of confidence and offload)

    def __len__(self) -> int:
        return len(self.offload)

    @classmethod
    def concat(cls, parts: Sequence["Signals"]) -> "Signals":
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)))


class _Runner:
    def __init__(self, probs: np.ndarray) -> None:
        self.probs = probs

    def __call__(self, indices, from_layer, to_layer, exits):
        layers = range(from_layer + 1, to_layer + 1) if exits == "each" else (to_layer,)
        return [{l: self.probs[i, l - 1] for l in layers} for i in indices]


def replay(probs: np.ndarray, labels: np.ndarray | None, policy_name: str = "static-maxprob",
           params: dict | None = None, cost: str = "splitee", batch: int = 32) -> tuple[np.ndarray, ...]:
    """Decide every sample with a policy; returns (decision confidence, offloaded, prediction, decision layer)."""
    from policies.base import Observation, StateView
    from policies.engine import feedback_event, remote_trace, run_device, run_remote
    from policies.registry import build
    from stream.costs import preset

    n, num_layers, num_classes = probs.shape
    policy = build(policy_name, params or {}, cost=preset(cost, num_layers=num_layers), num_layers=num_layers,
                   num_classes=num_classes, live=True)
    state = StateView()
    runner = _Runner(probs)
    conf = np.full(n, NAN)
    offloaded = np.zeros(n)
    pred = np.zeros(n, dtype=np.int64)
    decided = np.zeros(n, dtype=np.int64)
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        obs = [Observation(str(i), num_layers) for i in idx]
        outcomes = run_device(policy, state, obs, lambda rows, a, b, m: runner([idx[r] for r in rows], a, b, m))
        remote = [(k, o) for k, o in enumerate(outcomes) if o.offloaded]
        if remote:
            finished = run_remote([o.observation.layer for _, o in remote], [o.action for _, o in remote],
                                  num_layers, lambda rows, a, b, m: runner([idx[remote[r][0]] for r in rows], a, b, m))
            for (k, o), r in zip(remote, finished):
                pred[idx[k]] = int(np.argmax(r.probs))
                event = feedback_event(o.observation.sample_id, o.context, remote_trace(o.trace, r), r.feedback())
                state.add(policy.learn(event, state))
        for k, o in enumerate(outcomes):
            i = idx[k]
            layer = decided[i] = o.observation.layer
            if layer in o.observation.probs:
                conf[i] = float(np.max(o.observation.probs[layer]))
            if o.offloaded:
                offloaded[i] = 1.0
            else:
                pred[i] = int(np.argmax(o.observation.probs[layer]))
    return conf, offloaded, pred, decided


def nearest_centroid_distance(embeddings: np.ndarray, reference: np.ndarray, ref_classes: np.ndarray) -> np.ndarray:
    """Euclidean distance of each embedding to the nearest per-class centroid of ``reference``."""
    centroids = np.stack([reference[ref_classes == c].mean(0) for c in np.unique(ref_classes)])
    d = np.linalg.norm(embeddings[:, None, :] - centroids[None, :, :], axis=-1)
    return d.min(1)


def signals_for(probs: np.ndarray, labels: np.ndarray | None, embeddings: np.ndarray | None,
                reference: tuple[np.ndarray, np.ndarray] | None, **policy) -> Signals:
    conf, offloaded, pred, layer = replay(probs, labels, **policy)
    error = (pred != labels).astype(float) if labels is not None else np.full(len(pred), NAN)
    if embeddings is not None and reference is not None:
        distance = nearest_centroid_distance(embeddings, *reference)
    else:
        distance = np.full(len(pred), NAN)
    return Signals(conf, offloaded, distance, error, layer)


def detect(signals: Signals, detectors: dict[str, tuple[DetectorSpec, ...]] | None = None,
           sources: Sequence[str] | None = None, stratify: bool = True) -> list:
    """Feed the signals sample by sample, as the monitor does (label-free ones first, then the error as if its
    label had just joined; confidence and offload per decision layer)."""
    mon = DriftMonitor(detectors)
    events = []
    for i in range(len(signals)):
        src = sources[i] if sources is not None else None
        layer = f"v1:L{signals.layer[i]}" if stratify else None
        for signal, stratum in (("confidence", layer), ("offload", layer), ("distance", None), ("error", "v1")):
            value = getattr(signals, signal)[i]
            if not np.isnan(value):
                events += mon.update(signal, value, seq=i, source=src, time=float(i), stratum=stratum)
    return events


@dataclasses.dataclass
class Score:
    signal: str
    detector: str
    delays: list[int | None]   # per boundary; None = missed within the tolerance
    false_alarms: int
    samples: int

    @property
    def false_alarms_per_10k(self) -> float:
        return 1e4 * self.false_alarms / max(self.samples, 1)


def score(events, boundaries: Sequence[int], n: int, tolerance: int,
          detectors: Sequence[tuple[str, str]] = ()) -> list[Score]:
    """Per (signal, detector) and per signal with any detector: delay at each boundary, false alarms.

    ``detectors`` lists (signal, detector) pairs to report even when they never fired.
    """
    pairs = {(e.signal, e.detector) for e in events} | set(detectors)
    keys = sorted(pairs) + sorted({(signal, "any") for signal, _ in pairs})
    out = []
    for signal, detector in keys:
        seqs = sorted(e.seq for e in events if e.signal == signal and detector in ("any", e.detector))
        delays, hits = [], set()
        for b in boundaries:
            inside = [s for s in seqs if b <= s < b + tolerance]
            delays.append(inside[0] - b if inside else None)
            hits.update(inside)
        out.append(Score(signal, detector, delays, sum(1 for s in seqs if s not in hits), n))
    return out


def synthetic_segment(n: int, *, confidence: float, spread: float = 0.08, layers: int = 6, seed: int = 0,
                      dim: int = 8, centre: float = 0.0, accuracy: float = 0.9) -> tuple[np.ndarray, ...]:
    """A confidence-matrix-like segment: confidences rising with depth around ``confidence``.

    Returns (probs [n, layers, 2] float32, labels [n], embeddings [n, dim]).
    """
    rng = np.random.default_rng(seed)
    depth = np.linspace(-0.15, 0.1, layers)
    top = np.clip(confidence + depth[None, :] + rng.normal(0, spread, (n, layers)), 0.5, 0.999)
    labels = rng.integers(0, 2, n)
    correct = rng.random(n) < accuracy
    winner = np.where(correct, labels, 1 - labels)
    probs = np.empty((n, layers, 2), np.float32)
    probs[np.arange(n), :, winner] = top
    probs[np.arange(n), :, 1 - winner] = 1 - top
    emb = (rng.normal(centre, 1.0, (n, dim)) + labels[:, None]).astype(np.float32)
    return probs, labels.astype(np.int64), emb
