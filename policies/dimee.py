"""DIMEE (Bajpai & Hanawal): route each input to mobile, edge or cloud by its nearest pool centroid.

Calibration (:func:`calibrate`, on a validation matrix with embeddings): for each α in S = ten
equidistant values from 1/C to 1, Algorithm 1 sorts samples into pools — *easy* if some exit i <= m
reaches α, *moderate* if not but some exit m < i <= n does, *hard* otherwise — and Eq. 2–3 give the
expected reward::

    E[r(α)] = mean over samples of  C_i - μ·cost(mobile runs 1..i)          (easy, first i <= m with C_i >= α)
                                    C_i - μ·cost(edge runs 1..i, + o_e)      (moderate, first i <= n)
                                    C_L - μ·cost(cloud, + o_c + γ)           (hard)

α* maximises it; the pool centroids are the mean input embeddings of each pool under α*. The costs
are the cost model's (``dimee`` preset: λ_m = 1.5, λ_e = 1, o_e = 2.5, o_c = 3, γ), weighted by its μ
like every other reward here (Eq. 2 writes them unweighted).

Inference (Algorithm 2), before any layer runs: the embedding's nearest centroid (Euclidean) picks the
tier. Easy: the device runs up to m layers and exits at the first exit reaching α (at layer m
regardless). Moderate: the raw input goes to the edge, which runs up to n layers with early exit at α.
Hard: the raw input goes to the cloud. ``dimee-adaptive`` moves the chosen pool's centroid to the
running mean with the new embedding (Alg. 2 lines 8, 11, 14): the state holds additive sums and counts
per pool (``sum_<pool>``, ``n_<pool>``), added to the calibration's, so several workers can share it.

>>> import numpy as np
>>> from stream.costs import dimee
>>> from policies.base import Observation, StateView
>>> cal = {"policy": "dimee", "alpha": 0.8, "m": 1, "n": 2,
...        "centroids": {"easy": [0.0, 0.0], "moderate": [1.0, 0.0], "hard": [0.0, 1.0]},
...        "counts": {"easy": 2, "moderate": 1, "hard": 1}}
>>> p = DimeeAdaptive(cost=dimee(), num_layers=3, calibration=cal)
>>> p.decide(Observation("x", 3, embedding=np.array([0.9, 0.2])), StateView())
Offload(tier='edge', run_to=2, threshold=0.8, probe=False)
>>> p.learn_pool("easy", np.array([0.3, 0.0]))             # running-mean centroid, as sums and counts
{'sum_easy': array([0.3, 0. ]), 'n_easy': 1.0}
>>> p.centroids(StateView({"sum_easy": np.array([0.3, 0.0]), "n_easy": 1.0}))["easy"]
array([0.1, 0. ])
"""

from __future__ import annotations

import math

from typing import Any, ClassVar

import numpy as np

from stream.costs import CostModel, Trace
from stream.errors import ConfigError

from policies.base import Action, Continue, Delta, Event, Exit, Observation, Offload, Policy, StateView
from policies.calibration import calibration_digest, load_calibration

POOLS = ("easy", "moderate", "hard")


def default_split(num_layers: int) -> tuple[int, int]:
    """m and n scaled from the paper's BERT-base choice (m = 3, n = 6 of 12 layers), halves rounded up.

    >>> default_split(6), default_split(12), default_split(10), default_split(1)
    ((2, 3), (3, 6), (3, 5), (1, 1))
    """
    m = max(1, math.floor(3 * num_layers / 12 + 0.5))
    return m, min(num_layers, max(m, math.floor(6 * num_layers / 12 + 0.5)))


def assign_pools(conf: np.ndarray, alpha: float, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1 on confidences ``[N, L]``: pool index (0 easy, 1 moderate, 2 hard) and exit layer (1-based)."""
    hit = conf >= alpha
    first = np.where(hit.any(1), hit.argmax(1) + 1, conf.shape[1])
    pool = np.where(hit[:, :m].any(1), 0, np.where(hit[:, :n].any(1), 1, 2))
    layer = np.where(pool == 2, conf.shape[1], first)
    return pool, layer


def pool_rewards(conf: np.ndarray, pool: np.ndarray, layer: np.ndarray, cost: CostModel) -> np.ndarray:
    """Eq. 2 for every sample, given its pool and exit layer."""
    num_layers = conf.shape[1]
    out = np.empty(len(pool))
    for k, (p, i) in enumerate(zip(pool, layer)):
        if p == 0:
            trace = Trace(device_layers=int(i), device_exits=int(i))
        elif p == 1:
            trace = Trace(tier="edge", edge_layers=int(i))
        else:
            trace = Trace(tier="cloud", cloud_layers=num_layers)
        out[k] = conf[k, i - 1] - cost.mu * cost.breakdown(trace).total
    return out


def calibrate(matrix, *, cost: CostModel, m: int | None = None, n: int | None = None,
              mu: float | None = None) -> dict[str, Any]:
    """Pools, α and centroids from a validation matrix (DIMEE Alg. 1 and Eq. 2–3), as a JSON-able dict.

    ``mu`` overrides the cost model's μ in Eq. 2 (the weight of cost against confidence) for this choice.
    """
    if matrix.embeddings is None:
        raise ConfigError("dimee calibration needs a matrix with input embeddings (embeddings array)")
    probs = matrix.probs.astype(np.float64)
    num_layers, classes = probs.shape[1], probs.shape[2]
    dm, dn = default_split(num_layers)
    m = dm if m is None else int(m)
    n = dn if n is None else int(n)
    if not 1 <= m <= n <= num_layers:
        raise ConfigError(f"dimee calibration: need 1 <= m <= n <= {num_layers}, got m={m}, n={n}")
    if mu is not None:
        cost = cost.with_overrides(mu=float(mu))
    conf = probs.max(-1)
    grid = np.linspace(1.0 / classes, 1.0, 10)
    expected = []
    for alpha in grid:
        pool, layer = assign_pools(conf, alpha, m, n)
        expected.append(float(pool_rewards(conf, pool, layer, cost).mean()))
    best = int(np.argmax(expected))
    alpha = float(grid[best])
    pool, layer = assign_pools(conf, alpha, m, n)
    emb = matrix.embeddings.astype(np.float64)
    out: dict[str, Any] = {
        "policy": "dimee", "alpha": alpha, "m": m, "n": n, "cost_model": cost.name, "mu": cost.mu,
        "expected_reward": {f"{a:.4f}": round(r, 6) for a, r in zip(grid, expected)},
        "centroids": {name: emb[pool == k].mean(0).tolist() for k, name in enumerate(POOLS) if (pool == k).any()},
        "counts": {name: int((pool == k).sum()) for k, name in enumerate(POOLS)},
    }
    if matrix.labels is not None:
        correct = probs.argmax(-1)[np.arange(len(pool)), layer - 1] == matrix.labels
        out["validation_accuracy"] = float(correct.mean())
    return out


class DimeeFixed(Policy):
    """DIMEE with the calibration's pool centroids (Ours-F)."""

    name = "dimee-fixed"
    adaptive: ClassVar[bool] = False

    def __init__(self, *, calibration: str | None = None, **kw) -> None:
        super().__init__(**kw)
        self.calibration = cal = load_calibration(calibration, self.name, accept=("dimee",), required=True)
        try:
            self.alpha = self.setting("alpha", cal["alpha"], float, 0.0, 1.0)
            self.m = self.setting("m", cal["m"], int, 1, self.num_layers)
            self.n = self.setting("n", cal["n"], int, self.m, self.num_layers)
            self._sums = {p: np.asarray(c, dtype=np.float64) * float(cal["counts"][p])
                          for p, c in cal["centroids"].items() if p in POOLS}
            self._counts = {p: float(cal["counts"][p]) for p in self._sums}
        except KeyError as exc:
            raise ConfigError(f"policy {self.name!r}: calibration lacks {exc.args[0]!r}") from None
        if not self._sums:
            raise ConfigError(f"policy {self.name!r}: calibration has no pool centroids")

    calibrate = staticmethod(calibrate)

    def params(self) -> dict[str, Any]:
        return {"seed": self.seed, "calibration": calibration_digest(self.calibration)}

    def centroids(self, state: StateView) -> dict[str, np.ndarray]:
        """Current pool centroids: calibration sums and counts plus what was learned online."""
        out = {}
        for pool, total in self._sums.items():
            extra = state.get(f"sum_{pool}")
            count = self._counts[pool] + state.number(f"n_{pool}")
            out[pool] = (total if extra is None else total + extra) / count
        return out

    def route(self, embedding: np.ndarray, state: StateView) -> str:
        """The pool of the nearest centroid (ties: the easier pool)."""
        cents = self.centroids(state)
        dist = {p: float(np.sum((embedding - c) ** 2)) for p, c in cents.items()}
        return min(POOLS, key=lambda p: dist.get(p, np.inf))

    def decide(self, obs: Observation, state: StateView) -> Action:
        if obs.layer == 0:
            if obs.embedding is None:
                raise ConfigError(f"policy {self.name!r}, sample {obs.sample_id!r}: needs the input embedding")
            pool = self.route(np.asarray(obs.embedding, dtype=np.float64), state)
            if pool == "moderate":
                return Offload("edge", run_to=self.n, threshold=self.alpha)
            if pool == "hard":
                return Offload("cloud")
            return Continue(1, exits="last")
        if obs.layer >= self.m or obs.confidence() >= self.alpha:
            return Exit()
        return Continue(obs.layer + 1, exits="last")

    def context(self, obs: Observation, action: Action, state: StateView | None = None) -> dict[str, Any]:
        if isinstance(action, Offload):
            return {"pool": "moderate" if action.tier == "edge" else "hard"}
        return {"pool": "easy"}

    def learn_pool(self, pool: str, embedding: np.ndarray) -> Delta:
        return {f"sum_{pool}": np.asarray(embedding, dtype=np.float64), f"n_{pool}": 1.0}

    def learn(self, event: Event, state: StateView) -> Delta:
        if not self.adaptive or event.stage != "start":  # the pool is known once the sample is routed
            return {}
        return self.learn_pool(event.context["pool"], event.observation.embedding)

    def describe(self, state) -> dict[str, Any]:
        view = state if isinstance(state, StateView) else StateView(state)
        return {"alpha": self.alpha, "m": self.m, "n": self.n,
                "learned": {p: view.number(f"n_{p}") for p in POOLS},
                "centroid_norms": {p: round(float(np.linalg.norm(c)), 6) for p, c in self.centroids(view).items()}}


class DimeeAdaptive(DimeeFixed):
    """DIMEE with running-mean pool centroids updated per sample (Ours-D, Algorithm 2)."""

    name = "dimee-adaptive"
    adaptive: ClassVar[bool] = True
