"""EENet's budget: kept on the calibration data, quotas that add up, infeasible budgets refused; the MSDNet-style
geometric baselines, EENet's exit weights, and the `exitflow reproduce eenet` table builder."""

import json

import numpy as np
import pytest

from stream.costs import preset, splitee
from stream.errors import ConfigError

from policies import eenet
from policies import reproduce_eenet as rep
from policies.evaluate import evaluate, synthetic_matrix

COST = preset("splitee", num_layers=6)


@pytest.fixture(scope="module")
def val():
    return synthetic_matrix(500, layers=6, seed=21)


@pytest.fixture(scope="module")
def test_matrix():
    return synthetic_matrix(300, layers=6, seed=22)


# -- budget kept ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0.2, 0.3, 0.5, 0.8])
def test_realised_cost_on_the_calibration_data_is_within_the_budget(val, budget):
    cal = eenet.calibrate(val, cost=COST, budget=budget, epochs=200)
    b = cal["budget_cost"]
    assert b == pytest.approx(budget * 6)
    assert cal["validation"]["cost"] <= b + 1e-9 and cal["validation"]["budget_met"]
    adj = cal["adjustment"]
    assert sum(adj["counts"]) == sum(adj["learned_counts"]) == 500
    assert adj["cost"] == pytest.approx(cal["validation"]["cost"])
    if adj["learned_cost"] > b:                                   # moved only towards cheaper exits first
        assert adj["moves_down"] > 0 and adj["method"].startswith("greedy")
    policy = eenet.EENet(cost=COST, num_layers=6, calibration=cal)     # the online rule decides the same way
    r = evaluate(policy, val, keep_curve=False)
    assert r["cost"] == pytest.approx(cal["validation"]["cost"])
    assert r["accuracy"] == pytest.approx(cal["validation"]["accuracy"])


def test_fit_budget_cuts_cost_with_the_least_accuracy_lost():
    # exit 1 is right for samples 0-1, exit 2 for 0-3, exit 3 for all; scores rank sample i first at every exit
    scores = np.tile(np.linspace(1, 0, 6)[:, None], (1, 3))
    correct = np.array([[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 1]], dtype=bool)
    costs = np.array([1.0, 2.0, 3.0])
    t, rec = eenet.fit_budget(scores, np.array([0, 0, 6]), costs, 2.0, correct, step=1 / 6, spend=False)
    at = eenet.first_exit(scores, t)
    assert costs[at].mean() <= 2.0 and rec["cost"] <= 2.0
    assert rec["accuracy"] == pytest.approx(correct[np.arange(6), at].mean())
    assert rec["accuracy"] == 1.0 and rec["counts"] == [2, 2, 2]            # each sample at its first right exit
    t, rec = eenet.fit_budget(scores, np.array([6, 0, 0]), costs, 3.0, correct, step=1 / 6, spend=True)
    assert rec["accuracy"] == 1.0 and rec["moves_up"] > 0 and rec["moves_down"] == 0


# -- quota overflow ------------------------------------------------------------------------------------

def test_quotas_add_up_to_n_where_round_overfills():
    shares = np.array([0.3, 0.3, 0.3, 0.1])
    assert sum(round(5 * p) for p in shares) == 6                      # Algorithm 1's round(N p_k): 6 of 5
    assert eenet.quotas(shares, 5).tolist() == [2, 2, 1, 0]
    q_hat = np.array([[.9, .1, .1, .5], [.8, .2, .2, .5], [.1, .9, .1, .5], [.2, .8, .3, .5], [.3, .3, .9, .5]])
    t = eenet.assign_thresholds(q_hat, np.tile(shares, (5, 1)))
    assert t[2] < 1e8 and t[3] == -1e8                            # exit 3 fills its quota of one
    assert eenet.first_exit(q_hat, t).tolist() == [0, 0, 1, 1, 2]       # no sample falls through to the last exit


def test_an_unfilled_or_empty_quota_gets_a_sane_threshold():
    q_hat = np.array([[.9, .2, .4], [.8, .7, .3], [.1, .6, .2]])
    t = eenet.fill_thresholds(q_hat, np.array([2, 0, 5]))
    assert t[1] == 1e8 and t[2] == -1e8                                 # quota 0: nobody exits there
    t = eenet.fill_thresholds(q_hat, np.array([1, 5, 0]))               # more quota than samples left
    assert t[1] == pytest.approx(0.6)
    assert eenet.first_exit(q_hat, t).tolist() == [0, 1, 1]


# -- infeasible budget ---------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0.1, 1.2])
def test_an_infeasible_budget_is_refused_naming_the_range(val, budget):
    pattern = r"budget %s .*'splitee' cost model.*\[c_1/c_L, 1\] = \[0\.1667, 1\]" % budget
    with pytest.raises(ConfigError, match=pattern):
        eenet.calibrate(val, cost=COST, budget=budget, epochs=5)
    eenet.check_budget(1 / 6, eenet.exit_costs(COST, 6), "splitee")    # c_1 itself is feasible


# -- the geometric baselines ---------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0.2, 0.5, 0.8])
def test_geometric_shares_follow_q_to_the_k_and_meet_the_budget(val, budget):
    costs = eenet.exit_costs(COST, 6)
    shares, q = rep.geometric_shares(costs, budget * costs[-1])
    assert shares.sum() == pytest.approx(1) and shares @ costs == pytest.approx(budget * costs[-1])
    assert np.allclose(shares[1:] / shares[:-1], q)
    for kind in ("max", "entropy", "vote"):
        b = rep.calibrate_baseline(val, kind, costs, budget * costs[-1])
        assert b["val_cost"] <= budget * costs[-1] + 1e-9
        assert b["counts"] == eenet.quotas(shares, 500).tolist()
        if kind != "vote":                                              # vote ties end below B; the others at it
            assert b["val_cost"] == pytest.approx(budget * costs[-1], abs=0.05)
        policy = rep.ScoreThresholds(cost=COST, num_layers=6, kind=kind, thresholds=b["thresholds"])
        r = evaluate(policy, val, keep_curve=False)
        assert r["cost"] == pytest.approx(b["val_cost"]) and r["accuracy"] == pytest.approx(b["val_accuracy"])


def test_patience_and_the_oracle_respect_the_budget(val):
    costs = eenet.exit_costs(COST, 6)
    assert rep.largest_patience(val, costs, 1.5) is None                # patience 1 needs at least c_2 = 2
    p = rep.largest_patience(val, costs, 4.0)
    assert costs[rep.patience_exits(val.probs, p)].mean() <= 4.0
    if p + 1 < 6:
        assert costs[rep.patience_exits(val.probs, p + 1)].mean() > 4.0
    acc, spent = rep.oracle(val, costs, 2.0)
    assert spent <= 2.0 and acc >= (val.probs[:, 0].argmax(-1) == val.labels).mean()
    assert rep.oracle(val, costs, 6.0)[0] == pytest.approx((val.probs.argmax(-1) == val.labels[:, None]).any(1).mean())


# -- exit weights --------------------------------------------------------------------------------------

def test_eenet_exit_weights_and_comma_lists(tmp_path):
    from stream import cli
    from stream.train import TrainConfig, exit_weights

    assert exit_weights("eenet", 4) == pytest.approx((0.05, 0.1, 0.15, 0.2))        # γ_k = k / (K (K + 1))
    assert sum(exit_weights("eenet", 6)) == pytest.approx(0.5)
    assert exit_weights("1, 2,0", 3) == (1.0, 2.0, 0.0) and exit_weights("", 3) is None
    assert TrainConfig(exit_weights="eenet").exit_weights == "eenet"
    for bad, msg in (("eenet,1", "comma-separated numbers"), ("1,-1", ">= 0"), ("0,0", "not all 0")):
        with pytest.raises(ConfigError, match=msg):
            exit_weights(bad, 2)
    with pytest.raises(ConfigError, match="3 exit weights for a model with 2 exits"):
        exit_weights("1,1,1", 2)

    data = tmp_path / "toy.tsv"
    rows = "".join(f"{'great' if i % 2 else 'awful'} film {i}\t{i % 2}\n" for i in range(16))
    data.write_text("text\tlabel\n" + rows)
    out = tmp_path / "model"
    assert cli.main(["train", "--dataset", f"tsv:{data}", "--text-column", "text", "--label-column", "label",
                     "--backbone", "random:L=2,H=32,A=2,I=64", "--out", str(out), "--epochs", "1", "--batch-size",
                     "8", "--max-len", "16", "--threads", "1", "--exit-weights", "eenet"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["exit_weights"] == pytest.approx([1 / 6, 2 / 6]) and card["exit_weights_spec"] == "eenet"
    assert cli.main(["train", "--dataset", f"tsv:{data}", "--out", str(out), "--exit-weights", "x"]) == 1


# -- exitflow reproduce eenet --------------------------------------------------------------------------

def test_reproduce_table_builder_on_generated_matrices(val, test_matrix, tmp_path):
    logs = []
    result = rep.run({"sst2": (val, test_matrix)}, budgets=(0.2, 0.5), sweep=False, epochs=60, log=logs.append)
    paper = rep.paper_budgets(rep.paper_table(), "sst2")
    assert sorted(paper) == [0.47, 0.538, 0.672]
    budgets = sorted({r["budget"] for r in result["rows"]})
    assert budgets == [0.2, 0.47, 0.5, 0.538, 0.672]
    assert {r["method"] for r in result["rows"]} == set(rep.METHODS)
    for r in result["rows"]:
        assert {"dataset", "method", "budget", "realised_cost", "accuracy", "paper_acc"} <= set(r)
        if r["method"] == "eenet":
            assert r["val_cost"] <= r["budget_cost"] + 1e-9
        if r["method"] in ("branchynet", "msdnet", "pabee") and r["val_cost"] is not None:
            assert r["val_cost"] <= r["budget_cost"] + 1e-9
        if r["method"] == "oracle":
            assert r["realised_cost"] <= r["budget_cost"] + 1e-9
        if r["method"] in ("eenet", "msdnet") and r["budget"] in paper:
            assert r["paper_acc"] == paper[r["budget"]][r["method"]]
        elif r["method"] in ("pabee-patience", "oracle") or r["budget"] not in paper:
            assert r["paper_acc"] is None
    assert next(r for r in result["rows"] if r["method"] == "pabee-patience" and r["budget"] == 0.2)["accuracy"] is None
    assert any("budget 0.2" in m for m in logs)
    paths = rep.write(result, tmp_path)
    assert [p.name for p in paths] == ["eenet.json", "eenet_table.txt", "eenet_budget.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert json.loads(paths[0].read_text())["rows"][0]["dataset"] == "sst2"
    text = paths[1].read_text()
    assert "paper %" in text and "91.45" in text and "eenet" in text
