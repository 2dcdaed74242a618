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

>>> from stream.costs import splitee
>>> from policies.base import StateView
>>> p = SplitEE(cost=splitee(offload=5.0), num_layers=3, alpha=0.8, beta=1.0)
>>> p.pull(StateView())                                   # nothing played yet: arm 1 first
1
>>> state = StateView({"t": 3.0, "n1": 1.0, "s1": 0.3, "n2": 1.0, "s2": 0.7, "n3": 1.0, "s3": 0.6})
>>> [round(x, 4) for x in p.index(state)]                 # Q(i) + sqrt(ln 3 / 1)
[1.3481, 1.7481, 1.6481]
>>> p.pull(state)
2
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar, Literal

import numpy as np

from stream.costs import CostModel, Trace
from stream.errors import ConfigError

from policies.base import Action, Continue, Delta, Event, Exit, ExitMode, Observation, Offload, Policy, StateView
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


class SplitArms:
    """The arms of a split policy: arm i runs layers 1..i, exits there if C_i >= α, else offloads."""

    num_layers: int
    alpha: float
    cost: CostModel
    exits: ClassVar[ExitMode] = "last"

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
        exit_ = (conf >= self.alpha) | (layers == self.num_layers)[None, :]
        return np.where(exit_, conf - self.cost.mu * stay, conf[:, -1:] - self.cost.mu * away)


class SplitEE(SplitArms, Policy):
    """UCB over the split layer; only the split layer's exit is evaluated (``exits="last"``)."""

    name = "splitee"
    exits: ClassVar[ExitMode] = "last"

    def __init__(self, *, alpha: float | None = None, beta: float = 1.0, calibration: str | None = None,
                 **kw) -> None:
        super().__init__(**kw)
        self.calibration = load_calibration(calibration, self.name, accept=("splitee",))
        if alpha is None:
            alpha = self.calibration.get("alpha", 0.9)
        self.alpha = self.setting("alpha", alpha, float, 0.0, 1.0)
        self.beta = self.setting("beta", beta, float, 0.0)

    calibrate = staticmethod(choose_alpha)

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "seed": self.seed,
                "calibration": calibration_digest(self.calibration)}

    @functools.cached_property
    def _best_reward(self) -> list[float]:
        """1 - μγ_i: the most an arm can earn (confidence 1, cheapest outcome); scores all-pending arms."""
        return [1.0 - self.cost.mu * self.arm_cost(i, "device") for i in range(1, self.num_layers + 1)]

    def index(self, state: StateView) -> list[float]:
        """The UCB index of every arm (``inf`` for an arm never pulled)."""
        t = state.number("t")
        log_t = math.log(t) if t > 1 else 0.0
        out = []
        for i in range(1, self.num_layers + 1):
            n, pending = state.number(f"n{i}"), state.number(f"p{i}")
            if n + pending <= 0:
                out.append(math.inf)
                continue
            mean = state.number(f"s{i}") / n if n > 0 else self._best_reward[i - 1]
            out.append(mean + self.beta * math.sqrt(log_t / (n + pending)))
        return out

    def pull(self, state: StateView) -> int:
        """The arm (split layer, 1-based) for the next sample; ties go to the shallower layer."""
        return int(np.argmax(self.index(state))) + 1

    # -- Policy interface --------------------------------------------------------------------------
    def decide(self, obs: Observation, state: StateView) -> Action:
        if obs.layer == 0:
            return Continue(self.pull(state), exits=self.exits)
        if obs.layer == self.num_layers or obs.confidence() >= self.alpha:
            return Exit()
        return Offload("cloud")

    def context(self, obs: Observation, action: Action) -> dict[str, Any]:
        return {"arm": action.to_layer if isinstance(action, Continue) else obs.layer}

    def learn(self, event: Event, state: StateView) -> Delta:
        arm = int(event.context["arm"])
        if event.stage == "start":       # the pull is in flight: pending until its reward is known
            return {"t": 1.0, f"p{arm}": 1.0}
        if event.stage == "feedback":
            reward = self.reward_exit(event.feedback.confidence, event.trace)
            return {f"p{arm}": -1.0, f"n{arm}": 1.0, f"s{arm}": reward}
        if event.trace.tier == "device":
            reward = self.reward_exit(event.observation.confidence(arm), event.trace)
            return {f"p{arm}": -1.0, f"n{arm}": 1.0, f"s{arm}": reward}
        return {}                        # offloaded: stays pending until feedback brings C_L

    def describe(self, state) -> dict[str, Any]:
        view = state if isinstance(state, StateView) else StateView(state)
        arms = {}
        for i in range(1, self.num_layers + 1):
            n = view.number(f"n{i}")
            arms[str(i)] = {"n": n, "pending": view.number(f"p{i}"),
                            "q": round(view.number(f"s{i}") / n, 6) if n else None}
        played = {i: view.number(f"n{i}") + view.number(f"p{i}") for i in range(1, self.num_layers + 1)}
        return {"t": view.number("t"), "alpha": self.alpha, "beta": self.beta, "arms": arms,
                "most_played_arm": max(played, key=played.get) if any(played.values()) else None}


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

    def context(self, obs: Observation, action: Action) -> dict[str, Any]:
        if isinstance(action, Continue):
            return {"arm": action.to_layer}
        return {"arm": obs.layer, "conf": [obs.confidence(j) for j in range(1, obs.layer + 1)]}

    def _side(self, j: int, conf: float, c_last: float | None) -> tuple[str, float | None]:
        """Arm j's outcome on this sample: ('exit', r), ('offload', r) or ('pending', None) if C_L unknown."""
        if conf >= self.alpha or j == self.num_layers:
            return "exit", conf - self.cost.mu * self.arm_cost(j, "device")
        if c_last is None:
            return "pending", None
        return "offload", c_last - self.cost.mu * self.arm_cost(j, "cloud")

    def estimate_last(self, conf: list[float], state: StateView) -> float:
        """Estimated C_L of a sample that exited (observed side info): see the module docstring."""
        n = state.number("cl_n")
        if self.cl_estimate == "mean" and n > 0:
            return state.number("cl_s") / n
        return conf[-1]

    def learn(self, event: Event, state: StateView) -> Delta:
        if event.stage == "start":
            return {"t": 1.0, f"p{int(event.context['arm'])}": 1.0}
        conf = [float(c) for c in event.context["conf"]]
        arm = len(conf)
        delta: Delta = {}

        def add(key: str, value: float) -> None:
            delta[key] = delta.get(key, 0.0) + value

        if event.stage == "feedback":
            c_last = event.feedback.confidence
            if self.side_info == "observed":
                add("cl_n", 1.0)
                add("cl_s", c_last)
            for j, c in enumerate(conf, start=1):
                if c < self.alpha and j < self.num_layers and self.side_info == "observed":
                    _, reward = self._side(j, c, c_last)
                    add(f"p{j}", -1.0), add(f"n{j}", 1.0), add(f"s{j}", reward)
            return delta
        add(f"p{arm}", -1.0)            # the pull itself is resolved; side arms below say how
        if self.side_info == "oracle":
            c_last: float | None = float(np.max(event.observation.hindsight[-1]))
        elif event.trace.tier == "device":
            c_last = self.estimate_last(conf, state)
        else:
            c_last = None  # offloaded: the real C_L comes in feedback
        for j, c in enumerate(conf, start=1):
            kind, reward = self._side(j, c, c_last)
            if kind == "pending":
                add(f"p{j}", 1.0)
            else:
                add(f"n{j}", 1.0), add(f"s{j}", reward)
        return {k: v for k, v in delta.items() if v != 0.0 or k[0] == "s"}
