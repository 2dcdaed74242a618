"""SplitEE / SplitEE-S: Eq. 1 rewards, the UCB index of Algorithm 1, delayed feedback, side observations."""

import math

import numpy as np
import pytest

from stream.costs import Trace, splitee
from stream.errors import ConfigError

from policies.base import Continue, Event, Exit, Feedback, Observation, Offload, StateView
from policies.engine import feedback_event, learn_feedback, run_device
from policies.evaluate import MatrixRunner, evaluate, stream, synthetic_matrix
from policies.registry import build
from policies.splitee import SplitEE, SplitEES, choose_alpha
from policies.state import MemoryStore, flush

LAM1, LAM2 = 6 / 7, 1 / 7  # SplitEE §5.2: λ = λ1 + λ2 = 1, λ2 = λ1 / 6


def probs(*conf):
    return {i: np.array([c, 1 - c]) for i, c in enumerate(conf, start=1)}


def test_eq1_exit_reward_uses_lambda1_i_plus_lambda2():
    p = SplitEE(cost=splitee(offload=5.0), num_layers=4, alpha=0.8, alpha_rule="fixed")
    obs = Observation("a", 4, layer=2, probs={2: np.array([0.95, 0.05])})
    assert p.decide(obs, StateView()) == Exit()
    start = p.learn(Event("start", "a", p.context(Observation("a", 4), Continue(2)), Trace(), obs), StateView())
    assert start == {"t": 1.0, "p2": 1.0}                     # in flight until its reward is known
    trace = Trace(device_layers=2, device_exits=1)
    delta = p.learn(Event("decision", "a", p.context(obs, Exit()), trace, obs), StateView())
    r = 0.95 - 0.1 * (2 * LAM1 + LAM2)
    assert delta == {"p2": -1.0, "n2": 1.0, "s2": pytest.approx(r), "v2": pytest.approx(r * r)}


def test_eq1_offload_reward_arrives_in_feedback_with_c_last():
    p = SplitEE(cost=splitee(offload=3.0), num_layers=4, alpha=0.8, alpha_rule="fixed")
    obs = Observation("b", 4, layer=1, probs={1: np.array([0.6, 0.4])})
    assert p.decide(obs, StateView()) == Offload("cloud")
    device = Trace(device_layers=1, device_exits=1, tier="cloud")
    assert p.learn(Event("decision", "b", {"arm": 1}, device, obs), StateView()) == {}  # still pending
    full = Trace(device_layers=1, device_exits=1, tier="cloud", cloud_layers=3)
    delta = p.learn(feedback_event("b", {"arm": 1}, full, Feedback(4, np.array([0.1, 0.9]))), StateView())
    r = 0.9 - 0.1 * (LAM1 + LAM2 + 3.0)
    assert delta == {"p1": -1.0, "n1": 1.0, "s1": pytest.approx(r), "v1": pytest.approx(r * r),
                     "on1": 1.0, "os1": pytest.approx(r), "ocl_n": 1.0, "ocl_s": pytest.approx(0.9)}


def test_last_layer_always_exits():
    p = SplitEE(cost=splitee(), num_layers=3, alpha=0.99)
    assert p.decide(Observation("c", 3, layer=3, probs={3: np.array([0.5, 0.5])}), StateView()) == Exit()


def test_ucb_plays_each_arm_once_then_maximises_the_index():
    p = SplitEE(cost=splitee(), num_layers=3, alpha=0.8, beta=1.0, bonus="ucb1")  # Algorithm 1 as printed
    assert p.pull(StateView()) == 1
    assert p.pull(StateView({"t": 1.0, "n1": 1.0, "s1": 0.9})) == 2
    state = StateView({"t": 10.0, "n1": 5.0, "s1": 2.5, "n2": 3.0, "s2": 2.1, "n3": 2.0, "s3": 0.2})
    expected = [q + math.sqrt(math.log(10) / n) for q, n in ((0.5, 5), (0.7, 3), (0.1, 2))]
    assert p.index(state) == pytest.approx(expected)
    assert p.pull(state) == 2
    assert p.decide(Observation("d", 3), state) == Continue(2, exits="last")


def test_pending_pulls_count_in_the_exploration_term():
    p = SplitEE(cost=splitee(), num_layers=2, alpha=0.8, beta=1.0, bonus="ucb1")
    # arm 1: 1 reward + 3 pending; arm 2: 1 reward.  t = 5.
    state = StateView({"t": 5.0, "n1": 1.0, "s1": 0.5, "p1": 3.0, "n2": 1.0, "s2": 0.3})
    assert p.index(state) == pytest.approx([0.5 + math.sqrt(math.log(5) / 4), 0.3 + math.sqrt(math.log(5) / 1)])
    # an arm whose pulls are all pending is scored by its best possible reward 1 - μγ_i
    only_pending = StateView({"t": 2.0, "p1": 1.0, "n2": 1.0, "s2": 0.3})
    assert p.index(only_pending)[0] == pytest.approx(1 - 0.1 * (LAM1 + LAM2) + math.sqrt(math.log(2)))


def test_a_batch_spreads_over_arms_while_rewards_are_pending():
    """All samples of a batch are offloaded and nothing has come back: UCB still explores every arm."""
    p = SplitEE(cost=splitee(), num_layers=4, alpha=1.0, beta=1.0, alpha_rule="fixed", bonus="ucb1")
    view = StateView()
    obs = [Observation(f"s{i}", 4) for i in range(12)]
    rows = np.full((12, 4, 2), 0.5, dtype=np.float32)
    outcomes = run_device(p, view, obs, MatrixRunner(rows, list(range(12))))
    arms = [o.context["arm"] for o in outcomes]
    assert arms[:4] == [1, 2, 3, 4]                       # play each arm once (Alg. 1 line 3)
    assert len(set(arms[4:])) > 1                          # pending pulls shrink the bonus
    assert all(o.offloaded for o in outcomes if o.context["arm"] < 4)
    assert view.number("t") == 12
    assert sum(view.number(f"p{i}") for i in range(1, 5)) == sum(o.offloaded for o in outcomes)


@pytest.mark.parametrize("delay", [0, 3])
def test_delayed_feedback_completes_every_pull(delay):
    m = synthetic_matrix(300, layers=4, seed=3)
    p = SplitEE(cost=splitee(), num_layers=4, alpha=0.8)
    store = MemoryStore()
    res = stream(p, m, np.arange(300), batch_size=16, feedback_delay=delay, store=store)
    state = StateView(store.snapshot(p.namespace()))
    assert state.number("t") == 300
    assert sum(state.number(f"n{i}") for i in range(1, 5)) == 300
    assert all(state.number(f"p{i}") == pytest.approx(0) for i in range(1, 5))
    assert sorted(np.bincount(res.arm, minlength=5)[1:].tolist()) != [0, 0, 0, 300]


def test_learn_from_feedback_only_through_feedback_events():
    p = SplitEE(cost=splitee(), num_layers=3)
    with pytest.raises(ConfigError, match="learn_feedback got a 'decision' event"):
        learn_feedback(p, StateView(), [Event("decision", "x", {"arm": 1}, Trace())])


def test_splitee_s_side_observations_observed():
    p = SplitEES(cost=splitee(offload=5.0), num_layers=4, alpha=0.8, cl_estimate="mean")
    # exited at arm 3 with C = (0.7, 0.85, 0.9): arm 1 needs C_L, estimated by the mean of observed C_L
    obs = Observation("e", 4, layer=3, probs=probs(0.7, 0.85, 0.9))
    ctx = p.context(obs, Exit())
    state = StateView({"cl_n": 2.0, "cl_s": 1.6})
    delta = p.learn(Event("decision", "e", ctx, Trace(3, 3), obs), state)
    assert delta["p3"] == -1.0 and delta["n1"] == delta["n2"] == delta["n3"] == 1.0
    assert delta["s1"] == pytest.approx(0.8 - 0.1 * (1 + 5))          # Ĉ_L = 1.6 / 2, γ = λ·1 + o
    assert delta["s2"] == pytest.approx(0.85 - 0.1 * 2)               # SplitEE-S pays λ·i
    assert delta["s3"] == pytest.approx(0.9 - 0.1 * 3)
    deepest = SplitEES(cost=splitee(offload=5.0), num_layers=4, alpha=0.8)       # the default: Ĉ_L = C_3
    assert deepest.learn(Event("decision", "e", ctx, Trace(3, 3), obs), state)["s1"] == pytest.approx(0.9 - 0.6)


def test_splitee_s_offloaded_sample_leaves_unconfident_arms_pending_until_feedback():
    p = SplitEES(cost=splitee(offload=5.0), num_layers=4, alpha=0.8, alpha_rule="fixed")
    obs = Observation("f", 4, layer=3, probs=probs(0.6, 0.85, 0.7))
    assert p.decide(obs, StateView()) == Offload("cloud")
    ctx = p.context(obs, Offload("cloud"))
    device = Trace(3, 3, tier="cloud")
    delta = p.learn(Event("decision", "f", ctx, device, obs), StateView())
    # arm 3 (played) is resolved and pending again at once: no net change; arm 1 waits for C_L too
    assert delta == {"p1": 1.0, "n2": 1.0, "s2": pytest.approx(0.85 - 0.2), "v2": pytest.approx(0.65 ** 2)}
    full = Trace(3, 3, tier="cloud", cloud_layers=1)
    back = p.learn(feedback_event("f", ctx, full, Feedback(4, np.array([0.95, 0.05]))), StateView())
    assert back == {"cl_n": 1.0, "cl_s": pytest.approx(0.95), "ocl_n": 1.0, "ocl_s": pytest.approx(0.95),
                    "p1": -1.0, "n1": 1.0, "s1": pytest.approx(0.95 - 0.1 * 6), "v1": pytest.approx(0.35 ** 2),
                    "on1": 1.0, "os1": pytest.approx(0.35), "p3": -1.0, "n3": 1.0,
                    "s3": pytest.approx(0.95 - 0.1 * 8), "v3": pytest.approx(0.15 ** 2), "on3": 1.0,
                    "os3": pytest.approx(0.15)}


def test_splitee_s_oracle_reads_hindsight_and_is_offline_only():
    hind = np.array([[0.7, 0.3], [0.9, 0.1], [0.6, 0.4], [0.97, 0.03]], dtype=np.float32)
    p = SplitEES(cost=splitee(offload=5.0), num_layers=4, alpha=0.8, side_info="oracle")
    obs = Observation("g", 4, layer=2, probs=probs(0.7, 0.9), hindsight=hind, label=0)
    delta = p.learn(Event("decision", "g", p.context(obs, Exit()), Trace(2, 2), obs), StateView())
    assert delta["s1"] == pytest.approx(0.97 - 0.1 * 6)
    assert delta["s2"] == pytest.approx(0.9 - 0.1 * 2)
    with pytest.raises(ConfigError, match="offline evaluation only"):
        build("splitee-s", {"side_info": "oracle"}, cost=splitee(), num_layers=4, live=True)
    assert build("splitee-s", {}, cost=splitee(), num_layers=4, live=True).side_info == "observed"


def test_bad_settings_name_the_parameter():
    with pytest.raises(ConfigError, match=r"alpha must be in \[0.0, 1.0\], got 1.5"):
        build("splitee", {"alpha": "1.5"}, cost=splitee(), num_layers=4)
    with pytest.raises(ConfigError, match="side_info must be 'observed' or 'oracle', got 'psychic'"):
        build("splitee-s", {"side_info": "psychic"}, cost=splitee(), num_layers=4)


def test_regret_is_sublinear_and_side_information_helps():
    m = synthetic_matrix(1500, seed=5)
    cost = splitee(offload=5.0)
    runs = {}
    for name in ("splitee", "splitee-s"):
        p = build(name, {"alpha": "0.8", "alpha_rule": "fixed", "bonus": "ucb1"}, cost=cost, num_layers=6)
        runs[name] = evaluate(p, m, runs=2, seed=1)
    for r in runs.values():
        per_t = r["regret_per_t"]
        assert per_t["1000"] < per_t["100"]
        assert r["most_played_arm"] == r["best_fixed_arm"]
    assert runs["splitee-s"]["regret_curve"][999] < runs["splitee"]["regret_curve"][999]


def test_choose_alpha_keeps_validation_accuracy_within_tolerance():
    m = synthetic_matrix(600, seed=2)
    cal = choose_alpha(m, cost=splitee(), tolerance=0.01)
    assert cal["policy"] == "splitee" and 0.5 <= cal["alpha"] <= 1.0
    v = cal["validation"]
    assert v["accuracy"] >= v["final_exit_accuracy"] - 0.01
    p = build("splitee", {"calibration": cal}, cost=splitee(), num_layers=6)
    assert p.alpha == cal["alpha"]
    assert build("splitee", {"calibration": cal, "alpha": "0.7"}, cost=splitee(), num_layers=6).alpha == 0.7
