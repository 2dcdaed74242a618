"""EENet (Ilhan et al.): learned exit-utility scores and budget-derived thresholds, one small MLP per exit.

Per exit k the features are the exit's probabilities ŷ_k, the confidence scores a_k (max-prob Eq. 5,
normalised negative entropy Eq. 6, vote Eq. 7) and the utility scores of the earlier exits b_k (Eq. 8).
A shared leaky-ReLU layer feeds the utility head g_k (sigmoid, Eq. 9) and the assignment head h_k
(softmax over exits, Eq. 10). :func:`calibrate` trains them on a labelled validation matrix with
L = L_g + α L_budget + β L_CE (Eq. 11–15: survival-weighted BCE on correctness q_k, budget deviation of
the expected cost under the assignment, CE against the assignment targets r_k) and sets the thresholds
by Algorithm 1: for exit k, the top-scored not yet assigned samples exit until its quota round(N p_k)
is full, and t_k is the score of the last one (t_L = -inf).

Online, every exit is evaluated in turn and the sample exits at the first k with g_k >= t_k.

Simplifications (documented choices): the exits are every layer on the device (costs c_k = the cost
model's price of k layers and k exits; ``budget`` is a fraction of c_L); the layers have biases;
training is full-batch Adam (lr 1e-3, weight decay 0.01 as the paper's L2) with early stopping when the
loss has not improved for 50 epochs; α = 1e-2, β = 1e-4 and D_h = 2D are the paper's text settings.
The trained weights and thresholds are stored as JSON (``exitflow policy calibrate eenet``).

>>> import numpy as np
>>> features(np.array([[.9, .1], [.2, .8]]), k=2, previous=np.array([.7])).round(4).tolist()
[0.2, 0.8, 0.8, 0.2781, 0.5, 0.7]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stream.costs import CostModel, Trace
from stream.errors import ConfigError

from policies.base import Action, Continue, Exit, Observation, Policy, StateView
from policies.calibration import calibration_digest, load_calibration

NEG_SLOPE = 0.01


def confidence_scores(probs: np.ndarray) -> np.ndarray:
    """a_k for every exit up to k: ``probs`` [..., k, C] → [..., 3] for the last exit (max, entropy, vote)."""
    last = probs[..., -1, :]
    classes = probs.shape[-1]
    p = np.clip(last, 1e-12, 1.0)
    entropy = 1.0 + (p * np.log(p)).sum(-1) / np.log(classes)
    preds = probs.argmax(-1)                                        # [..., k]
    votes = (preds[..., None] == np.arange(classes)).sum(-2).max(-1) / probs.shape[-2]
    return np.stack([last.max(-1), entropy, votes], axis=-1)


def features(probs: np.ndarray, k: int, previous: np.ndarray) -> np.ndarray:
    """Input of exit k's networks: [ŷ_k, a_k, b_k] from the probabilities of exits 1..k and q̂_1..q̂_{k-1}."""
    return np.concatenate([probs[..., k - 1, :], confidence_scores(probs[..., :k, :]), previous], axis=-1)


def exit_costs(cost: CostModel, num_layers: int) -> np.ndarray:
    return np.array([cost.breakdown(Trace(device_layers=k, device_exits=k)).total for k in range(1, num_layers + 1)])


def calibrate(matrix, *, cost: CostModel, budget: float = 0.5, epochs: int = 2000, lr: float = 1e-3,
              loss_alpha: float = 1e-2, loss_beta: float = 1e-4, seed: int = 0) -> dict[str, Any]:
    """Train g_k/h_k on a labelled validation matrix and derive thresholds (EENet Alg. 1); JSON-able dict."""
    import torch

    if matrix.labels is None:
        raise ConfigError("eenet calibration needs a labelled matrix (labels array)")
    if not 0 < budget <= 1:
        raise ConfigError(f"eenet calibration: budget (fraction of the final exit's cost) must be in (0, 1], got {budget!r}")
    probs = matrix.probs.astype(np.float64)
    n, num_layers, classes = probs.shape
    costs = exit_costs(cost, num_layers)
    target_budget = budget * costs[-1]
    correct = probs.argmax(-1) == matrix.labels[:, None]                     # q [N, K]
    q = correct.astype(np.float64)
    hits = q.sum(1, keepdims=True)
    r = np.where(hits > 0, q / np.maximum(hits, 1), 1.0 / num_layers)         # Eq. 4

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        static = [torch.tensor(np.concatenate([probs[:, k, :], confidence_scores(probs[:, :k + 1, :])], 1),
                               dtype=torch.float32) for k in range(num_layers)]
        dims = [classes + 3 + k for k in range(num_layers)]
        shared = [torch.nn.Linear(d, 2 * d) for d in dims]
        g_head = [torch.nn.Linear(2 * d, 1) for d in dims]
        h_head = [torch.nn.Linear(2 * d, 1) for d in dims]
        params = [p for mods in (shared, g_head, h_head) for m in mods for p in m.parameters()]
        opt = torch.optim.Adam(params, lr=lr, weight_decay=0.01)
        q_t, r_t = torch.tensor(q, dtype=torch.float32), torch.tensor(r, dtype=torch.float32)
        c_t = torch.tensor(costs, dtype=torch.float32)

        def forward():
            scores, logits = [], []
            for k in range(num_layers):
                x = torch.cat([static[k]] + [s.unsqueeze(1) for s in scores], 1)
                s = torch.nn.functional.leaky_relu(shared[k](x), NEG_SLOPE)
                scores.append(torch.sigmoid(g_head[k](s)).squeeze(1))
                logits.append(h_head[k](s).squeeze(1))
            return torch.stack(scores, 1), torch.softmax(torch.stack(logits, 1), 1)

        best, best_state, stale = float("inf"), None, 0
        for _ in range(int(epochs)):
            q_hat, r_hat = forward()
            with torch.no_grad():                                             # Eq. 13, outside the graph
                survive = 1.0 - torch.cumsum(r_hat, 1) + r_hat
                w = survive / survive.sum(0, keepdim=True)
            bce = torch.nn.functional.binary_cross_entropy(q_hat.clamp(1e-6, 1 - 1e-6), q_t, reduction="none")
            loss_g = (w * bce).sum() / num_layers                                              # Eq. 11
            loss_budget = torch.abs(target_budget - (r_hat * c_t).sum(1).mean()) / target_budget  # Eq. 14
            loss_ce = -(r_t * torch.log(r_hat.clamp_min(1e-12))).sum() / (n * num_layers)      # Eq. 15
            loss = loss_g + loss_alpha * loss_budget + loss_beta * loss_ce
            opt.zero_grad()
            loss.backward()
            opt.step()
            value = loss.item()
            if value < best - 1e-7:
                best, stale = value, 0
                best_state = [p.detach().clone() for p in params]
            else:
                stale += 1
                if stale >= 50:
                    break
        with torch.no_grad():
            for p, saved in zip(params, best_state or []):
                p.copy_(saved)
            q_hat, r_hat = (t.numpy().astype(np.float64) for t in forward())
        layers = [{"w": shared[k].weight.detach().numpy().tolist(), "b": shared[k].bias.detach().numpy().tolist(),
                   "g_w": g_head[k].weight.detach().numpy()[0].tolist(), "g_b": float(g_head[k].bias.detach()[0])}
                  for k in range(num_layers)]
    finally:
        torch.set_num_threads(threads)

    thresholds = assign_thresholds(q_hat, r_hat)
    exit_at = np.array([int(np.argmax(row >= thresholds)) for row in q_hat])
    out = {"policy": "eenet", "budget": budget, "budget_cost": float(target_budget), "cost_model": cost.name,
           "exit_costs": costs.tolist(), "thresholds": [float(t) for t in thresholds], "layers": layers,
           "validation": {"samples": n, "accuracy": float(correct[np.arange(n), exit_at].mean()),
                          "cost": float(costs[exit_at].mean()),
                          "exit_distribution": np.bincount(exit_at, minlength=num_layers).tolist()}}
    return out


def assign_thresholds(q_hat: np.ndarray, r_hat: np.ndarray) -> np.ndarray:
    """EENet Algorithm 1 lines 3–15: per-exit quotas round(N p_k) filled by the highest scores."""
    n, num_layers = q_hat.shape
    taken = np.zeros(n, dtype=bool)
    thresholds = np.full(num_layers, 1e8)
    for k in range(num_layers):
        quota = int(round(n * float(r_hat[:, k].mean())))
        count = 0
        for i in np.argsort(-q_hat[:, k], kind="stable"):
            if taken[i] or quota == 0:
                continue
            taken[i] = True
            count += 1
            if count == quota:
                thresholds[k] = q_hat[i, k]
                break
    thresholds[-1] = -1e8
    return thresholds


class EENet(Policy):
    """Exit at the first exit whose learned utility score g_k reaches its budget threshold t_k."""

    name = "eenet"

    def __init__(self, *, calibration: str | None = None, **kw) -> None:
        super().__init__(**kw)
        self.calibration = cal = load_calibration(calibration, self.name, accept=("eenet",), required=True)
        try:
            self.thresholds = np.asarray(cal["thresholds"], dtype=np.float64)
            self.layers = [(np.asarray(x["w"]), np.asarray(x["b"]), np.asarray(x["g_w"]), float(x["g_b"]))
                           for x in cal["layers"]]
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"policy {self.name!r}: calibration is not an eenet calibration ({exc})") from None
        if len(self.layers) != self.num_layers or len(self.thresholds) != self.num_layers:
            raise ConfigError(f"policy {self.name!r}: calibration has {len(self.layers)} exits, the model "
                              f"{self.num_layers}")

    calibrate = staticmethod(calibrate)

    def params(self) -> dict[str, Any]:
        return {"seed": self.seed, "calibration": calibration_digest(self.calibration)}

    def scores(self, probs: np.ndarray) -> np.ndarray:
        """g_1..g_k for one sample from the probabilities of its exits 1..k ``[k, C]``."""
        out = np.zeros(0)
        for k in range(1, len(probs) + 1):
            w, b, g_w, g_b = self.layers[k - 1]
            s = w @ features(probs, k, out) + b
            s = np.where(s > 0, s, NEG_SLOPE * s)
            out = np.append(out, 1.0 / (1.0 + np.exp(-(g_w @ s + g_b))))
        return out

    def decide(self, obs: Observation, state: StateView) -> Action:
        if obs.layer:
            if obs.layer == self.num_layers:
                return Exit()
            seen = np.stack([obs.probs[k] for k in range(1, obs.layer + 1)]).astype(np.float64)
            if self.scores(seen)[-1] >= self.thresholds[obs.layer - 1]:
                return Exit()
        return Continue(obs.layer + 1, exits="last")
