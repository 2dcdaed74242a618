"""Baselines that learn nothing: final exit, cloud only, random split, static thresholds, patience.

``static-maxprob`` (ElasticBERT / MSDNet) and ``static-entropy`` (DeeBERT / BranchyNet) evaluate the exit
after every device layer and stop at the first confident one; with ``max_layer`` below the last layer,
a sample still unsure there is offloaded to the cloud (the SplitEE decision rule with a fixed split).

>>> from stream.costs import splitee
>>> import numpy as np
>>> from policies.base import Observation, StateView
>>> p = StaticMaxProb(cost=splitee(), num_layers=6, threshold=0.9, max_layer=3)
>>> obs = Observation("s1", num_layers=6, layer=2, probs={1: np.array([.6, .4]), 2: np.array([.95, .05])})
>>> p.decide(obs, StateView())
Exit()
>>> q = Patience(cost=splitee(), num_layers=6, patience=2)
>>> same = Observation("s2", num_layers=6, layer=3, probs={l: np.array([.7, .3]) for l in (1, 2, 3)})
>>> q.decide(same, StateView())        # layers 2 and 3 agree with their predecessor: exit
Exit()
"""

from __future__ import annotations

import numpy as np

from typing import Any

from stream.costs import Trace

from stream.errors import ConfigError

from policies.base import Action, Continue, Delta, Event, Exit, Observation, Offload, Policy, StateView
from policies.calibration import calibration_digest, load_calibration
from policies.splitee import SplitArms


class FinalExit(Policy):
    """Every sample runs all layers on the device (the reference: SplitEE's Final-exit pays λ·L)."""

    name = "final-exit"

    def decide(self, obs: Observation, state: StateView) -> Action:
        if obs.layer < self.num_layers:
            return Continue(self.num_layers, exits="each")
        return Exit()


class CloudOnly(Policy):
    """Nothing runs on the device: every raw input goes to the cloud, which runs the full model."""

    name = "cloud-only"

    def decide(self, obs: Observation, state: StateView) -> Action:
        return Offload("cloud")


class _StaticThreshold(Policy):
    """Exit at the first device layer whose exit is confident enough; offload past ``max_layer``.

    ``threshold`` defaults to the class's ``default``, or to a calibration's (``policy calibrate``:
    the cheapest threshold whose validation accuracy is within ``tolerance`` of the final exit's, the
    way DeeBERT and ElasticBERT take theirs from the validation split).
    """

    default = 0.9

    def __init__(self, *, threshold: float | None = None, max_layer: int | None = None,
                 calibration: str | None = None, **kw) -> None:
        super().__init__(**kw)
        self.calibration = load_calibration(calibration, self.name, accept=(self.name,))
        if threshold is None:
            threshold = self.calibration.get("threshold", self.default)
        self.threshold = self.setting("threshold", threshold, float, 0.0)
        if max_layer is None:
            max_layer = self.calibration.get("max_layer", self.num_layers)
        self.max_layer = self.setting("max_layer", max_layer, int, 1, self.num_layers)

    def score(self, probs: np.ndarray) -> np.ndarray:
        """Confidence score of exit probabilities ``[..., C]`` (higher: more confident)."""
        raise NotImplementedError

    @staticmethod
    def from_score(cut: float) -> float:
        """The ``threshold`` setting that means "score >= cut"."""
        return cut

    def confident(self, probs: np.ndarray) -> bool:
        return bool(self.score(probs) >= self.threshold)

    def decide(self, obs: Observation, state: StateView) -> Action:
        if obs.layer and self.confident(obs.probs[obs.layer]):
            return Exit()
        if obs.layer < self.max_layer:
            return Continue(obs.layer + 1, exits="last")
        return Exit() if self.max_layer == self.num_layers else Offload("cloud")

    def params(self) -> dict:
        return {"threshold": self.threshold, "max_layer": self.max_layer, "seed": self.seed,
                "calibration": calibration_digest(self.calibration)}

    @classmethod
    def calibrate(cls, matrix, *, cost, tolerance: float = 0.01, max_layer: int | None = None) -> dict[str, Any]:
        """The cheapest threshold whose accuracy on a labelled validation matrix is within ``tolerance``."""
        if matrix.labels is None:
            raise ConfigError(f"{cls.name} calibration needs a labelled matrix (labels array)")
        probe = cls(cost=cost, num_layers=matrix.num_layers, num_classes=matrix.num_classes, threshold=0.0,
                    max_layer=max_layer)
        probs = matrix.probs.astype(np.float64)
        n, layers = probs.shape[:2]
        m = probe.max_layer
        scores = probe.score(probs)[:, :m]                                   # [N, m]
        correct = probs.argmax(-1) == matrix.labels[:, None]
        final = float(correct[:, -1].mean())
        rows = []
        for t in np.unique(np.quantile(scores, np.linspace(0, 1, 201))):
            hit = scores >= t
            layer = np.where(hit.any(1), hit.argmax(1) + 1, m)
            exited = hit.any(1) | (m == layers)
            acc = np.where(exited, correct[np.arange(n), layer - 1], correct[:, -1]).mean()
            price = [cost.breakdown(Trace(int(k), int(k), tier="device" if e else "cloud",
                                          cloud_layers=0 if e else layers - int(k))).total
                     for k, e in zip(layer, exited)]
            rows.append({"threshold": float(t), "accuracy": float(acc), "cost": float(np.mean(price))})
        ok = [r for r in rows if r["accuracy"] >= final - tolerance - 1e-12]
        best = min(ok, key=lambda r: (r["cost"], -r["threshold"])) if ok else max(rows, key=lambda r: r["accuracy"])
        return {"policy": cls.name, "threshold": cls.from_score(best["threshold"]), "max_layer": m, "tolerance": tolerance,
                "validation": {"samples": n, "final_exit_accuracy": final, "accuracy": best["accuracy"],
                               "cost": best["cost"]}}


class StaticMaxProb(_StaticThreshold):
    """ElasticBERT / MSDNet: exit when the top class probability reaches ``threshold``."""

    name = "static-maxprob"

    def score(self, probs: np.ndarray) -> np.ndarray:
        return np.max(probs, axis=-1)


class StaticEntropy(_StaticThreshold):
    """DeeBERT / BranchyNet: exit when the entropy of the exit's distribution (nats) is at most ``threshold``.

    Its score is the negative entropy, so ``threshold`` here is the entropy bound itself.
    """

    name = "static-entropy"
    default = 0.3

    def score(self, probs: np.ndarray) -> np.ndarray:
        p = np.clip(probs, 1e-12, 1.0)
        return (p * np.log(p)).sum(-1)

    @staticmethod
    def from_score(cut: float) -> float:
        return -cut

    def confident(self, probs: np.ndarray) -> bool:
        return bool(-self.score(probs) <= self.threshold)


class RandomExit(SplitArms, Policy):
    """SplitEE §5.3 baseline: a uniformly random split per sample; exit there if C >= α, else offload.

    The split is drawn from :meth:`Policy.sample_rng`, so a sample gets the same split in every worker
    and on redelivery. ``alpha`` as SplitEE's (``calibration=FILE`` from ``policy calibrate splitee``).
    """

    name = "random-exit"

    def decide(self, obs: Observation, state: StateView) -> Action:
        if obs.layer == 0:
            return Continue(int(self.sample_rng(obs.sample_id).integers(1, self.num_layers + 1)), exits="last")
        return self.split_action(obs, state)

    def learn(self, event: Event, state: StateView) -> Delta:
        """Random-exit picks its split blindly; with ``alpha_rule=online`` it learns only the α estimate."""
        ctx = event.context
        if event.stage == "decision":
            return self.alpha_decided({int(ctx["arm"]): float(ctx["c"])})
        if event.stage == "feedback" and "c" in ctx:
            return self.alpha_observed({int(ctx["arm"]): (float(ctx["c"]), int(ctx["y"]))}, event.feedback.probs)
        return {}


class Patience(Policy):
    """PABEE (Zhou et al.): exit once the prediction has not changed for ``patience`` consecutive exits.

    Every exit up to ``max_layer`` is evaluated; a sample still changing its mind there is offloaded to
    the cloud (or exits, when ``max_layer`` is the last layer).
    """

    name = "patience"

    def __init__(self, *, patience: int = 2, max_layer: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.patience = self.setting("patience", patience, int, 1)
        self.max_layer = self.setting("max_layer", self.num_layers if max_layer is None else max_layer,
                                      int, 1, self.num_layers)

    def params(self) -> dict[str, Any]:
        return {"patience": self.patience, "max_layer": self.max_layer, "seed": self.seed}

    def decide(self, obs: Observation, state: StateView) -> Action:
        if obs.layer:
            streak = 0
            for layer in range(obs.layer, 1, -1):
                if int(np.argmax(obs.probs[layer])) != int(np.argmax(obs.probs[layer - 1])):
                    break
                streak += 1
            if streak >= self.patience:
                return Exit()
        if obs.layer < self.max_layer:
            return Continue(obs.layer + 1, exits="last")
        return Exit() if self.max_layer == self.num_layers else Offload("cloud")
