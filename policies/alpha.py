"""SplitEE's threshold α learned from the stream, without labels: agreement with the final exit.

An offloaded sample comes back with the final exit's prediction, so for an arm (split layer) i the
stream reveals, for each confidence C_i, how often exiting at i would have changed the answer. Per
arm, in ``bins`` equal bins of C_i over [1/C, 1], the state keeps three additive vectors:

* ``am<i>``: samples decided at arm i (their C_i is always known: the *mass* of each bin);
* ``ao<i>``: of those, samples whose final prediction came back (*observed*: every offload);
* ``al<i>``: their summed *loss*, the estimated accuracy lost had they exited at i.

The loss of one observed sample, with ŷ_i the exit's prediction and p_L the final exit's probabilities:
``teacher`` (default) is p_L(ŷ_L) − p_L(ŷ_i), the accuracy drop to expect if the final exit's
probabilities are right (0 when both agree); ``disagree`` is 1[ŷ_i ≠ ŷ_L], an upper bound on the
true drop (exiting can only lose where they disagree). α_i is the lowest bin edge e whose estimated
drop per sample, Σ_{b ≥ e} mass_b/M · rate_b, stays within ``target`` (e.g. 0.005 = half a point).
A bin's rate is its observed loss per observed sample, shrunk toward its *tail* rate (the pooled rate
of every observation at or above it) with ``prior`` pseudo-samples; a bin with no observation at or
above it takes the nearest tail rate below it (loss falls with confidence, so that is an upper bound).

Samples above α exit and reveal nothing, so a budgeted exploration keeps their bins alive: a share
``probe`` of them is offloaded anyway (drawn per sample id, the same in every worker). Their cost is
real and counted; the bandit scores them as the exits they would have been.

Per sample this costs one bin lookup and one vector add of ``bins`` floats per arm evaluated, and the
α of an arm is a reverse cumulative sum over ``bins`` (≈ 10 µs); state is 3 × L vectors in Redis.

>>> import numpy as np
>>> edges = bin_edges(2, 4)                       # 4 bins over [0.5, 1]
>>> edges.tolist()
[0.5, 0.625, 0.75, 0.875, 1.0]
>>> mass = np.array([10., 10., 10., 10.])         # 40 samples at this arm
>>> seen = np.array([10., 10., 2., 2.])           # everything below 0.75 was offloaded, 2 probes above
>>> loss = np.array([4., 1., 0., 0.])
>>> estimate_alpha(mass, seen, loss, classes=2, target=0.05, prior=0.0)  # bins >= 0.625 lose 1/40
(0.625, 0.025)
>>> estimate_alpha(mass, seen, loss, classes=2, target=0.01, prior=0.0)  # only bins >= 0.75 lose nothing
(0.75, 0.0)
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from stream.errors import ConfigError

LossKind = Literal["teacher", "disagree"]


def bin_edges(classes: int, bins: int) -> np.ndarray:
    """``bins + 1`` edges from 1/C (the lowest a max-probability can be) to 1."""
    return np.linspace(1.0 / classes, 1.0, bins + 1)


def bin_of(conf: float, classes: int, bins: int) -> int:
    """The bin of a confidence (1.0 falls in the last bin)."""
    low = 1.0 / classes
    return int(min(bins - 1, max(0, np.floor((conf - low) / (1.0 - low) * bins))))


def sample_loss(pred: int, final_probs: np.ndarray, kind: LossKind = "teacher") -> float:
    """Estimated accuracy lost by answering class ``pred`` instead of the final exit (see the module docstring)."""
    pred, final = int(pred), int(np.argmax(final_probs))
    if pred == final:
        return 0.0
    if kind == "disagree":
        return 1.0
    return float(final_probs[final] - final_probs[pred])


def estimate_alpha(mass: np.ndarray, seen: np.ndarray, loss: np.ndarray, *, classes: int, target: float,
                   prior: float = 5.0) -> tuple[float, float]:
    """(α, estimated drop at α): the lowest bin edge whose estimated drop per sample is within ``target``.

    Returns α = 1.0 (exit nowhere but the last layer) when even the top bin loses more than ``target``.
    """
    mass, seen, loss = (np.asarray(v, dtype=np.float64) for v in (mass, seen, loss))
    total = mass.sum()
    if total <= 0:
        raise ConfigError("alpha estimate: no samples at this arm yet")
    tail_seen, tail_loss = np.cumsum(seen[::-1])[::-1], np.cumsum(loss[::-1])[::-1]
    # The tail rate of bin b (all observations at or above it), carried down from below where none exist.
    # Bins with nothing at or above them form a top run; they take the highest tail rate below it.
    tail = tail_loss / np.maximum(tail_seen, 1e-12)
    observed = np.nonzero(tail_seen > 0)[0]
    tail[observed[-1] + 1 if len(observed) else 0:] = tail[observed[-1]] if len(observed) else 1.0
    rate = np.where(seen + prior > 0, (loss + prior * tail) / np.maximum(seen + prior, 1e-12), tail)
    drop = np.cumsum((mass * rate)[::-1])[::-1] / total    # drop[b]: exit every bin >= b
    edges = bin_edges(classes, len(mass))
    ok = np.nonzero(drop <= target + 1e-12)[0]
    if not len(ok):
        return 1.0, 0.0
    b = int(ok[0])
    return float(edges[b]), float(drop[b])


def alpha_from_matrix(probs: np.ndarray, arm: int, *, target: float, loss: LossKind = "teacher",
                      bins: int = 50, prior: float = 5.0) -> tuple[float, float]:
    """The same rule on an unlabelled matrix ``[N, L, C]`` where every final prediction is known (hindsight).

    This is what the online estimate converges to when every sample is observed; labels are never read.
    """
    n, layers, classes = probs.shape
    if not 1 <= arm <= layers:
        raise ConfigError(f"alpha estimate: arm must be in 1..{layers}, got {arm}")
    conf = probs[:, arm - 1].max(-1)
    idx = np.clip(np.floor((conf - 1.0 / classes) / (1.0 - 1.0 / classes) * bins), 0, bins - 1).astype(int)
    pred, final = probs[:, arm - 1].argmax(-1), probs[:, -1].argmax(-1)
    if loss == "disagree":
        per = (pred != final).astype(np.float64)
    else:
        rows = np.arange(n)
        per = probs[rows, -1, final] - probs[rows, -1, pred]
    mass = np.bincount(idx, minlength=bins).astype(np.float64)
    return estimate_alpha(mass, mass, np.bincount(idx, weights=per, minlength=bins), classes=classes,
                          target=target, prior=prior)
