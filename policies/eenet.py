"""EENet (Ilhan et al.): learned exit-utility scores and budget-derived thresholds, one small MLP per exit.

Per exit k the features are the exit's probabilities ŷ_k, the confidence scores a_k (max-prob Eq. 5,
normalised negative entropy Eq. 6, vote Eq. 7) and the utility scores of the earlier exits b_k (Eq. 8).
A shared leaky-ReLU layer feeds the utility head g_k (sigmoid, Eq. 9) and the assignment head h_k
(softmax over exits, Eq. 10). :func:`calibrate` trains them on a labelled validation matrix with
L = L_g + α L_budget + β L_CE (Eq. 11–15: survival-weighted BCE on correctness q_k, budget deviation of
the expected cost under the assignment, CE against the assignment targets r_k) and sets the thresholds
by Algorithm 1: for exit k, the top-scored not yet assigned samples exit until its quota is full, and
t_k is the score of the last one (t_L = -inf).

Online, every exit is evaluated in turn and the sample exits at the first k with g_k >= t_k.

The budget is kept, not just aimed at (:func:`fit_budget`): the quotas come from the assignment
network's exit distribution p_k (Alg. 1 line 7), but L_budget only pulls E[c] towards B with weight α
and training stops early, so on SST-2 dev the thresholds overspent B = 0.2·c_L and 0.3·c_L by 55% and
36%. After Algorithm 1, while the realised cost on the calibration data exceeds B, quota moves from an
exit to an earlier, cheaper one, each time the move that loses the least validation accuracy per unit
of cost saved; then (``spend``) budget left over moves quota to later exits while that raises the
validation accuracy within B. Both serve the paper's Eq. 1 (the most accurate thresholds whose average
cost is ≤ B); the JSON records the learned and the final quotas, costs and accuracies. A budget below
c_1 / c_L cannot be met and is refused.

Simplifications (documented choices): the exits are every layer on the device (costs c_k = the cost
model's price of k layers and k exits; ``budget`` is a fraction of c_L); the layers have biases;
training is full-batch Adam (lr 1e-3, weight decay 0.01 as the paper's L2) with early stopping when the
loss has not improved for 50 epochs; α = 1e-2, β = 1e-4 and D_h = 2D are the paper's text settings;
quotas round N·p_k by largest remainder so that they add up to N (Alg. 1's round() can overfill).
The trained weights and thresholds are stored as JSON (``exitflow policy calibrate eenet``).

>>> import numpy as np
>>> features(np.array([[.9, .1], [.2, .8]]), k=2, previous=np.array([.7])).round(4).tolist()
[0.2, 0.8, 0.8, 0.2781, 0.5, 0.7]
>>> quotas(np.array([.25, .25, .25, .25]), 6).tolist()         # round() would give 2+2+2+2 = 8 > 6
[2, 2, 1, 1]
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


def utility_scores(layers: list[tuple], probs: np.ndarray) -> np.ndarray:
    """g_1..g_k (Eq. 8–9) of samples ``probs`` [N, k, C] from stored (W_sh, b_sh, W_g, b_g) per exit → [N, k]."""
    out = np.zeros((len(probs), 0))
    for k in range(1, probs.shape[1] + 1):
        w, b, g_w, g_b = layers[k - 1]
        s = features(probs, k, out) @ w.T + b
        s = np.where(s > 0, s, NEG_SLOPE * s)
        out = np.concatenate([out, 1.0 / (1.0 + np.exp(-(s @ g_w + g_b)))[:, None]], axis=1)
    return out


def unpack(layers: list[dict]) -> list[tuple]:
    """A calibration's ``layers`` JSON as numpy (W_sh, b_sh, W_g, b_g) per exit."""
    return [(np.asarray(x["w"], dtype=np.float64), np.asarray(x["b"], dtype=np.float64),
             np.asarray(x["g_w"], dtype=np.float64), float(x["g_b"])) for x in layers]


def exit_costs(cost: CostModel, num_layers: int) -> np.ndarray:
    """c_k for k = 1..L: k device layers and k evaluated exits (no offload)."""
    return np.array([cost.breakdown(Trace(device_layers=k, device_exits=k)).total for k in range(1, num_layers + 1)])


def check_budget(budget: float, costs: np.ndarray, cost_name: str, who: str = "eenet calibration") -> float:
    """``budget`` (a fraction of c_L) as a cost; ConfigError unless it lies in the feasible [c_1/c_L, 1]."""
    low = float(costs[0] / costs[-1])
    if not isinstance(budget, (int, float)) or not low - 1e-9 <= budget <= 1 + 1e-9:
        raise ConfigError(f"{who}: budget {budget!r} (a fraction of the final exit's cost c_L = {costs[-1]:g}) "
                          f"is infeasible under the {cost_name!r} cost model at {len(costs)} exits: it must lie in "
                          f"[c_1/c_L, 1] = [{low:.4f}, 1], as every sample pays at least c_1 = {costs[0]:g}")
    return float(budget * costs[-1])


def quotas(shares: np.ndarray, n: int) -> np.ndarray:
    """Integer quotas for ``n`` samples in proportion to ``shares``, adding up to exactly ``n`` (largest remainder)."""
    raw = n * np.asarray(shares, dtype=np.float64) / float(np.sum(shares))
    out = np.floor(raw).astype(np.int64)
    out[np.argsort(-(raw - out), kind="stable")[:n - int(out.sum())]] += 1
    return out


def fill_thresholds(scores: np.ndarray, counts: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Algorithm 1 lines 5–15 for given quotas: exit k lets its ``counts[k]`` top-scored free samples go.

    t_k is the lowest score that went (1e8 where the quota is 0: nobody exits there), t_L = -1e8. An
    exit with fewer free samples than its quota takes them all, so no sample falls through for want of a
    threshold. ``order`` (``argsort(-scores, 0)``) can be passed in when called many times.
    """
    n, num_layers = scores.shape
    order = np.argsort(-scores, axis=0, kind="stable") if order is None else order
    taken = np.zeros(n, dtype=bool)
    thresholds = np.full(num_layers, 1e8)
    for k in range(num_layers - 1):
        col = order[:, k]
        pick = col[~taken[col]][:int(counts[k])]
        if len(pick):
            taken[pick] = True
            thresholds[k] = scores[pick[-1], k]
    thresholds[-1] = -1e8
    return thresholds


def first_exit(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The online rule on a score matrix: 0-based index of the first exit whose score reaches its threshold."""
    hit = scores >= thresholds
    hit[:, -1] = True
    return hit.argmax(1)


def loosen(thresholds: np.ndarray, margin: float = 1e-9) -> np.ndarray:
    """Finite thresholds a hair lower, so the row-at-a-time online arithmetic decides as the batch one did."""
    return np.where(np.abs(thresholds) < 1e8, thresholds - margin, thresholds)


def assign_thresholds(q_hat: np.ndarray, r_hat: np.ndarray) -> np.ndarray:
    """EENet Algorithm 1 lines 3–15: quotas N·p_k (p_k = mean of r̂_k) filled by the highest scores."""
    return fill_thresholds(q_hat, quotas(r_hat.mean(0), len(q_hat)))


def fit_budget(scores: np.ndarray, counts: np.ndarray, costs: np.ndarray, budget_cost: float,
               correct: np.ndarray, step: float = 0.01, spend: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Quotas whose thresholds keep the realised cost on the calibration data ≤ ``budget_cost``.

    Monotone greedy on the quotas (Algorithm 1 turns quotas into thresholds): while over budget, move
    ``step``·N samples of quota from an exit j to an earlier exit i, choosing the (j, i) that loses the
    least accuracy per unit of cost saved; the move that reaches the budget is shrunk to the fewest
    samples that suffice. Every move lowers Σ n_k c_k, and all quota at exit 1 costs c_1 ≤ B, so this
    ends for every feasible budget. With ``spend``, budget left over is then spent: quota moves to a later
    exit while that gains accuracy and stays within B (move size halving down to one sample). Returns
    the thresholds and a record of the adjustment.
    """
    n, num_layers = scores.shape
    order = np.argsort(-scores, axis=0, kind="stable")
    rows, tol = np.arange(n), 1e-9

    def outcome(c):
        t = fill_thresholds(scores, c, order)
        at = first_exit(scores, t)
        return c, t, float(costs[at].mean()), float(correct[rows, at].mean())

    def moved(c, src, dst, m):
        c = c.copy()
        c[src] -= m
        c[dst] += m
        return outcome(c)

    state = outcome(np.asarray(counts, dtype=np.int64).copy())
    record = {"learned_counts": state[0].tolist(), "learned_cost": state[2], "learned_accuracy": state[3],
              "moves_down": 0, "moves_up": 0}
    size = max(1, int(round(step * n)))
    while state[2] > budget_cost + tol:                   # 1: cut the cost, least accuracy lost per cost saved
        c, _, spent, acc = state
        best = None
        for j in range(1, num_layers):
            for i in range(j):
                if c[j]:
                    cand = moved(c, j, i, min(size, int(c[j])))
                    if cand[2] < spent - 1e-12:
                        key = ((acc - cand[3]) / (spent - cand[2]), cand[2])
                        if best is None or key < best[0]:
                            best = (key, j, i, min(size, int(c[j])), cand)
        if best is None:                   # cannot happen for a feasible budget; fail loudly rather than loop
            raise ConfigError(f"eenet calibration: no quota move lowers the cost {spent:.4f} towards {budget_cost:.4f}")
        _, j, i, m, state = best
        lo, hi = 1, m                      # the move that reaches B: its smallest part that suffices
        while state[2] <= budget_cost + tol and lo < hi:
            mid = (lo + hi) // 2
            cand = moved(c, j, i, mid)
            if cand[2] <= budget_cost + tol:
                hi, state = mid, cand
            else:
                lo = mid + 1
        record["moves_down"] += 1
    while spend and size >= 1:                            # 2: spend what is left, most accuracy per cost
        c, _, spent, acc = state
        best = None
        for i in range(num_layers - 1):
            for j in range(i + 1, num_layers):
                if c[i]:
                    cand = moved(c, i, j, min(size, int(c[i])))
                    if cand[3] > acc + 1e-12 and cand[2] <= budget_cost + tol:
                        key = (-(cand[3] - acc) / max(cand[2] - spent, 1e-12), cand[2])
                        if best is None or key < best[0]:
                            best = (key, cand)
        if best is None:
            size //= 2
        else:
            state = best[1]
            record["moves_up"] += 1
    counts, thresholds, spent, acc = state
    record.update(counts=counts.tolist(), cost=spent, accuracy=acc, step=max(1, int(round(step * n))),
                  method="learned quotas kept" if not record["moves_down"] + record["moves_up"] else
                  "greedy quota moves: to cheaper exits while over B (least accuracy lost per cost saved)"
                  + (", then to later exits while accuracy rises within B" if spend else ""))
    return thresholds, record


def calibrate(matrix, *, cost: CostModel, budget: float = 0.5, epochs: int = 2000, lr: float = 1e-3,
              loss_alpha: float = 1e-2, loss_beta: float = 1e-4, spend: bool = True, seed: int = 0) -> dict[str, Any]:
    """Train g_k/h_k on a labelled validation matrix, derive thresholds (Alg. 1) and keep the budget; JSON-able.

    ``budget`` is a fraction of c_L in [c_1/c_L, 1]; ``spend``: see :func:`fit_budget`.
    """
    import torch

    if matrix.labels is None:
        raise ConfigError("eenet calibration needs a labelled matrix (labels array)")
    probs = matrix.probs.astype(np.float64)
    n, num_layers, classes = probs.shape
    costs = exit_costs(cost, num_layers)
    target_budget = check_budget(budget, costs, cost.name)
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
            r_hat = forward()[1].numpy().astype(np.float64)
        layers = [{"w": shared[k].weight.detach().numpy().tolist(), "b": shared[k].bias.detach().numpy().tolist(),
                   "g_w": g_head[k].weight.detach().numpy()[0].tolist(), "g_b": float(g_head[k].bias.detach()[0])}
                  for k in range(num_layers)]
    finally:
        torch.set_num_threads(threads)

    q_hat = utility_scores(unpack(layers), probs)     # the policy's own float64 arithmetic, from the stored weights
    learned = quotas(r_hat.mean(0), n)
    thresholds, adjustment = fit_budget(q_hat, learned, costs, target_budget, correct, spend=spend)
    thresholds = loosen(thresholds)
    exit_at = first_exit(q_hat, thresholds)
    adjustment["expected_cost"] = float(r_hat.mean(0) @ costs)               # E[c] under the assignment net
    return {"policy": "eenet", "budget": budget, "budget_cost": target_budget, "cost_model": cost.name,
            "exit_costs": costs.tolist(), "thresholds": [float(t) for t in thresholds], "layers": layers,
            "adjustment": adjustment,
            "validation": {"samples": n, "accuracy": float(correct[np.arange(n), exit_at].mean()),
                           "cost": float(costs[exit_at].mean()),
                           "budget_met": bool(costs[exit_at].mean() <= target_budget + 1e-9),
                           "exit_distribution": np.bincount(exit_at, minlength=num_layers).tolist()}}


class EENet(Policy):
    """Exit at the first exit whose learned utility score g_k reaches its budget threshold t_k."""

    name = "eenet"

    def __init__(self, *, calibration: str | None = None, **kw) -> None:
        super().__init__(**kw)
        self.calibration = cal = load_calibration(calibration, self.name, accept=("eenet",), required=True)
        try:
            self.thresholds = np.asarray(cal["thresholds"], dtype=np.float64)
            self.layers = unpack(cal["layers"])
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
        return utility_scores(self.layers, probs[None])[0]

    def decide(self, obs: Observation, state: StateView) -> Action:
        if obs.layer:
            if obs.layer == self.num_layers:
                return Exit()
            seen = np.stack([obs.probs[k] for k in range(1, obs.layer + 1)]).astype(np.float64)
            if self.scores(seen)[-1] >= self.thresholds[obs.layer - 1]:
                return Exit()
        return Continue(obs.layer + 1, exits="last")
