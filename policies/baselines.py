"""Baselines that learn nothing: final exit, cloud only, static confidence thresholds.

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
"""

from __future__ import annotations

import numpy as np

from stream.errors import ConfigError

from policies.base import Action, Continue, Exit, Observation, Offload, Policy, StateView


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
        self.threshold = float(threshold)
        self.max_layer = self.num_layers if max_layer is None else int(max_layer)
        if not 1 <= self.max_layer <= self.num_layers:
            raise ConfigError(f"policy {self.name!r}: max_layer must be in 1..{self.num_layers}, got {max_layer}")

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
