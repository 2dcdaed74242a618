"""DEEx, Decision Early-Exit (Barbosa et al. §III): decide at the first exit whether to stay on the device.

The device runs layer 1 and evaluates its exit, the *decision exit*. If C_1 < p_d the sample is
offloaded to the cloud at once (with layer 1's hidden state), skipping every other device exit. Else it
continues through the device exits 2..max_layer, exiting at the first with C_k >= p_tar; a sample
still unsure at ``max_layer`` is inferred there (the paper's EE N-1, ``at_max=exit``) or offloaded
(``at_max=offload``, the extension its conclusion proposes). The decision exit never predicts itself.
The paper sets p_d and p_tar by hand; ``policy calibrate deex`` picks the cheapest pair that keeps the
validation accuracy within a tolerance of the final exit's.

When an offload pays (:func:`offload_pays`): from the decision exit, staying to device exit k costs
(k-1)·λ; an offload costs o + (L-1)·cloud_layer + fee. The λ presets price the cloud's layers at 0, so on
6 layers with o = 5λ as printed an offload (λ + 5λ = 6λ, the final exit's price) costs more than any
device path (≤ 5λ) and can only buy accuracy; where the device exits already meet the tolerance the
cheapest pair never offloads. On the default model's SST-2 dev matrix (exit 5: 88.3%, exit 6: 87.3%) the
calibration returns p_d = 0.50 = 1/C at 5λ, a vacuous decision exit, and p_d = 0.525 (2.9% offloaded)
at 2.5λ, where an offload (3.5λ) undercuts exits 4 and 5; with the paper's three exits (``max_layer=2``,
exit 2: 81.2%) it offloads 47% at either price. What the λ counts leave unstated is that an offloaded
sample still runs the backbone's remaining layers and crosses a link: in the paper's own setting (its
Fig. 4, no communication delay, the cloud as fast as the device) an offload never saves time, and p_d is
an accuracy lever set at the crossing point. The calibration reports ``offload_pays_from`` and the share
it offloads, and takes any cost model, e.g. measured milliseconds (``policies.reproduce_deex``).

>>> import numpy as np
>>> from stream.costs import splitee
>>> from policies.base import Observation, StateView
>>> p = Deex(cost=splitee(), num_layers=6, p_d=0.7, p_tar=0.9, max_layer=4)
>>> p.decide(Observation("a", 6, layer=1, probs={1: np.array([.6, .4])}), StateView())
Offload(tier='cloud', run_to=None, threshold=None, probe=False)
>>> p.decide(Observation("b", 6, layer=1, probs={1: np.array([.95, .05])}), StateView())
Continue(to_layer=2, exits='last')
>>> offload_pays(splitee(num_layers=6), 6, 5), offload_pays(splitee(), 6, 5)   # o = 2.5λ vs 5λ
(4, None)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stream.costs import Trace
from stream.errors import ConfigError

from policies.base import Action, Continue, Exit, Observation, Offload, Policy, StateView
from policies.calibration import calibration_digest, load_calibration


class Deex(Policy):
    """p_d at the first exit sends low-confidence samples straight to the cloud; p_tar at later exits."""

    name = "deex"

    def __init__(self, *, p_d: float | None = None, p_tar: float | None = None, max_layer: int | None = None,
                 at_max: str | None = None, calibration: str | None = None, **kw) -> None:
        super().__init__(**kw)
        cal = self.calibration = load_calibration(calibration, self.name, accept=("deex",))
        self.p_d = self.setting("p_d", cal.get("p_d", 0.8) if p_d is None else p_d, float, 0.0, 1.0)
        self.p_tar = self.setting("p_tar", cal.get("p_tar", 0.9) if p_tar is None else p_tar, float, 0.0, 1.0)
        default_max = cal.get("max_layer", max(1, self.num_layers - 1))
        self.max_layer = self.setting("max_layer", default_max if max_layer is None else max_layer,
                                      int, 1, self.num_layers)
        at_max = cal.get("at_max", "exit") if at_max is None else at_max
        if at_max not in ("exit", "offload"):
            raise ConfigError(f"policy {self.name!r}: at_max must be 'exit' or 'offload', got {at_max!r}")
        self.at_max = at_max

    def params(self) -> dict[str, Any]:
        return {"p_d": self.p_d, "p_tar": self.p_tar, "max_layer": self.max_layer, "at_max": self.at_max,
                "seed": self.seed, "calibration": calibration_digest(self.calibration)}

    def route(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised decisions on ``[N, L, C]``: layers run on the device (1-based) and offloaded?."""
        conf = probs.max(-1)
        m = self.max_layer
        early = conf[:, 0] < self.p_d
        hit = conf[:, 1:m] >= self.p_tar                                    # exits 2..m
        first = np.where(hit.any(1), hit.argmax(1) + 2, m)
        offload = early | (~hit.any(1) & (self.at_max == "offload") & (m < conf.shape[1]))
        return np.where(early, 1, first), offload

    def outcomes(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised decisions on ``[N, L, C]``: exit layer (1-based), offloaded?, cost per sample."""
        layers = probs.shape[1]
        stop, offload = self.route(probs)
        exit_layer = np.where(offload, layers, stop)
        return exit_layer, offload, path_costs(self.cost, stop, offload, layers)

    @classmethod
    def calibrate(cls, matrix, *, cost, tolerance: float = 0.01, max_layer: int | None = None,
                  at_max: str = "exit") -> dict[str, Any]:
        """p_d and p_tar from a labelled validation matrix: the cheapest pair (grid 0.50..0.99) whose
        accuracy is within ``tolerance`` of the final exit's (DEEx §IV studies this trade-off by hand)."""
        if matrix.labels is None:
            raise ConfigError("deex calibration needs a labelled matrix (labels array)")
        probs = matrix.probs.astype(np.float64)
        correct = probs.argmax(-1) == matrix.labels[:, None]
        final = float(correct[:, -1].mean())
        grid = np.round(np.arange(1.0 / matrix.num_classes, 1.0, 0.025), 4)
        rows = []
        for p_d in np.append(grid, 1.0):                                     # 1.0: offload every sample
            for p_tar in grid:
                probe = cls(cost=cost, num_layers=matrix.num_layers, num_classes=matrix.num_classes, p_d=p_d,
                            p_tar=p_tar, max_layer=max_layer, at_max=at_max)
                layer, off, price = probe.outcomes(probs)
                acc = float(correct[np.arange(len(layer)), layer - 1].mean())
                rows.append({"p_d": float(p_d), "p_tar": float(p_tar), "accuracy": acc, "cost": float(price.mean()),
                             "max_layer": probe.max_layer, "offloaded": float(off.mean())})
        ok = [r for r in rows if r["accuracy"] >= final - tolerance - 1e-12]
        best = min(ok, key=lambda r: (r["cost"], -r["accuracy"])) if ok else max(rows, key=lambda r: r["accuracy"])
        pays = offload_pays(cost, matrix.num_layers, best["max_layer"])
        return {"policy": "deex", "p_d": best["p_d"], "p_tar": best["p_tar"], "max_layer": best["max_layer"],
                "at_max": at_max, "tolerance": tolerance, "offload_pays_from": pays,
                "validation": {"samples": matrix.num_samples, "final_exit_accuracy": final,
                               "accuracy": best["accuracy"], "cost": best["cost"], "offloaded": best["offloaded"]},
                "note": None if pays else ("an offload after the decision exit never costs less than staying on the "
                                           "device, so p_d only buys accuracy (see policies/deex.py)")}

    def decide(self, obs: Observation, state: StateView) -> Action:
        if obs.layer == 0:
            return Continue(1, exits="last")
        conf = obs.confidence()
        if obs.layer == 1:
            if conf < self.p_d:
                return Offload("cloud")
        elif conf >= self.p_tar:
            return Exit()
        if obs.layer >= self.max_layer:
            if self.at_max == "exit" or obs.layer == self.num_layers:
                return Exit()
            return Offload("cloud")
        return Continue(obs.layer + 1, exits="last")


def offload_pays(cost, num_layers: int, max_layer: int) -> int | None:
    """The first device exit k in 2..``max_layer`` that costs more to reach from the decision exit than an
    offload after layer 1 costs ((k-1)·λ > o + (L-1)·cloud_layer + fee); ``None``: offloading never saves."""
    offload = cost.offload_cloud + (num_layers - 1) * cost.cloud_layer + cost.cloud_fee
    return next((k for k in range(2, max_layer + 1) if (k - 1) * cost.lam > offload + 1e-12), None)


def path_costs(cost, stop: np.ndarray, offload: np.ndarray, num_layers: int) -> np.ndarray:
    """Cost per sample of running ``stop`` layers (one exit each) on the device, then the rest in the cloud
    where offloaded: :meth:`CostModel.breakdown` once per distinct path."""
    paths = {(k, o): cost.breakdown(Trace(k, k, tier="cloud" if o else "device",
                                          cloud_layers=num_layers - k if o else 0)).total
             for k, o in set(zip(stop.tolist(), offload.tolist()))}
    return np.array([paths[k, o] for k, o in zip(stop.tolist(), offload.tolist())], dtype=np.float64)
