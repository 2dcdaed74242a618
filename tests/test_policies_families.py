"""DIMEE, DEEx, EENet, Random-exit, PABEE and the oracle against hand-computed cases from their papers."""

import json

import numpy as np
import pytest

from stream.costs import Trace, dimee, splitee
from stream.errors import ConfigError
from stream.matrix import ConfidenceMatrix

from policies import dimee as dimee_mod
from policies import eenet as eenet_mod
from policies.base import Continue, Exit, Observation, Offload, StateView
from policies.calibration import load_calibration, save_calibration
from policies.engine import run_remote
from policies.evaluate import MatrixRunner, evaluate, synthetic_matrix
from policies.registry import build


def matrix_from_conf(conf, labels=None, embeddings=None):
    conf = np.asarray(conf, dtype=np.float32)
    probs = np.stack([conf, 1 - conf], -1).astype(np.float32)
    return ConfidenceMatrix(probs=probs, labels=None if labels is None else np.asarray(labels, dtype=np.int64),
                            embeddings=None if embeddings is None else np.asarray(embeddings, dtype=np.float32))


# -- DIMEE ---------------------------------------------------------------------------------------------

def test_dimee_pools_follow_algorithm_1():
    conf = np.array([[0.9, 0.5, 0.5, 0.5], [0.5, 0.5, 0.95, 0.5], [0.5, 0.6, 0.7, 0.99]])
    pool, layer = dimee_mod.assign_pools(conf, 0.85, m=2, n=3)
    assert pool.tolist() == [0, 1, 2] and layer.tolist() == [1, 3, 4]


CAL = {"policy": "dimee", "alpha": 0.8, "m": 2, "n": 3,
       "centroids": {"easy": [0.0, 0.0], "moderate": [1.0, 0.0], "hard": [0.0, 1.0]},
       "counts": {"easy": 4, "moderate": 2, "hard": 1}}


def test_dimee_routes_by_nearest_centroid_and_runs_each_tier():
    p = build("dimee-fixed", {"calibration": CAL}, cost=dimee(), num_layers=4)
    easy = Observation("e", 4, embedding=np.array([0.1, 0.1]))
    assert p.decide(easy, StateView()) == Continue(1, exits="last")
    easy.layer, easy.probs = 1, {1: np.array([0.7, 0.3])}
    assert p.decide(easy, StateView()) == Continue(2, exits="last")
    easy.layer, easy.probs[2] = 2, np.array([0.6, 0.4])
    assert p.decide(easy, StateView()) == Exit()                         # layer m: the mobile infers anyway
    moderate = p.decide(Observation("m", 4, embedding=np.array([0.9, 0.1])), StateView())
    assert moderate == Offload("edge", run_to=3, threshold=0.8)
    assert p.decide(Observation("h", 4, embedding=np.array([0.1, 0.9])), StateView()) == Offload("cloud")
    # the edge runs the raw input from layer 1 and exits at the first exit reaching α, at most layer n
    rows = np.array([[[0.6, 0.4], [0.85, 0.15], [0.9, 0.1], [0.95, 0.05]]], dtype=np.float32)
    done = run_remote([0], [moderate], 4, MatrixRunner(rows, [0]))[0]
    assert (done.exit_layer, done.layers_run) == (2, 2)
    assert dimee().breakdown(Trace(tier="edge", edge_layers=2)).total == pytest.approx(2 * 1.0 + 2.5)
    with pytest.raises(ConfigError, match="needs the input embedding"):
        p.decide(Observation("x", 4), StateView())


def test_dimee_adaptive_centroid_is_the_running_mean_after_every_prefix():
    p = build("dimee-adaptive", {"calibration": CAL}, cost=dimee(), num_layers=4)
    xs = np.random.default_rng(0).normal(0, 0.1, (6, 2))
    view = StateView()
    for k, x in enumerate(xs, start=1):
        view.add(p.learn_pool("easy", x))
        expected = (np.zeros(2) * 4 + xs[:k].sum(0)) / (4 + k)
        assert np.allclose(p.centroids(view)["easy"], expected)
    assert np.allclose(p.centroids(view)["hard"], [0.0, 1.0])
    fixed = build("dimee-fixed", {"calibration": CAL}, cost=dimee(), num_layers=4)
    assert fixed.namespace() != p.namespace()


def test_dimee_needs_its_calibration():
    with pytest.raises(ConfigError, match="needs calibration=FILE"):
        build("dimee-fixed", {}, cost=dimee(), num_layers=4)
    with pytest.raises(ConfigError, match="made for 'splitee', expected dimee"):
        build("dimee-fixed", {"calibration": {"policy": "splitee", "alpha": 0.9}}, cost=dimee(), num_layers=4)


# -- DEEx ---------------------------------------------------------------------------------------------

def test_deex_decision_exit_then_p_tar():
    p = build("deex", {"p_d": "0.7", "p_tar": "0.9", "max_layer": "3", "at_max": "offload"}, cost=splitee(),
              num_layers=5)
    assert p.decide(Observation("a", 5), StateView()) == Continue(1, exits="last")
    obs = Observation("a", 5, layer=1, probs={1: np.array([0.95, 0.05])})
    assert p.decide(obs, StateView()) == Continue(2, exits="last")     # the decision exit never predicts
    obs.layer, obs.probs[2] = 2, np.array([0.8, 0.2])
    assert p.decide(obs, StateView()) == Continue(3, exits="last")
    obs.layer, obs.probs[3] = 3, np.array([0.85, 0.15])
    assert p.decide(obs, StateView()) == Offload("cloud")               # still unsure at max_layer
    obs.probs[3] = np.array([0.92, 0.08])
    assert p.decide(obs, StateView()) == Exit()
    paper = build("deex", {"max_layer": "3"}, cost=splitee(), num_layers=5)
    assert paper.decide(Observation("b", 5, layer=3, probs={3: np.array([0.5, 0.5])}), StateView()) == Exit()


# -- EENet --------------------------------------------------------------------------------------------

def test_eenet_thresholds_follow_algorithm_1():
    q_hat = np.array([[0.9, 0.2, 0.5], [0.3, 0.8, 0.4], [0.6, 0.7, 0.1], [0.2, 0.1, 0.3]])
    r_hat = np.array([[0.5, 0.25, 0.25]] * 4)                          # quotas 2, 1, 1
    assert eenet_mod.assign_thresholds(q_hat, r_hat).tolist() == [0.6, 0.8, -1e8]


def test_eenet_confidence_scores_eq5_to_7():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    a = eenet_mod.confidence_scores(probs)
    p = probs[-1]
    assert a[0] == pytest.approx(0.7)
    assert a[1] == pytest.approx(1 + (p * np.log(p)).sum() / np.log(3))
    assert a[2] == pytest.approx(2 / 3)                                  # class 1 won 2 of 3 exits


def test_eenet_calibrates_under_budget_and_round_trips_through_json(tmp_path):
    cal_matrix = synthetic_matrix(400, layers=4, seed=4)
    cal = eenet_mod.calibrate(cal_matrix, cost=splitee(), budget=0.6, epochs=150)
    path = save_calibration(cal, tmp_path / "eenet.json")
    assert json.loads(path.read_text())["policy"] == "eenet"             # plain JSON, no pickle
    p = build("eenet", {"calibration": str(path)}, cost=splitee(), num_layers=4)
    assert p.calibration["thresholds"] == cal["thresholds"]
    r = evaluate(p, cal_matrix, runs=1)
    assert r["cost"] == pytest.approx(cal["validation"]["cost"], abs=0.05)
    assert r["cost"] < 0.8 * r["final_exit_cost"]
    assert load_calibration(str(path), "eenet", accept=("eenet",))["budget"] == 0.6


# -- Random-exit, PABEE, oracle ------------------------------------------------------------------------

def test_random_exit_draws_the_split_per_sample_id():
    a = build("random-exit", {"alpha": "0.8", "seed": "3"}, cost=splitee(), num_layers=6)
    b = build("random-exit", {"alpha": "0.8", "seed": "3"}, cost=splitee(), num_layers=6)
    splits = [a.decide(Observation(f"s{i}", 6), StateView()).to_layer for i in range(600)]
    assert splits == [b.decide(Observation(f"s{i}", 6), StateView()).to_layer for i in range(600)]
    counts = np.bincount(splits, minlength=7)[1:]
    assert counts.min() > 70 and set(splits) == set(range(1, 7))
    low = Observation("x", 6, layer=2, probs={2: np.array([0.6, 0.4])})
    assert a.decide(low, StateView()) == Offload("cloud")


def test_patience_counts_consecutive_agreeing_exits():
    p = build("patience", {"patience": "2", "max_layer": "4"}, cost=splitee(), num_layers=6)
    flip = {1: np.array([0.6, 0.4]), 2: np.array([0.4, 0.6]), 3: np.array([0.3, 0.7])}
    assert p.decide(Observation("a", 6, layer=3, probs=flip), StateView()) == Continue(4, exits="last")
    flip[4] = np.array([0.2, 0.8])
    assert p.decide(Observation("a", 6, layer=4, probs=flip), StateView()) == Exit()
    flip[4] = np.array([0.8, 0.2])
    assert p.decide(Observation("a", 6, layer=4, probs=flip), StateView()) == Offload("cloud")


def test_oracle_is_the_upper_bound():
    m = synthetic_matrix(400, layers=4, seed=8)
    oracle = evaluate(build("oracle", cost=splitee(), num_layers=4), m)
    any_right = (m.probs.argmax(-1) == m.labels[:, None]).any(1).mean()
    assert oracle["accuracy"] == pytest.approx(any_right)
    for name in ("final-exit", "splitee", "static-maxprob"):
        other = evaluate(build(name, cost=splitee(), num_layers=4), m)
        assert other["accuracy"] <= oracle["accuracy"]
    with pytest.raises(ConfigError, match="offline evaluation only"):
        build("oracle", cost=splitee(), num_layers=4, live=True)


@pytest.mark.parametrize("name,settings", [("deex", {"at_max": "offload", "max_layer": 3}),
                                           ("static-maxprob", {"max_layer": 3}), ("static-entropy", {})])
def test_calibrated_thresholds_reproduce_their_validation_numbers_online(name, settings):
    """The vectorised simulation a calibration optimises is what the policy then does, sample by sample."""
    from policies.registry import registry

    m = synthetic_matrix(300, layers=4, seed=13)
    cal = registry()[name].calibrate(m, cost=splitee(offload=2.0), tolerance=0.02, **settings)
    assert cal["validation"]["accuracy"] >= cal["validation"]["final_exit_accuracy"] - 0.02
    r = evaluate(build(name, {"calibration": cal}, cost=splitee(offload=2.0), num_layers=4), m)
    assert r["accuracy"] == pytest.approx(cal["validation"]["accuracy"])
    assert r["cost"] == pytest.approx(cal["validation"]["cost"])
