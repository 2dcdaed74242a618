"""DEEx, Decision Early-Exit (Barbosa et al. §III): decide at the first exit whether to stay on the device.

The device runs layer 1 and evaluates its exit, the *decision exit*. If C_1 < p_d the sample is
offloaded to the cloud at once (with layer 1's hidden state), skipping every other device exit. Else it
continues through the device exits 2..max_layer, exiting at the first with C_k >= p_tar; a sample
still unsure at ``max_layer`` is inferred there (the paper's EE N-1, ``at_max=exit``) or offloaded
(``at_max=offload``, the extension its conclusion proposes). The decision exit never predicts itself.

>>> import numpy as np
>>> from stream.costs import splitee
>>> from policies.base import Observation, StateView
>>> p = Deex(cost=splitee(), num_layers=6, p_d=0.7, p_tar=0.9, max_layer=4)
>>> p.decide(Observation("a", 6, layer=1, probs={1: np.array([.6, .4])}), StateView())
Offload(tier='cloud', run_to=None, threshold=None)
>>> p.decide(Observation("b", 6, layer=1, probs={1: np.array([.95, .05])}), StateView())
Continue(to_layer=2, exits='last')
"""

from __future__ import annotations

from typing import Any

from stream.errors import ConfigError

from policies.base import Action, Continue, Exit, Observation, Offload, Policy, StateView


class Deex(Policy):
    """p_d at the first exit sends low-confidence samples straight to the cloud; p_tar at later exits."""

    name = "deex"

    def __init__(self, *, p_d: float = 0.8, p_tar: float = 0.9, max_layer: int | None = None,
                 at_max: str = "exit", **kw) -> None:
        super().__init__(**kw)
        self.p_d = self.setting("p_d", p_d, float, 0.0, 1.0)
        self.p_tar = self.setting("p_tar", p_tar, float, 0.0, 1.0)
        default_max = max(1, self.num_layers - 1)
        self.max_layer = self.setting("max_layer", default_max if max_layer is None else max_layer,
                                      int, 1, self.num_layers)
        if at_max not in ("exit", "offload"):
            raise ConfigError(f"policy {self.name!r}: at_max must be 'exit' or 'offload', got {at_max!r}")
        self.at_max = at_max

    def params(self) -> dict[str, Any]:
        return {"p_d": self.p_d, "p_tar": self.p_tar, "max_layer": self.max_layer, "at_max": self.at_max,
                "seed": self.seed}

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
