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

from stream.errors import ConfigError

from policies.base import Action, Continue, Exit, Observation, Offload, Policy, StateView
from policies.calibration import calibration_digest, load_calibration
from policies.splitee import SplitArms, choose_alpha


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
    """Exit at the first device layer whose exit is confident enough; offload past ``max_layer``."""

    def __init__(self, *, threshold: float = 0.9, max_layer: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.threshold = self.setting("threshold", threshold, float, 0.0)
        self.max_layer = self.setting("max_layer", self.num_layers if max_layer is None else max_layer,
                                      int, 1, self.num_layers)

    def confident(self, probs: np.ndarray) -> bool:
        raise NotImplementedError

    def decide(self, obs: Observation, state: StateView) -> Action:
        if obs.layer and self.confident(obs.probs[obs.layer]):
            return Exit()
        if obs.layer < self.max_layer:
            return Continue(obs.layer + 1, exits="last")
        return Exit() if self.max_layer == self.num_layers else Offload("cloud")

    def params(self) -> dict:
        return {"threshold": self.threshold, "max_layer": self.max_layer, "seed": self.seed}


class StaticMaxProb(_StaticThreshold):
    """ElasticBERT / MSDNet: exit when the top class probability reaches ``threshold``."""

    name = "static-maxprob"

    def confident(self, probs: np.ndarray) -> bool:
        return float(np.max(probs)) >= self.threshold


class StaticEntropy(_StaticThreshold):
    """DeeBERT / BranchyNet: exit when the entropy of the exit's distribution (nats) is at most ``threshold``."""

    name = "static-entropy"

    def __init__(self, *, threshold: float = 0.3, max_layer: int | None = None, **kw) -> None:
        super().__init__(threshold=threshold, max_layer=max_layer, **kw)

    def confident(self, probs: np.ndarray) -> bool:
        p = np.clip(probs, 1e-12, 1.0)
        return float(-(p * np.log(p)).sum()) <= self.threshold


class RandomExit(SplitArms, Policy):
    """SplitEE §5.3 baseline: a uniformly random split per sample; exit there if C >= α, else offload.

    The split is drawn from :meth:`Policy.sample_rng`, so a sample gets the same split in every worker
    and on redelivery. ``alpha`` as SplitEE's (``calibration=FILE`` from ``policy calibrate splitee``).
    """

    name = "random-exit"

    def __init__(self, *, alpha: float | None = None, calibration: str | None = None, **kw) -> None:
        super().__init__(**kw)
        self.calibration = load_calibration(calibration, self.name, accept=("splitee",))
        self.alpha = self.setting("alpha", self.calibration.get("alpha", 0.9) if alpha is None else alpha,
                                  float, 0.0, 1.0)

    calibrate = staticmethod(choose_alpha)

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "seed": self.seed, "calibration": calibration_digest(self.calibration)}

    def decide(self, obs: Observation, state: StateView) -> Action:
        if obs.layer == 0:
            return Continue(int(self.sample_rng(obs.sample_id).integers(1, self.num_layers + 1)), exits="last")
        if obs.layer == self.num_layers or obs.confidence() >= self.alpha:
            return Exit()
        return Offload("cloud")

    def context(self, obs: Observation, action: Action) -> dict[str, Any]:
        return {"arm": action.to_layer if isinstance(action, Continue) else obs.layer}


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
