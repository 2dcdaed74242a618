"""The hindsight oracle: the bound every deployable policy is compared with (offline evaluation only).

It reads every exit's probabilities (``obs.hindsight``) and the label, and takes the cheapest action
that predicts correctly: exit on the device at the first layer i whose exit is right (running layers
1..i, evaluating only exit i), or, if cheaper or if no device exit is right but the final one is, send
the raw input to the cloud. A sample no exit gets right takes the cheapest action of all. So its
accuracy is the fraction of samples that *some* exit classifies correctly and its cost is the least any
policy with these actions can pay for that accuracy.

>>> import numpy as np
>>> from stream.costs import splitee
>>> from policies.base import Observation, StateView
>>> o = Oracle(cost=splitee(offload=5.0), num_layers=3)
>>> h = np.array([[.6, .4], [.3, .7], [.2, .8]], dtype=np.float32)
>>> o.decide(Observation("a", 3, hindsight=h, label=1), StateView())      # exit 2 is the first right one
Continue(to_layer=2, exits='last')
>>> o.decide(Observation("b", 3, hindsight=h, label=0), StateView())      # only exit 1 is right
Continue(to_layer=1, exits='last')
"""

from __future__ import annotations

import numpy as np

from stream.costs import Trace
from stream.errors import ConfigError

from policies.base import Action, Continue, Exit, Observation, Offload, Policy, StateView


class Oracle(Policy):
    """Cheapest correct action per sample, from labels and hindsight (never deployable)."""

    name = "oracle"
    offline_only = True

    def decide(self, obs: Observation, state: StateView) -> Action:
        if obs.hindsight is None or obs.label is None:
            raise ConfigError(f"policy 'oracle', sample {obs.sample_id!r}: needs hindsight and a label "
                              f"(offline evaluation with a labelled matrix)")
        if obs.layer:
            return Exit()
        return self.plan(obs.hindsight, obs.label)

    def plan(self, hindsight: np.ndarray, label: int) -> Continue | Offload:
        correct = hindsight.argmax(-1) == label
        options: list[tuple[float, int, Continue | Offload]] = []
        for layer in range(1, self.num_layers + 1):
            cost = self.cost.breakdown(Trace(device_layers=layer, device_exits=1)).total
            options.append((cost, int(correct[layer - 1]), Continue(layer, exits="last")))
        cloud = self.cost.breakdown(Trace(tier="cloud", cloud_layers=self.num_layers)).total
        options.append((cloud, int(correct[-1]), Offload("cloud")))
        right = [o for o in options if o[1]] or options
        return min(right, key=lambda o: o[0])[2]


def best_fixed_split(matrix, cost, tolerance: float = 0.01, step: float = 0.01) -> dict:
    """The hindsight bound of a split policy: the cheapest fixed (split, α) within ``tolerance`` of the
    final exit's accuracy on ``matrix``'s labels (exit at the split if C ≥ α, else the cloud finishes).

    A per-sample oracle (:class:`Oracle`) bounds any policy; this bounds what a converged SplitEE with
    one threshold can reach on the same samples, so a gap to it is the policy's, not the model's.
    """
    from policies.splitee import SplitEE

    if matrix.labels is None:
        raise ConfigError("best fixed split: the matrix has no labels")
    probe = SplitEE(cost=cost, num_layers=matrix.num_layers, num_classes=matrix.num_classes, alpha_rule="fixed")
    conf = matrix.probs.max(-1)
    correct = matrix.probs.argmax(-1) == matrix.labels[:, None]
    final = float(correct[:, -1].mean())
    best = None
    for arm in range(1, matrix.num_layers + 1):
        stay, away = probe.arm_cost(arm, "device"), probe.arm_cost(arm, "cloud")
        for alpha in np.arange(1.0 / matrix.num_classes, 1.0 + 1e-4, step):
            exits = (conf[:, arm - 1] >= alpha) | (arm == matrix.num_layers)
            acc = float(np.where(exits, correct[:, arm - 1], correct[:, -1]).mean())
            spent = float(np.where(exits, stay, away).mean())
            if acc >= final - tolerance - 1e-12 and (best is None or spent < best["cost"]):
                best = {"arm": arm, "alpha": round(float(alpha), 3), "cost": spent, "accuracy": acc}
    best["cost_ratio"] = best["cost"] / cost.final_exit_cost(matrix.num_layers)
    best["delta_acc"] = 100 * (best["accuracy"] - final)
    return best
