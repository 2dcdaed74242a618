"""`exitflow eval --in-order`: segments kept in order, dynamic regret, per-segment arms, boundary regret."""

import json

import numpy as np
import pytest

from arm_segments import arm_segment
from stream.cli import main
from stream.costs import splitee
from stream.errors import ConfigError
from stream.matrix import ConfidenceMatrix

from policies.evaluate import concat_segments, evaluate, evaluate_ordered, stream, synthetic_matrix
from policies.registry import build

LAYERS = 4


def segment(n, good, seed):
    return arm_segment(n, good, seed, layers=LAYERS)


@pytest.fixture(scope="module")
def shifted():
    """Arm 1 best for 600 samples, then arm 3 for 900."""
    return concat_segments([("A", segment(600, 1, 0)), ("B", segment(900, 3, 1))])


def settings(**kw):
    return {"alpha": "0.8", "alpha_rule": "fixed", **kw}


def test_concat_keeps_order_and_makes_ids_unique(shifted):
    m, bounds = shifted
    assert bounds == [("A", 0, 600), ("B", 600, 1500)]
    assert len(set(m.ids)) == 1500 and m.ids[600] == "B:x0"
    _, again = concat_segments([("A", segment(10, 1, 0)), ("A", segment(10, 1, 0))])
    assert [b[0] for b in again] == ["A", "A#2"]


def test_segments_must_come_from_one_model():
    with pytest.raises(ConfigError, match=r"a\.npz has 4 exits and 2 classes but b\.npz has 6 and 2"):
        concat_segments([("a.npz", segment(5, 1, 0)), ("b.npz", synthetic_matrix(5, layers=6))])


def test_each_segment_is_reshuffled_within_itself(shifted):
    m, bounds = shifted
    p = build("splitee", settings(), cost=splitee(offload=5.0), num_layers=LAYERS)
    rng = np.random.default_rng(0)
    order = np.concatenate([s + rng.permutation(e - s) for _, s, e in bounds])
    res = stream(p, m, order)
    assert set(res.rows[:600]) == set(range(600)) and set(res.rows[600:]) == set(range(600, 1500))
    a = evaluate_ordered(p, m, bounds, runs=2, seed=1)
    b = evaluate_ordered(p, m, bounds, runs=2, seed=1)
    c = evaluate_ordered(p, m, bounds, runs=2, seed=2)
    assert a["regret_curve"] == b["regret_curve"] != c["regret_curve"]


def test_dynamic_regret_is_against_each_segments_best_arm(shifted):
    m, bounds = shifted
    p = build("splitee", settings(), cost=splitee(offload=5.0), num_layers=LAYERS)
    r = evaluate_ordered(p, m, bounds, runs=3, seed=0)
    a, b = r["segments"]
    assert (a["name"], a["best_fixed_arm"], b["name"], b["best_fixed_arm"]) == ("A", 1, "B", 3)
    assert a["regret"] + b["regret"] == pytest.approx(r["regret"])
    assert r["boundaries"] == [600] and r["regret_reference"] == "best fixed arm of each segment"
    # the stream's single best arm earns less than the best arm of each segment
    alone = evaluate(p, m.subset(np.arange(600)), runs=1, seed=0)
    assert alone["best_fixed_arm"] == 1 and r["static_regret"] <= r["regret"]   # each segment's best >= one arm


def test_boundary_regret_of_plain_and_drift_aware_splitee_differs(shifted):
    m, bounds = shifted
    cost = splitee(offload=5.0)
    plain = evaluate_ordered(build("splitee", settings(), cost=cost, num_layers=LAYERS), m, bounds, runs=3)
    drift = evaluate_ordered(build("splitee-drift", settings(window="200", bucket="20"), cost=cost,
                                   num_layers=LAYERS), m, bounds, runs=3)
    after_plain, after_drift = plain["segments"][1]["regret_first_500"], drift["segments"][1]["regret_first_500"]
    assert after_drift < 0.6 * after_plain
    assert drift["segments"][1]["most_played_arm"] == 3


def test_exitflow_eval_in_order_cli(tmp_path, capsys):
    segment(300, 1, 0).save(tmp_path / "a.npz")
    segment(400, 3, 1).save(tmp_path / "b.npz")
    out = tmp_path / "ordered.json"
    args = ["eval", "--matrix", str(tmp_path / "a.npz"), "--matrix", str(tmp_path / "b.npz"), "--in-order",
            "--policy", "splitee,splitee-drift,final-exit", "--set", "alpha=0.8", "--set", "alpha_rule=fixed",
            "--offload-cost", "5", "--runs", "2", "--json", str(out), "--plot", str(tmp_path / "plots")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "in order: a (300) → b (400)" in text and "first 500" in text
    data = json.loads(out.read_text())
    assert data["in_order"] is True and data["matrix"] == [str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]
    for report in data["reports"]:
        names = [s["name"] for s in report["segments"]]
        assert names == ["a", "b"]
        for s in report["segments"]:
            assert {"name", "best_fixed_arm", "most_played_arm", "regret_first_500"} <= set(s)
    assert [s["best_fixed_arm"] for s in data["reports"][0]["segments"]] == [1, 3]
    assert (tmp_path / "plots" / "regret.png").stat().st_size > 0
    synthetic_matrix(50, layers=6).save(tmp_path / "c.npz")
    assert main(["eval", "--matrix", str(tmp_path / "a.npz"), "--matrix", str(tmp_path / "c.npz"), "--in-order",
                 "--policy", "splitee", "--runs", "1", "--set", "alpha=0.8"]) == 1
    err = capsys.readouterr().err
    assert "a.npz has 4 exits" in err and "c.npz has 6" in err
    assert main(["eval", "--matrix", str(tmp_path / "a.npz"), "--matrix", str(tmp_path / "b.npz"),
                 "--policy", "splitee", "--runs", "1"]) == 1
    assert "need --in-order" in capsys.readouterr().err
