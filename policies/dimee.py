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


def tier_costs(pool: np.ndarray, layer: np.ndarray, cost: CostModel, num_layers: int, first: int = 0) -> np.ndarray:
    """The cost model's price of each sample, served by tier ``pool`` (0 mobile, 1 edge, 2 cloud) up to ``layer``.

    ``first`` layers (and their exits) ran on the mobile before the sample was routed (0: routed on the
    embedding alone, as the paper; 1: ``dimee-probe[features=exit1]``); the edge and cloud resume after them.
    """
    layer = np.asarray(layer, dtype=np.float64)
    mobile = (cost.device_layer + cost.device_exit) * np.where(pool == 0, layer, first)
    edge = cost.offload_edge + cost.edge_layer * (layer - first)
    cloud = cost.offload_cloud + cost.cloud_fee + cost.cloud_layer * (num_layers - first)
    return mobile + np.where(pool == 1, edge, 0.0) + np.where(pool == 2, cloud, 0.0)


def cloud_cost(cost: CostModel, num_layers: int) -> float:
    """BERT in the cloud, DIMEE Table I's reference: offload, fee and the cloud's layers."""
    return float(tier_costs(np.array([2]), np.array([num_layers]), cost, num_layers)[0])


def served_layer(conf: np.ndarray, pool: np.ndarray, alpha: float, m: int, n: int) -> np.ndarray:
    """Where a sample routed to ``pool`` exits: the first exit >= α within the tier's layers, else its last layer."""
    num_layers = conf.shape[1]
    hit = conf >= alpha
    top = np.choose(pool, [m, n, num_layers])
    within = hit & (np.arange(1, num_layers + 1)[None, :] <= top[:, None])
    return np.where(pool == 2, num_layers, np.where(within.any(1), within.argmax(1) + 1, top))


def pool_rewards(conf: np.ndarray, pool: np.ndarray, layer: np.ndarray, cost: CostModel, mu: float | None = None) -> np.ndarray:
    """Eq. 2 for every sample, given its pool and exit layer: C_i − μ·cost, μ converting λ units into confidence.

    Eq. 2 as printed subtracts λ counts from a confidence <= 1 (μ = 1): mobile exit 1 then beats every other
    outcome on every sample. μ is the unstated scale (SplitEE's reward has the same one, μ = 0.1).
    """
    mu = cost.mu if mu is None else mu
    return conf[np.arange(len(pool)), layer - 1] - mu * tier_costs(pool, layer, cost, conf.shape[1])


def pool_shares(conf: np.ndarray, alpha: float, m: int, n: int) -> np.ndarray:
    """Share of the samples in the easy, moderate and hard pools at threshold α."""
    pool, _ = assign_pools(conf, alpha, m, n)
    return np.bincount(pool, minlength=3) / len(pool)


def alpha_grid(conf: np.ndarray, classes: int, m: int, n: int, *, points: int = 10, max_jump: float = 0.02,
               rounds: int = 6) -> np.ndarray:
    """The paper's α grid (``points`` values from 1/C to 1), bisected wherever neighbours move > ``max_jump`` of the samples.

    With ten points the pools jump between degenerate ends (all mobile / all cloud) from one value to the
    next; bisecting where the pool shares move fast gives the α search the values in between.
    """
    grid = list(np.linspace(1.0 / classes, 1.0, points))
    shares = {a: pool_shares(conf, a, m, n) for a in grid}
    for _ in range(rounds):
        added = []
        for a, b in zip(grid[:-1], grid[1:]):
            if np.abs(shares[a] - shares[b]).max() > max_jump:
                mid = (a + b) / 2
                shares[mid] = pool_shares(conf, mid, m, n)
                added.append(mid)
        if not added:
            break
        grid = sorted(grid + added)
    return np.array(grid)


#: Conversion factors μ tried by the calibration (λ units → confidence), log-spaced; the paper gives none.
MU_GRID = tuple(float(x) for x in np.geomspace(1e-3, 1.0, 31))


def _min_pool(n: int) -> int:
    return max(2, int(np.ceil(0.01 * n)))


def best_alpha(conf: np.ndarray, grid: np.ndarray, m: int, n: int, cost: CostModel, mu: float) -> tuple[float, dict[str, float]]:
    """α maximising Eq. 3 (the mean of Eq. 2) among the grid values that leave every pool >= 1% of the samples."""
    floor = _min_pool(len(conf))
    expected = {}
    for alpha in grid:
        pool, layer = assign_pools(conf, alpha, m, n)
        if np.bincount(pool, minlength=3).min() >= floor:
            expected[float(alpha)] = float(pool_rewards(conf, pool, layer, cost, mu).mean())
    if not expected:
        short = np.array([np.bincount(assign_pools(conf, a, m, n)[0], minlength=3) < floor for a in grid]).sum(0)
        which = ", ".join(f"{p} at {k} of {len(grid)}" for p, k in zip(POOLS, short) if k)
        raise ConfigError(f"dimee calibration: no α in [{grid[0]:.3f}, 1] leaves every pool >= {floor} samples "
                          f"(pools short of it: {which}; m={m}, n={n}): choose other m, n or more validation data")
    alpha = max(expected, key=expected.get)
    return alpha, expected


def confusion(true_pool: np.ndarray, routed: np.ndarray) -> list[list[int]]:
    """3×3 counts, rows = the pool Algorithm 1 puts a sample in, columns = the pool it was routed to."""
    out = np.zeros((3, 3), dtype=int)
    np.add.at(out, (true_pool, routed), 1)
    return out.tolist()


def centroid_route(emb: np.ndarray, centroids: dict[str, list[float]]) -> np.ndarray:
    """Nearest pool centroid (Euclidean) for every row of ``emb`` (ties: the easier pool)."""
    dist = np.stack([np.sum((emb - np.asarray(centroids[p])) ** 2, axis=1) if p in centroids
                     else np.full(len(emb), np.inf) for p in POOLS], axis=1)
    return dist.argmin(1)


#: Principal components of the embedding the probe keeps (384 → 32: the fit is 10× faster, the routing as good).
PROBE_COMPONENTS = 32


def exit1_features(exit1: np.ndarray | None, rows: int) -> np.ndarray:
    """Exit 1's sorted probabilities and normalised entropy ``[N, C + 1]`` (``[N, 0]`` when the probe has no exit 1)."""
    if exit1 is None:
        return np.zeros((rows, 0))
    p = np.clip(np.sort(exit1, axis=-1)[..., ::-1], 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(-1, keepdims=True) / np.log(p.shape[-1])
    return np.concatenate([p, entropy], axis=-1)


def _probe_inputs(emb: np.ndarray, extra: np.ndarray, weights: dict[str, Any]) -> np.ndarray:
    x = np.concatenate([(emb - np.asarray(weights["pca_mean"])) @ np.asarray(weights["pca"]).T, extra], axis=1)
    return (x - np.asarray(weights["mean"])) / np.asarray(weights["scale"])


def fit_probe(emb: np.ndarray, extra: np.ndarray, pool: np.ndarray, seed: int = 0) -> tuple[dict[str, Any], np.ndarray]:
    """A multinomial logistic regression (scikit-learn) from features to pools: JSON weights and 5-fold predictions.

    Features: the embedding's first :data:`PROBE_COMPONENTS` principal components and ``extra`` (exit 1's),
    standardised. The out-of-fold predictions score the router on the validation split without it having
    seen the sample.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    pca = PCA(min(PROBE_COMPONENTS, *emb.shape), random_state=seed).fit(emb)
    weights: dict[str, Any] = {"pca_mean": pca.mean_.tolist(), "pca": pca.components_.tolist()}
    x = np.concatenate([pca.transform(emb), extra], axis=1)
    weights.update(mean=x.mean(0).tolist(), scale=(x.std(0) + 1e-6).tolist())
    z = _probe_inputs(emb, extra, weights)
    coef, intercept = np.zeros((3, z.shape[1])), np.full(3, -1e9)
    present = np.unique(pool)
    if len(present) == 1:                       # one pool only: route everything there
        intercept[present[0]] = 0.0
        oof = np.full(len(pool), present[0])
    else:
        model = LogisticRegression(C=1.0, max_iter=300, random_state=seed)
        folds = int(min(5, np.bincount(pool)[present].min()))
        oof = cross_val_predict(model, z, pool, cv=folds) if folds >= 2 else np.full(len(pool), np.bincount(pool).argmax())
        model.fit(z, pool)
        if len(present) == 2:                   # binary: one logit for the second class against the first
            coef[present[1]], intercept[present[1]] = model.coef_[0], model.intercept_[0]
            intercept[present[0]] = 0.0
        else:
            coef[present], intercept[present] = model.coef_, model.intercept_
    weights.update(coef=coef.tolist(), intercept=intercept.tolist())
    return weights, oof


def probe_route(emb: np.ndarray, extra: np.ndarray, weights: dict[str, Any]) -> np.ndarray:
    """The probe's pool for every row (0 easy, 1 moderate, 2 hard)."""
    z = _probe_inputs(emb, extra, weights)
    return (z @ np.asarray(weights["coef"]).T + np.asarray(weights["intercept"])).argmax(-1)


def calibrate(matrix, *, cost: CostModel, m: int | None = None, n: int | None = None, mu: float | None = None,
              tolerance: float = 0.005, seed: int = 0) -> dict[str, Any]:
    """DIMEE's calibration with the paper's router, the pool centroids (see :func:`fit_router`)."""
    return fit_router(matrix, cost=cost, m=m, n=n, mu=mu, tolerance=tolerance, seed=seed)


def fit_router(matrix, *, cost: CostModel, m: int | None = None, n: int | None = None, mu: float | None = None,
               tolerance: float = 0.005, router: str = "centroid", features: str = "embedding",
               seed: int = 0) -> dict[str, Any]:
    """Pools, α, μ and the router from a labelled validation matrix (DIMEE Alg. 1, Eq. 2–3), as a JSON-able dict.

    For each μ in :data:`MU_GRID` (or the given ``mu``), α*(μ) maximises Eq. 3 on the refined grid; the pools at
    α* fit the router (``centroid``: the paper's pool means; ``probe``: :func:`fit_probe`), which then routes
    the validation samples as deployed. The chosen μ is the cheapest whose routed validation accuracy is within
    ``tolerance`` of the final exit's (0.5 pt; the paper reports −0.3 … +0.1 pt) and cheaper than the cloud;
    when none is, every sample goes to the cloud (``route_all: hard``), which is the final exit's accuracy.
    A given ``mu`` is used as it is (no search, no fallback). Our reading of the
    paper: it states no scale between confidence and cost, so μ is chosen like the paper's other thresholds,
    on the validation split.
    """
    if matrix.embeddings is None:
        raise ConfigError("dimee calibration needs a matrix with input embeddings (embeddings array)")
    if matrix.labels is None:
        raise ConfigError("dimee calibration needs a labelled validation matrix (labels array)")
    if router not in ("centroid", "probe") or features not in ("embedding", "exit1"):
        raise ConfigError(f"dimee calibration: router must be centroid|probe and features embedding|exit1, "
                          f"got {router!r}, {features!r}")
    probs = matrix.probs.astype(np.float64)
    num_layers, classes = probs.shape[1], probs.shape[2]
    dm, dn = default_split(num_layers)
    m = dm if m is None else int(m)
    n = dn if n is None else int(n)
    if not 1 <= m <= n <= num_layers:
        raise ConfigError(f"dimee calibration: need 1 <= m <= n <= {num_layers}, got m={m}, n={n}")
    conf = probs.max(-1)
    correct = probs.argmax(-1) == matrix.labels[:, None]
    emb = matrix.embeddings.astype(np.float64)
    first = 1 if router == "probe" and features == "exit1" else 0
    extra = exit1_features(probs[:, 0] if first else None, len(emb))
    rows = np.arange(len(conf))
    grid = alpha_grid(conf, classes, m, n)
    fitted: dict[float, tuple[dict[str, Any], np.ndarray, np.ndarray]] = {}

    def fit(alpha: float):
        if alpha not in fitted:
            pool, _ = assign_pools(conf, alpha, m, n)
            if router == "centroid":
                model = {p: emb[pool == k].mean(0).tolist() for k, p in enumerate(POOLS)}
                routed = centroid_route(emb, model)
            else:
                rest = conf[:, 0] < alpha if first else np.ones(len(pool), bool)  # exit 1 settles the rest
                model, oof = fit_probe(emb[rest], extra[rest], pool[rest], seed)
                routed = pool.copy()
                routed[rest] = oof
            layer = served_layer(conf, routed, alpha, m, n)
            price = tier_costs(routed, layer, cost, num_layers, first)
            fitted[alpha] = (model, routed, np.array([correct[rows, layer - 1].mean(), price.mean()]))
        return fitted[alpha]

    search, rewards = [], {}
    for value in (MU_GRID if mu is None else (float(mu),)):
        alpha, rewards[value] = best_alpha(conf, grid, m, n, cost, value)
        _, routed, (acc, price) = fit(alpha)
        search.append({"mu": value, "alpha": alpha, "accuracy": float(acc), "cost": float(price),
                       "routed_shares": (np.bincount(routed, minlength=3) / len(routed)).round(4).tolist()})
    final = float(correct[:, -1].mean())
    cloud = cloud_cost(cost, num_layers)
    ok = [r for r in search if r["accuracy"] >= final - tolerance - 1e-12 and r["cost"] < cloud]
    # No routing within the tolerance and cheaper than the cloud: the cloud alone is (it is the final exit).
    # A μ given by the user is their trade-off and is kept as it is.
    chosen = search[0] if mu is not None else min(ok, key=lambda r: (r["cost"], -r["accuracy"])) if ok else \
        {**max(search, key=lambda r: r["accuracy"]), "accuracy": final, "cost": cloud, "route_all": "hard"}
    alpha, mu_used = chosen["alpha"], chosen["mu"]
    model, routed, _ = fit(alpha)
    expected = rewards[mu_used]
    pool, _ = assign_pools(conf, alpha, m, n)
    if "route_all" in chosen:
        routed = np.full(len(pool), 2)
    out: dict[str, Any] = {
        "policy": "dimee", "router": router, "features": features, "alpha": alpha, "m": m, "n": n,
        "cost_model": cost.name, "mu": mu_used, "tolerance": tolerance, "alpha_grid_size": int(len(grid)),
        "expected_reward": {f"{a:.4f}": round(r, 6) for a, r in expected.items()},
        "mu_search": search,
        "centroids": {p: emb[pool == k].mean(0).tolist() for k, p in enumerate(POOLS)},
        "counts": {p: int((pool == k).sum()) for k, p in enumerate(POOLS)},
        "confusion": confusion(pool, routed),
        "validation": {"samples": int(len(conf)), "final_exit_accuracy": final, "accuracy": chosen["accuracy"],
                       "cost": chosen["cost"], "cloud_cost": cloud, "cost_ratio_vs_cloud": chosen["cost"] / cloud},
    }
    if router == "probe":
        out["probe"] = model
    if "route_all" in chosen:
        out["route_all"] = chosen["route_all"]
    out["validation_accuracy"] = chosen["accuracy"]
    return out


class DimeeFixed(Policy):
    """DIMEE with the calibration's pool centroids (Ours-F); ``router=random`` is Table I's Random baseline."""

    name = "dimee-fixed"
    adaptive: ClassVar[bool] = False
    routers: ClassVar[tuple[str, ...]] = ("centroid", "random")

    def __init__(self, *, calibration: str | None = None, router: str | None = None, **kw) -> None:
        super().__init__(**kw)
        self.calibration = cal = load_calibration(calibration, self.name, accept=("dimee",), required=True)
        self.router = router or (self.routers[0])
        if self.router not in self.routers:
            raise ConfigError(f"policy {self.name!r}: router must be one of {self.routers}, got {self.router!r}")
        try:
            self.alpha = self.setting("alpha", cal["alpha"], float, 0.0, 1.0)
            self.m = self.setting("m", cal["m"], int, 1, self.num_layers)
            self.n = self.setting("n", cal["n"], int, self.m, self.num_layers)
            self._sums = {p: np.asarray(c, dtype=np.float64) * float(cal["counts"][p])
                          for p, c in cal["centroids"].items() if p in POOLS and cal["counts"].get(p)}
            self._counts = {p: float(cal["counts"][p]) for p in self._sums}
        except KeyError as exc:
            raise ConfigError(f"policy {self.name!r}: calibration lacks {exc.args[0]!r}") from None
        if not self._sums:
            raise ConfigError(f"policy {self.name!r}: calibration has no pool centroids")
        self.route_all = cal.get("route_all")
        if self.route_all not in (None,) + POOLS:
            raise ConfigError(f"policy {self.name!r}: calibration route_all must be one of {POOLS}, got {self.route_all!r}")

    calibrate = staticmethod(calibrate)

    def params(self) -> dict[str, Any]:
        return {"seed": self.seed, "router": self.router, "calibration": calibration_digest(self.calibration)}

    def centroids(self, state: StateView) -> dict[str, np.ndarray]:
        """Current pool centroids: calibration sums and counts plus what was learned online."""
        out = {}
        for pool, total in self._sums.items():
            extra = state.get(f"sum_{pool}")
            count = self._counts[pool] + state.number(f"n_{pool}")
            out[pool] = (total if extra is None else total + extra) / count
        return out

    def route(self, obs: Observation, state: StateView) -> str:
        """The sample's pool: nearest centroid of its embedding (ties: the easier pool), or a uniform draw."""
        if self.route_all and self.router != "random":
            return self.route_all
        if self.router == "random":
            return POOLS[int(self.sample_rng(obs.sample_id).integers(3))]
        if obs.embedding is None:
            raise ConfigError(f"policy {self.name!r}, sample {obs.sample_id!r}: needs the input embedding")
        return POOLS[int(centroid_route(np.asarray(obs.embedding, dtype=np.float64)[None], self.centroids(state))[0])]

    def dispatch(self, pool: str, layer: int) -> Action:
        """The action for a sample routed to ``pool`` after ``layer`` mobile layers."""
        if pool == "moderate":
            return Offload("edge", run_to=self.n, threshold=self.alpha)
        if pool == "hard":
            return Offload("cloud")
        return Exit() if layer >= self.m else Continue(layer + 1, exits="last")

    def decide(self, obs: Observation, state: StateView) -> Action:
        if obs.layer == 0:
            return self.dispatch(self.route(obs, state), 0)
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
        if not self.adaptive or event.stage != "start" or event.context.get("pool") not in self._sums:
            return {}  # the pool is known once the sample is routed
        return self.learn_pool(event.context["pool"], event.observation.embedding)

    def describe(self, state) -> dict[str, Any]:
        view = state if isinstance(state, StateView) else StateView(state)
        return {"alpha": self.alpha, "m": self.m, "n": self.n, "router": self.router,
                "learned": {p: view.number(f"n_{p}") for p in POOLS},
                "centroid_norms": {p: round(float(np.linalg.norm(c)), 6) for p, c in self.centroids(view).items()}}


class DimeeAdaptive(DimeeFixed):
    """DIMEE with running-mean pool centroids updated per sample (Ours-D, Algorithm 2)."""

    name = "dimee-adaptive"
    adaptive: ClassVar[bool] = True
    routers: ClassVar[tuple[str, ...]] = ("centroid",)


def calibrate_probe(matrix, *, cost: CostModel, features: str = "exit1", m: int | None = None, n: int | None = None,
                    mu: float | None = None, tolerance: float = 0.005, seed: int = 0) -> dict[str, Any]:
    """:func:`fit_router` with the logistic-regression router (``dimee-probe``)."""
    return fit_router(matrix, cost=cost, router="probe", features=features, m=m, n=n, mu=mu, tolerance=tolerance,
                      seed=seed)


class DimeeProbe(DimeeFixed):
    """DIMEE routed by a linear probe trained on the pools (beyond the paper): embedding, or exit 1 as well.

    ``features=embedding`` routes before any layer, like the paper. ``features=exit1`` (default) runs mobile
    layer 1 and its exit for every sample first (a counted λ_m each): a sample confident there exits, the
    rest are routed by the probe over the embedding and exit 1's probabilities, and the edge or cloud resumes
    from layer 1's hidden state.
    """

    name = "dimee-probe"
    routers: ClassVar[tuple[str, ...]] = ("probe",)
    calibrate = staticmethod(calibrate_probe)

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        if "probe" not in self.calibration:
            raise ConfigError(f"policy {self.name!r}: calibration has no probe (calibrate it as dimee-probe)")
        self.weights = self.calibration["probe"]
        self.first = 1 if self.calibration.get("features") == "exit1" else 0

    def probe(self, obs: Observation) -> str:
        if obs.embedding is None:
            raise ConfigError(f"policy {self.name!r}, sample {obs.sample_id!r}: needs the input embedding")
        emb = np.asarray(obs.embedding, dtype=np.float64)[None]
        extra = exit1_features(np.asarray(obs.probs[1], dtype=np.float64)[None] if self.first else None, 1)
        return POOLS[int(probe_route(emb, extra, self.weights)[0])]

    def decide(self, obs: Observation, state: StateView) -> Action:
        if self.route_all and obs.layer == 0:
            return self.dispatch(self.route_all, 0)
        if obs.layer < self.first:
            return Continue(self.first, exits="last")
        if obs.layer == self.first:
            if obs.layer and obs.confidence() >= self.alpha:
                return Exit()
            return self.dispatch(self.probe(obs), obs.layer)
        return super().decide(obs, state)
