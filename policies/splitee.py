"""SplitEE and SplitEE-S (Bajpai et al.): UCB over the split layer, exit there if confident, else offload.

Arm i (1-based) = run layers 1..i on the device. Reward, SplitEE Eq. 1::

    r(i) = C_i - μ γ_i            if C_i >= α or i = L    (exit on the device)
           C_L - μ (γ_i + o)      otherwise               (offload; C_L comes from the cloud)

with γ_i and o taken from the cost model of what really ran (SplitEE: λ1·i + λ2, one exit evaluated;
SplitEE-S: λ·i, every exit evaluated). Arm choice, Algorithm 1 line 6: ``argmax Q(i) + β √(ln t / N(i))``.

**Delayed rewards.** A pull is *pending* from the moment the arm is chosen (``start`` stage, before the
layers run) until its reward is known: at once for an exit (``decision`` stage), in the ``feedback``
stage for an offload, whose reward needs C_L from the cloud. ``p_i`` counts pending pulls. The index
uses ``N(i) + P(i)`` in the exploration term (a pending pull already shrinks the bonus, so the samples
of one batch, or of a slow cloud's backlog, do not all go to the same arm), ``t`` counts every pull,
and Q(i) averages completed rewards only. An arm whose pulls are all still
pending has no mean yet: it is scored by its best possible reward ``1 - μ γ_i`` (optimistic, bounded).

``bonus="ucb1"`` is that index as printed. ``bonus="tuned"`` (default) is UCB1-Tuned (Auer et al. 2002:
the bonus scaled by the arm's reward variance, state ``v<i>`` = sum of squares), clipped at ``1 - μ γ_i``,
with pending pulls scored at the arm's mean offload reward (``on<i>``, ``os<i>``; before any, the mean
C_L seen, ``ocl_n``/``ocl_s``): exits complete at once and offloads only with feedback, so under a delay
the completed rewards alone overrate an arm. α per arm: see :class:`SplitArms` and :mod:`policies.alpha`.
Arms never pulled (N + P = 0) are played first, lowest layer first (Algorithm 1 line 3).

State (additive): ``t``; per arm ``n<i>`` (completed rewards), ``s<i>`` (their sum), ``p<i>`` (pending).

**SplitEE-S side observations** (§4.2): the device evaluates every exit up to the split, so one sample
scores every arm j <= i. Arms with C_j >= α are rewarded at once. Arms with C_j < α need C_L:
``side_info=oracle`` (paper-faithful, offline only) reads it from ``obs.hindsight``; ``side_info=observed``
(default, deployable) uses only what the stream reveals: for an offloaded sample those arms are pending
until the real C_L arrives in feedback; for a sample that exited at i, C_L is never observed, so it is
estimated by ``cl_estimate``: ``deepest`` (default: C_i, the confidence of the exit the sample left by)
or ``mean`` (the running mean of the C_L observed in feedback, state ``cl_n``, ``cl_s``; before any, C_i).
Offloaded samples are the hard ones, so their mean C_L underrates the C_L of a sample confident enough
to exit, and that bias penalises shallow arms; C_i is the sample's own, closer proxy (on IMDb it gave the
same regret as the oracle side information, ``mean`` about a third more).

**Non-stationary streams** (``discount`` γ < 1 and/or ``window`` W > 0; ``splitee-drift``, ``splitee-s-drift``).
State must stay additive, so time is bucketed: bucket b holds pulls number bk + 1 .. bk + k (``bucket`` k;
``t``, the all-time pull count that every worker shares, numbers them), and every statistic above (``n``,
``s``, ``v``, ``on``, ``os``, ``ocl_*``, ``cl_*``) is kept per bucket as ``n<i>@<b>`` etc. A reward lands in
the bucket of its pull (``b`` in the context, echoed by the feedback), so a late feedback is still
applied once, to the right bucket, by whichever worker gets it. Reads combine buckets: discounted UCB
(Garivier & Moulines) weights bucket b by γ^(k·(B−b)) (B = floor(t / k), the bucket of the next pull; k = 1
is their per-sample discount) and ignores buckets once that weight is below 1% (:data:`DISCOUNT_TAIL`);
sliding-window UCB takes the last ceil(W/k) buckets with weight 1 (between W − k and W samples); both set:
weights within the window. ``t`` in the bonus is the weighted number of pulls in those buckets. Ignored
buckets are never needed again: :meth:`SplitEE.stale_fields` lists them for deletion. What stays
all-time, and why: ``t`` (the clock), the pending counts ``p<i>`` (pulls in flight, not a statistic: they
return to 0), and the online α's vectors (:mod:`policies.alpha`; 3 × bins floats per arm and bucket
would multiply the state by the horizon, and the agreement of an exit with the final one moves less
than the arms' means). An arm with nothing in the combined buckets and nothing pending is played again
(Algorithm 1 line 3 per window). A drift signal from outside calls :meth:`SplitEE.on_drift`: a cut
flag ``cut@<B>`` after which buckets older than B are ignored (idempotent, so safe under redelivery),
in a new epoch that leaves the online α's vectors behind (α restarts from its prior, as on a reset).
Cost per sample: the start and decision write 3–5 bucket fields (SplitEE-S: 3 per evaluated arm); a
pull reads the combined sums, kept per state view and brought up to date with the deltas queued since
(one pass over the view's fields, or H × (5L + 4) look-ups if that is fewer, only for a new view or a new
bucket: once per batch); Redis holds 5L + 4 fields per bucket (34 on 6 layers) until pruned. The
``splitee-drift`` defaults (γ = 0.9998, k = 100: a memory of ≈ 5000 samples, H = 231 buckets) are the
longest-lived setting tried; shorter memories cost more regret on a stationary stream than they saved
after the SST-2 → IMDb boundary, where the best split does not change (README, issue #12).

>>> from stream.costs import splitee
>>> from policies.base import StateView
>>> p = SplitEE(cost=splitee(offload=5.0), num_layers=3, alpha=0.8, beta=1.0, bonus="ucb1")
>>> p.pull(StateView())                                   # nothing played yet: arm 1 first
1
>>> state = StateView({"t": 3.0, "n1": 1.0, "s1": 0.3, "n2": 1.0, "s2": 0.7, "n3": 1.0, "s3": 0.6})
>>> [round(x, 4) for x in p.index(state)]                 # Q(i) + sqrt(ln 3 / 1)
[1.3481, 1.7481, 1.6481]
>>> p.pull(state)
2
>>> w = SplitEE(cost=splitee(offload=5.0), num_layers=3, alpha=0.8, bonus="ucb1", window=20, bucket=10)
>>> w.horizon, w.bucket_weights(StateView({"t": 35.0}))      # the current bucket 3 and the one before
(2, [(3, 1.0), (2, 1.0)])
>>> state = StateView({"t": 35.0, "n1@1": 4.0, "s1@1": 3.6, "n1@3": 2.0, "s1@3": 0.4, "n2@2": 1.0, "s2@2": 0.7,
...                    "n3@3": 1.0, "s3@3": 0.6})
>>> stats = w.stats(state)                                     # bucket 1 is out of the window
>>> stats.number("n1"), round(stats.number("s1"), 4), stats.number("t")
(2.0, 0.4, 15.0)
>>> w.on_drift(state)
{'cut@3': 1.0, 'cuts': 1.0}
"""

from __future__ import annotations

import functools
import math
import re
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np

from stream.costs import CostModel, Trace
from stream.errors import ConfigError

from policies.base import Action, Continue, Delta, Event, Exit, ExitMode, Observation, Offload, Policy, StateView
from policies.alpha import LossKind, alpha_from_matrix, bin_of, estimate_alpha, sample_loss
from policies.calibration import calibration_digest, load_calibration


def choose_alpha(matrix, *, cost: CostModel, tolerance: float = 0.01, step: float = 0.005) -> dict[str, Any]:
    """α from a labelled validation matrix (SplitEE takes it from the validation split, §5.2).

    For every α on a grid from 1/C to 1 (``step``) and every split i, the rule "exit at i if C_i >= α,
    else the final layer in the cloud" is scored on the validation samples; the split SplitEE would
    converge to is the one of highest mean Eq. 1 reward (label-free). Among the α whose accuracy at
    that split is within ``tolerance`` of the final exit's, the one of lowest mean cost is chosen
    (ties: the larger α); if none is, the most accurate.
    """
    if matrix.labels is None:
        raise ConfigError("splitee calibration needs a labelled matrix (labels array)")
    if not 0 <= tolerance < 1:
        raise ConfigError(f"splitee calibration: tolerance must be in [0, 1), got {tolerance!r}")
    probs = matrix.probs.astype(np.float64)
    n, layers, classes = probs.shape
    conf = probs.max(-1)
    correct = probs.argmax(-1) == matrix.labels[:, None]
    probe = SplitEE(cost=cost, num_layers=layers, num_classes=classes, alpha=0.5)
    stay = np.array([probe.arm_cost(i, "device") for i in range(1, layers + 1)])
    away = np.array([probe.arm_cost(i, "cloud") for i in range(1, layers + 1)])
    final = float(correct[:, -1].mean())
    rows = []
    for alpha in np.arange(1.0 / classes, 1.0 + 1e-9, step):
        exit_ = (conf >= alpha) | (np.arange(layers) == layers - 1)[None, :]
        reward = np.where(exit_, conf - cost.mu * stay, conf[:, -1:] - cost.mu * away).mean(0)
        arm = int(np.argmax(reward))
        acc = float(np.where(exit_[:, arm], correct[:, arm], correct[:, -1]).mean())
        spent = float(np.where(exit_[:, arm], stay[arm], away[arm]).mean())
        rows.append({"alpha": round(float(alpha), 6), "arm": arm + 1, "accuracy": acc, "cost": spent})
    ok = [r for r in rows if r["accuracy"] >= final - tolerance - 1e-12]
    best = min(ok, key=lambda r: (r["cost"], -r["alpha"])) if ok else max(rows, key=lambda r: r["accuracy"])
    return {"policy": "splitee", "alpha": best["alpha"], "rule": "lowest-cost alpha within tolerance",
            "tolerance": tolerance, "cost_model": cost.name, "offload_cloud": cost.offload_cloud,
            "validation": {"samples": n, "final_exit_accuracy": final, "arm": best["arm"],
                           "accuracy": best["accuracy"], "cost": best["cost"]}}


AlphaRule = Literal["online", "fixed"]
#: Accuracy drop (vs the final exit) the online α allows per sample: the paper's own 1-point tolerance (§5.2).
ONLINE_TARGET = 0.01


class SplitArms:
    """The arms of a split policy: arm i runs layers 1..i, exits there if C_i >= α_i, else offloads.

    ``alpha_rule="fixed"`` (the paper, §5.2): one α for every arm, given or from the source's labelled
    validation split (``calibration=FILE``). ``alpha_rule="online"``: α_i learned from the stream by
    agreement with the final exit (:mod:`policies.alpha`), starting from that same α until ``warmup``
    final predictions of arm i have come back.
    """

    num_layers: int
    num_classes: int
    cost: CostModel
    exits: ClassVar[ExitMode] = "last"

    def __init__(self, *, alpha: float | None = None, calibration: str | None = None,
                 alpha_rule: AlphaRule = "online", target: float = ONLINE_TARGET, probe: float = 0.05,
                 loss: LossKind = "teacher", bins: int = 50, prior: float = 0.0, warmup: int = 30, **kw) -> None:
        super().__init__(**kw)
        self.calibration = load_calibration(calibration, self.name, accept=("splitee",))
        self.alpha = self.setting("alpha", self.calibration.get("alpha", 0.9) if alpha is None else alpha,
                                  float, 0.0, 1.0)
        if alpha_rule not in ("online", "fixed"):
            raise ConfigError(f"policy {self.name!r}: alpha_rule must be 'online' or 'fixed', got {alpha_rule!r}")
        if loss not in ("teacher", "disagree"):
            raise ConfigError(f"policy {self.name!r}: loss must be 'teacher' or 'disagree', got {loss!r}")
        self.alpha_rule, self.loss = alpha_rule, loss
        self.target = self.setting("target", target, float, 0.0, 1.0)
        self.probe = self.setting("probe", probe, float, 0.0, 1.0)
        self.bins = self.setting("bins", bins, int, 2)
        self.prior = self.setting("prior", prior, float, 0.0)
        self.warmup = self.setting("warmup", warmup, int, 0)

    calibrate = staticmethod(choose_alpha)

    def params(self) -> dict[str, Any]:
        """α, its rule's settings, the seed and the calibration digest (subclasses add their own)."""
        out = {"alpha": self.alpha, "seed": self.seed, "calibration": calibration_digest(self.calibration),
               "alpha_rule": self.alpha_rule}
        if self.alpha_rule == "online":
            out.update(target=self.target, probe=self.probe, loss=self.loss, bins=self.bins, prior=self.prior,
                       warmup=self.warmup)
        return out

    def alpha_for(self, arm: int, state: StateView) -> float:
        """α of ``arm`` now: the fixed one, or the online estimate once ``warmup`` samples were observed."""
        if self.alpha_rule == "fixed" or arm == self.num_layers:
            return self.alpha
        seen = state.get(f"ao{arm}")
        if seen is None or float(np.sum(seen)) < max(self.warmup, 1):
            return self.alpha
        return estimate_alpha(state[f"am{arm}"], seen, state[f"al{arm}"], classes=self.num_classes,
                              target=self.target, prior=self.prior)[0]

    def alpha_estimate(self, arm: int, state: StateView) -> dict[str, Any]:
        """What ``policy show`` prints for an arm: α now, the drop it estimates, and the counts behind it."""
        mass, seen = state.get(f"am{arm}"), state.get(f"ao{arm}")
        out: dict[str, Any] = {"alpha": round(self.alpha_for(arm, state), 6)}
        if mass is not None and seen is not None and float(np.sum(mass)) > 0:
            _, drop = estimate_alpha(mass, seen, state.get(f"al{arm}", np.zeros(self.bins)),
                                     classes=self.num_classes, target=self.target, prior=self.prior)
            out.update(estimated_drop=round(drop, 6), decided=float(np.sum(mass)), observed=float(np.sum(seen)))
        return out

    def is_probe(self, sample_id: str) -> bool:
        """Whether a confident sample is offloaded anyway to keep the α estimate alive (same draw everywhere)."""
        if self.alpha_rule != "online" or self.probe <= 0:
            return False
        return bool(self.sample_rng(f"probe:{sample_id}").random() < self.probe)

    def split_action(self, obs: Observation, state: StateView) -> Action:
        """At the split: exit if C_i >= α_i (the last layer always exits), else offload; probes offload."""
        if obs.layer == self.num_layers:
            return Exit()
        if obs.confidence() >= self.alpha_for(obs.layer, state):
            return Offload("cloud", probe=True) if self.is_probe(obs.sample_id) else Exit()
        return Offload("cloud")

    def context(self, obs: Observation, action: Action, state: StateView | None = None) -> dict[str, Any]:
        """The arm; at the split also C_i, ŷ_i (scored against the final exit in feedback) and a probe flag."""
        if isinstance(action, Continue):
            return {"arm": action.to_layer}
        out: dict[str, Any] = {"arm": obs.layer, "c": obs.confidence(), "y": int(np.argmax(obs.probs[obs.layer]))}
        if isinstance(action, Offload) and action.probe:
            out["probe"] = True
        return out

    def _onehot(self, conf: float, weight: float = 1.0) -> np.ndarray:
        v = np.zeros(self.bins)
        v[bin_of(conf, self.num_classes, self.bins)] = weight
        return v

    def alpha_decided(self, confs: dict[int, float]) -> Delta:
        """Mass of the online α estimate: each evaluated arm's bin of C_j (not the last arm: it always exits)."""
        if self.alpha_rule != "online":
            return {}
        return {f"am{j}": self._onehot(c) for j, c in confs.items() if j < self.num_layers}

    def alpha_observed(self, preds: dict[int, tuple[float, int]], final: np.ndarray) -> Delta:
        """Observed samples and their loss, per arm j: ``preds[j] = (C_j, ŷ_j)``, ``final`` = p_L."""
        if self.alpha_rule != "online":
            return {}
        out: Delta = {}
        for j, (c, y) in preds.items():
            if j >= self.num_layers:
                continue
            out[f"ao{j}"] = self._onehot(c)
            out[f"al{j}"] = self._onehot(c, sample_loss(y, np.asarray(final), self.loss))
        return out

    def hindsight_alphas(self, probs: np.ndarray) -> list[float]:
        """Per-arm α for hindsight rewards: the fixed α, or what the online rule gives on the whole matrix."""
        if self.alpha_rule == "fixed":
            return [self.alpha] * self.num_layers
        return [alpha_from_matrix(probs, i, target=self.target, loss=self.loss, bins=self.bins,  # type: ignore[arg-type]
                                  prior=self.prior)[0] for i in range(1, self.num_layers)] + [self.alpha]

    def arm_trace(self, arm: int, tier: str) -> Trace:
        """What runs when the split is ``arm``: arm layers, one exit (``last``) or every exit (``each``)."""
        exits = 1 if self.exits == "last" else arm
        remote = self.num_layers - arm if tier == "cloud" else 0
        return Trace(device_layers=arm, device_exits=exits, tier=tier, cloud_layers=remote)  # type: ignore[arg-type]

    def arm_cost(self, arm: int, tier: str) -> float:
        return self.cost.breakdown(self.arm_trace(arm, tier)).total

    def arm_rewards(self, probs: np.ndarray) -> np.ndarray:
        """Eq. 1 in hindsight for every sample and arm: ``[N, L]`` from exit probabilities ``[N, L, C]``."""
        conf = probs.max(-1)
        layers = np.arange(1, self.num_layers + 1)
        stay = np.array([self.arm_cost(i, "device") for i in layers])
        away = np.array([self.arm_cost(i, "cloud") for i in layers])
        alphas = np.array(self.hindsight_alphas(probs))
        exit_ = (conf >= alphas[None, :]) | (layers == self.num_layers)[None, :]
        return np.where(exit_, conf - self.cost.mu * stay, conf[:, -1:] - self.cost.mu * away)


#: The fields kept per bucket when bucketed: per arm count, sum, sum of squares, offload count and sum, and
#: the C_L seen in feedback (every offload; SplitEE-S's observed side information). The rest is all-time.
_BUCKETED = re.compile(r"(?:n|s|v|on|os)\d+|o?cl_[ns]")
POOLED_GLOBAL = ("ocl_n", "ocl_s", "cl_n", "cl_s")
#: A discounted bucket whose weight γ^(k·age) fell below this is ignored (its fields may be deleted).
DISCOUNT_TAIL = 0.01


class _Pooled(StateView):
    """A state view whose statistics are the combined buckets; every other field reads through."""

    def __init__(self, state: StateView, pooled: dict[str, float]) -> None:
        super().__init__()
        self._state, self._pooled = state, pooled

    def __getitem__(self, key: str):
        if _BUCKETED.fullmatch(key) or key == "t":
            if key in self._pooled:
                return self._pooled[key]
            raise KeyError(key)
        return self._state[key]

    def __iter__(self):
        return iter(set(self._pooled) | {k for k in self._state if "@" not in k and not _BUCKETED.fullmatch(k)})

    def __len__(self) -> int:
        return sum(1 for _ in self)


class SplitEE(SplitArms, Policy):
    """UCB over the split layer; only the split layer's exit is evaluated (``exits="last"``)."""

    name = "splitee"
    exits: ClassVar[ExitMode] = "last"

    def __init__(self, *, beta: float = 1.0, bonus: Literal["tuned", "ucb1"] = "tuned", discount: float = 1.0,
                 window: int = 0, bucket: int = 50, **kw) -> None:
        super().__init__(**kw)
        self.beta = self.setting("beta", beta, float, 0.0)
        if bonus not in ("tuned", "ucb1"):
            raise ConfigError(f"policy {self.name!r}: bonus must be 'tuned' or 'ucb1', got {bonus!r}")
        self.bonus = bonus
        self.discount = self.setting("discount", discount, float, 0.0, 1.0)
        if self.discount <= 0.0:
            raise ConfigError(f"policy {self.name!r}: discount must be in (0, 1], got {discount!r}")
        self.window = self.setting("window", window, int, 0)
        self.bucket = self.setting("bucket", bucket, int, 1)
        self._bucket_keys: dict[int, list[tuple[str, str]]] = {}

    def params(self) -> dict[str, Any]:
        out = {**super().params(), "beta": self.beta, "bonus": self.bonus}
        if self.bucketed:        # plain SplitEE keeps its namespace: only a non-stationary setting adds these
            out.update(discount=self.discount, window=self.window, bucket=self.bucket)
        return out

    # -- non-stationary statistics: time buckets (see the module docstring) -------------------------
    @property
    def bucketed(self) -> bool:
        """Whether statistics are kept per time bucket (a discount below 1 or a window)."""
        return self.discount < 1.0 or self.window > 0

    @functools.cached_property
    def horizon(self) -> int:
        """How many buckets, the current one included, the statistics combine (older ones are ignored)."""
        out = math.inf
        if self.window > 0:
            out = math.ceil(self.window / self.bucket)
        if self.discount < 1.0:
            out = min(out, int(math.log(DISCOUNT_TAIL) / (self.bucket * math.log(self.discount))) + 1)
        return int(out)

    def bucket_of(self, state: StateView) -> int:
        """The current bucket, that of the next pull: floor(t / k), t = pulls started so far (all workers)."""
        return int(state.number("t") // self.bucket)

    def bucket_weights(self, state: StateView) -> list[tuple[int, float]]:
        """``(bucket, weight)`` the statistics combine now, newest first: γ^(k·age), within the horizon,
        and not older than the newest drift cut (:meth:`on_drift`)."""
        now, ages = self.bucket_of(state), self._age_weights
        out = [(now - age, ages[age]) for age in range(min(self.horizon, now + 1))]
        if state.number("cuts") > 0:
            cut = next((k for k, (b, _) in enumerate(out) if state.number(f"cut@{b}") > 0), None)
            out = out if cut is None else out[:cut + 1]
        return out

    @functools.cached_property
    def _age_weights(self) -> list[float]:
        return [self.discount ** (self.bucket * age) for age in range(self.horizon)]

    def _keys_at(self, b: int) -> list[tuple[str, str]]:
        keys = self._bucket_keys.get(b)
        if keys is None:
            if len(self._bucket_keys) > 4 * self.horizon + 16:
                self._bucket_keys.clear()
            names = [f"{f}{i}" for i in range(1, self.num_layers + 1) for f in ("n", "s", "v", "on", "os")]
            keys = self._bucket_keys[b] = [(name, f"{name}@{b}") for name in names + list(POOLED_GLOBAL)]
        return keys

    def stats(self, state: StateView) -> StateView:
        """The statistics the index reads: ``state`` itself, or its buckets combined (same field names,
        ``t`` = the weighted number of pulls in those buckets); other fields (``p<i>``, α) pass through."""
        if not self.bucketed:
            return state
        t = state.number("t")
        weights = self.bucket_weights(state)
        pooled = self._pooled_cached(state, weights)
        if pooled is None:
            pooled = {}
            keys = list(state)
            if len(keys) <= len(weights) * (5 * self.num_layers + len(POOLED_GLOBAL)):  # one pass over the fields
                w = dict(weights)
                for key in keys:
                    name, _, b = key.partition("@")
                    if b and b.isdigit() and int(b) in w and _BUCKETED.fullmatch(name):
                        pooled[name] = pooled.get(name, 0.0) + w[int(b)] * float(state[key])
            else:                                   # many stale fields: look the combined buckets up instead
                for b, w in weights:
                    for name, key in self._keys_at(b):
                        value = state.get(key)
                        if value is not None:
                            pooled[name] = pooled.get(name, 0.0) + w * float(value)
        self._cache = (weakref.ref(state), state.pending, len(state.pending), weights, pooled)
        ticks = sum(w * min(self.bucket, max(0.0, t - b * self.bucket)) for b, w in weights)
        return _Pooled(state, {**pooled, "t": ticks})

    def _pooled_cached(self, state: StateView, weights: list[tuple[int, float]]) -> dict[str, float] | None:
        """The previous call's sums brought up to date with the deltas ``state`` queued since (same view, same
        buckets): one pass over the new deltas instead of every bucket's fields. None when it cannot."""
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0]() is not state or cache[1] is not state.pending or cache[3] != weights:
            return None
        pooled, w = dict(cache[4]), dict(weights)
        for delta in state.pending[cache[2]:]:
            for key, value in delta.items():
                name, _, b = key.partition("@")
                if b and b.isdigit() and int(b) in w and _BUCKETED.fullmatch(name):
                    pooled[name] = pooled.get(name, 0.0) + w[int(b)] * float(value)
        return pooled

    def _stamp(self, delta: Delta, ctx: dict[str, Any], state: StateView) -> Delta:
        """Move the statistics of ``delta`` into the bucket of the pull (``ctx['b']``, else the current one)."""
        if not self.bucketed or not delta:
            return delta
        b = int(ctx["b"]) if "b" in ctx else self.bucket_of(state)
        return {(f"{k}@{b}" if _BUCKETED.fullmatch(k) else k): v for k, v in delta.items()}

    def on_drift(self, state: StateView) -> Delta:
        """What a drift detector's signal does to this policy: the delta that starts a new epoch now.

        With buckets: ``cut@<b> = 1`` for the current bucket b, after which every bucket older than b is
        ignored (the fields stay, readable). The new epoch copies neither the pending counts (pulls in
        flight are learned by the epoch that decided them) nor the online α's vectors (:meth:`drift_drop`).
        The cut is a flag (> 0), so applying it twice, from two workers or a redelivered detection, is
        the same as once. Without
        buckets it returns ``{}``: all-time sums can only be reset or decayed by the store's generic
        new-epoch mechanism (applied once under its own key).
        """
        return {f"cut@{self.bucket_of(state)}": 1.0, "cuts": 1.0} if self.bucketed else {}

    def in_flight_fields(self) -> list[str]:
        """The pending counts: a pull's feedback goes to the epoch that decided it (see :class:`Policy`)."""
        return [f"p{arm}" for arm in range(1, self.num_layers + 1)]

    def drift_drop(self) -> list[str]:
        """Fields the epoch a cut begins does not copy: the online α's vectors (``am``, ``ao``, ``al`` per arm),
        so α starts again from its calibrated prior, as after a reset (issue #12: the hook applies to the
        online α too). Measured in the 500 samples after SST-2 → IMDb: an undiscounted bucketed cut that kept
        them paid 11.92 vs a reset's 9.13 (10 runs; with α fixed the two are equal, 12.21 / 12.81);
        splitee-drift + hook 10.94 → 10.05 once they are dropped (20 runs)."""
        if self.alpha_rule != "online":
            return []
        return [f"{kind}{arm}" for arm in range(1, self.num_layers + 1) for kind in ("am", "ao", "al")]

    def stale_fields(self, state: Mapping[str, Any]) -> list[str]:
        """Bucket fields no read uses any more (older than the horizon or a cut): safe to delete from the
        store at any time (deleting an ignored field changes no decision, and deleting twice is harmless)."""
        if not self.bucketed:
            return []
        view = state if isinstance(state, StateView) else StateView(state)
        oldest = min(b for b, _ in self.bucket_weights(view))
        return sorted(k for k in state if "@" in k and int(k.rsplit("@", 1)[1]) < oldest)

    @functools.cached_property
    def _best_reward(self) -> list[float]:
        """1 - μγ_i: the most an arm can earn (confidence 1, cheapest outcome); scores all-pending arms."""
        return [1.0 - self.cost.mu * self.arm_cost(i, "device") for i in range(1, self.num_layers + 1)]

    def index(self, state: StateView) -> list[float]:
        """The UCB index of every arm (``inf`` for an arm never pulled); see the module docstring."""
        state = self.stats(state)
        t = state.number("t")
        log_t = math.log(t) if t > 1 else 0.0
        out = []
        for i in range(1, self.num_layers + 1):
            n, pending = state.number(f"n{i}"), state.number(f"p{i}")
            if n + pending <= 0:
                out.append(math.inf)
                continue
            best = self._best_reward[i - 1]
            mean = state.number(f"s{i}") / n if n > 0 else best
            width = log_t / (n + pending)
            if self.bonus == "ucb1":
                out.append(mean + self.beta * math.sqrt(width))
                continue
            var = max(0.0, state.number(f"v{i}") / n - mean * mean) if n > 0 else 0.25
            mean = self._with_pending(i, n, pending, mean, state)
            index = mean + self.beta * math.sqrt(width * min(0.25, var + math.sqrt(2 * width)))
            out.append(min(index, best))   # no arm can earn more than 1 − μγ_i, pending or not
        return out

    def _with_pending(self, arm: int, n: float, pending: float, mean: float, state: StateView) -> float:
        """The mean with pending pulls scored as offloads: exits resolve at once and offloads only with feedback,
        so under a feedback delay the completed rewards alone overrate an arm by its pending offloads."""
        done = state.number(f"on{arm}")
        if done > 0:
            guess = state.number(f"os{arm}") / done
        elif state.number("ocl_n") > 0:
            guess = state.number("ocl_s") / state.number("ocl_n") - self.cost.mu * self.arm_cost(arm, "cloud")
        else:
            return mean
        return (mean * n + guess * pending) / (n + pending)

    def pull(self, state: StateView) -> int:
        """The arm (split layer, 1-based) for the next sample; ties go to the shallower layer."""
        return int(np.argmax(self.index(state))) + 1

    # -- Policy interface --------------------------------------------------------------------------
    def decide(self, obs: Observation, state: StateView) -> Action:
        if obs.layer == 0:
            return Continue(self.pull(state), exits=self.exits)
        return self.split_action(obs, state)

    def exit_reward(self, arm: int, conf: float) -> float:
        """Eq. 1 for exiting at ``arm`` with confidence ``conf`` (one exit evaluated, SplitEE; all, SplitEE-S)."""
        return self.reward_exit(conf, self.arm_trace(arm, "device"))

    @staticmethod
    def scored(arm: int, reward: float, offload: bool = False) -> Delta:
        """One completed reward of ``arm``: count, sum and sum of squares (UCB1-Tuned's variance); for an
        offload also its own count and sum, which score the arm's pending pulls."""
        out = {f"n{arm}": 1.0, f"s{arm}": reward, f"v{arm}": reward * reward}
        if offload:
            out.update({f"on{arm}": 1.0, f"os{arm}": reward})
        return out

    def context(self, obs: Observation, action: Action, state: StateView | None = None) -> dict[str, Any]:
        """SplitArms' context, plus the pull's bucket ``b`` when bucketed (its feedback is scored there)."""
        return {**super().context(obs, action, state), **self._when(action, state)}

    def _when(self, action: Action, state: StateView | None) -> dict[str, Any]:
        if not self.bucketed or isinstance(action, Continue):
            return {}
        t = (state if state is not None else StateView()).number("t")
        return {"b": int(max(t - 1.0, 0.0) // self.bucket)}   # the bucket of the latest pull (this one's start)

    def expiry(self, delta: Delta) -> Delta:
        """The pending counts a sample left raised (``p<i>`` > 0 after its start and decision), negated.

        >>> SplitEE(cost=__import__("stream.costs").costs.splitee(), num_layers=3, alpha=0.8).expiry(
        ...     {"t": 1.0, "p2": 1.0, "n1": 1.0, "p1": 0.0})
        {'p2': -1.0}
        """
        return {k: -float(v) for k, v in delta.items()
                if k[:1] == "p" and k[1:].isdigit() and not isinstance(v, np.ndarray) and v > 0}

    def learn(self, event: Event, state: StateView) -> Delta:
        return self._stamp(self._learn(event, state), event.context, state)

    def _learn(self, event: Event, state: StateView) -> Delta:
        ctx = event.context
        arm = int(ctx["arm"])
        if event.stage == "start":       # the pull is in flight: pending until its reward is known
            return {"t": 1.0, f"p{arm}": 1.0}
        if event.stage == "feedback":
            delta = self.alpha_observed({arm: (ctx["c"], ctx["y"])}, event.feedback.probs) if "c" in ctx else {}
            if ctx.get("probe"):         # scored as the exit it would have been, at decision
                return delta
            reward = self.reward_exit(event.feedback.confidence, event.trace)
            return {**delta, f"p{arm}": -1.0, **self.scored(arm, reward, offload=True), "ocl_n": 1.0,
                    "ocl_s": event.feedback.confidence}
        delta = self.alpha_decided({arm: event.observation.confidence(arm)})
        if event.trace.tier == "device" or ctx.get("probe"):
            reward = self.exit_reward(arm, event.observation.confidence(arm))
            return {**delta, f"p{arm}": -1.0, **self.scored(arm, reward)}
        return delta                     # offloaded: stays pending until feedback brings C_L

    def describe(self, state) -> dict[str, Any]:
        raw = state if isinstance(state, StateView) else StateView(state)
        view = self.stats(raw)
        arms = {}
        for i in range(1, self.num_layers + 1):
            n = view.number(f"n{i}")
            arms[str(i)] = {"n": n, "pending": view.number(f"p{i}"),
                            "q": round(view.number(f"s{i}") / n, 6) if n else None}
            if self.alpha_rule == "online" and i < self.num_layers:
                arms[str(i)].update(self.alpha_estimate(i, raw))
        played = {i: view.number(f"n{i}") + view.number(f"p{i}") for i in range(1, self.num_layers + 1)}
        out = {"t": raw.number("t"), "alpha": self.alpha, "alpha_rule": self.alpha_rule, "beta": self.beta,
               "arms": arms,
               "most_played_arm": max(played, key=played.get) if any(played.values()) else None}
        if self.bucketed:
            weights = self.bucket_weights(raw)
            out.update(discount=self.discount, window=self.window, bucket=self.bucket, t_effective=view.number("t"),
                       buckets=[b for b, _ in weights],
                       cut=next((b for b, _ in weights if raw.number(f"cut@{b}") > 0), None))
        return out


class SplitEES(SplitEE):
    """SplitEE with side observations: every exit up to the split is evaluated and scores its arm."""

    name = "splitee-s"
    exits: ClassVar[ExitMode] = "each"

    def __init__(self, *, side_info: Literal["observed", "oracle"] = "observed",
                 cl_estimate: Literal["mean", "deepest"] = "deepest", **kw) -> None:
        super().__init__(**kw)
        if side_info not in ("observed", "oracle"):
            raise ConfigError(f"policy {self.name!r}: side_info must be 'observed' or 'oracle', got {side_info!r}")
        if cl_estimate not in ("mean", "deepest"):
            raise ConfigError(f"policy {self.name!r}: cl_estimate must be 'mean' or 'deepest', got {cl_estimate!r}")
        self.side_info = side_info
        self.cl_estimate = cl_estimate
        self.offline_only = side_info == "oracle"  # type: ignore[misc]

    def params(self) -> dict[str, Any]:
        return {**super().params(), "side_info": self.side_info, "cl_estimate": self.cl_estimate}

    def context(self, obs: Observation, action: Action, state: StateView | None = None) -> dict[str, Any]:
        if isinstance(action, Continue):
            return {"arm": action.to_layer}
        layers = range(1, obs.layer + 1)
        view = state if state is not None else StateView()
        out: dict[str, Any] = {"arm": obs.layer, "conf": [obs.confidence(j) for j in layers],
                               "preds": [int(np.argmax(obs.probs[j])) for j in layers]}
        if self.alpha_rule == "online":  # the side arms' α as used now: their feedback must resolve the same ones
            out["alphas"] = [self.alpha_for(j, view) for j in layers]
        if isinstance(action, Offload) and action.probe:
            out["probe"] = True
        return {**out, **self._when(action, state)}

    def _side(self, j: int, conf: float, c_last: float | None, alpha: float) -> tuple[str, float | None]:
        """Arm j's outcome on this sample: ('exit', r), ('offload', r) or ('pending', None) if C_L unknown."""
        if conf >= alpha or j == self.num_layers:
            return "exit", conf - self.cost.mu * self.arm_cost(j, "device")
        if c_last is None:
            return "pending", None
        return "offload", c_last - self.cost.mu * self.arm_cost(j, "cloud")

    def estimate_last(self, conf: list[float], state: StateView) -> float:
        """Estimated C_L of a sample that exited (observed side info): see the module docstring."""
        stats = self.stats(state)
        n = stats.number("cl_n")
        if self.cl_estimate == "mean" and n > 0:
            return stats.number("cl_s") / n
        return conf[-1]

    def _learn(self, event: Event, state: StateView) -> Delta:
        if event.stage == "start":
            return {"t": 1.0, f"p{int(event.context['arm'])}": 1.0}
        ctx = event.context
        conf = [float(c) for c in ctx["conf"]]
        alphas = [float(a) for a in ctx.get("alphas", [self.alpha] * len(conf))]
        arm = len(conf)
        delta: Delta = {}

        def add(key: str, value: float) -> None:
            delta[key] = delta.get(key, 0.0) + value

        if event.stage == "feedback":
            c_last = event.feedback.confidence
            delta.update(self.alpha_observed(dict(enumerate(zip(conf, ctx["preds"]), start=1)), event.feedback.probs)
                         if "preds" in ctx else {})
            add("ocl_n", 1.0)
            add("ocl_s", c_last)
            if self.side_info == "observed":
                add("cl_n", 1.0)
                add("cl_s", c_last)
            for j, (c, a) in enumerate(zip(conf, alphas), start=1):
                if c < a and j < self.num_layers and self.side_info == "observed":
                    _, reward = self._side(j, c, c_last, a)
                    add(f"p{j}", -1.0)
                    for key, value in self.scored(j, reward, offload=True).items():
                        add(key, value)
            return delta
        delta.update(self.alpha_decided(dict(enumerate(conf, start=1))))
        add(f"p{arm}", -1.0)            # the pull itself is resolved; side arms below say how
        if self.side_info == "oracle":
            c_last: float | None = float(np.max(event.observation.hindsight[-1]))
        elif event.trace.tier == "device":
            c_last = self.estimate_last(conf, state)
        else:
            c_last = None  # offloaded: the real C_L comes in feedback
        for j, (c, a) in enumerate(zip(conf, alphas), start=1):
            kind, reward = self._side(j, c, c_last, a)
            if kind == "pending":
                add(f"p{j}", 1.0)
            else:
                for key, value in self.scored(j, reward).items():
                    add(key, value)
        return {k: v for k, v in delta.items() if isinstance(v, np.ndarray) or v != 0.0 or k[0] == "s"}


class SplitEEDrift(SplitEE):
    """SplitEE for drifting streams: the same policy with sliding-window statistics (time buckets)."""

    name = "splitee-drift"

    def __init__(self, *, discount: float = 0.9998, window: int = 0, bucket: int = 100, **kw) -> None:
        super().__init__(discount=discount, window=window, bucket=bucket, **kw)


class SplitEESDrift(SplitEES):
    """SplitEE-S for drifting streams: the same policy with sliding-window statistics (time buckets)."""

    name = "splitee-s-drift"

    def __init__(self, *, discount: float = 0.9998, window: int = 0, bucket: int = 100, **kw) -> None:
        super().__init__(discount=discount, window=window, bucket=bucket, **kw)
