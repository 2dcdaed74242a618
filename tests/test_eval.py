"""The offline evaluator: metrics, regret, batching and delayed feedback, the comparison table, `exitflow eval`."""

import json

import numpy as np
import pytest

from stream.cli import main
from stream.costs import splitee
from stream.errors import ConfigError

from policies.compare import Calibrator, compare, expand_specs, table
from policies.evaluate import evaluate, regret_curve, stream, synthetic_matrix
from policies.registry import build


@pytest.fixture(scope="module")
def matrix():
    return synthetic_matrix(500, layers=4, seed=7)


def test_cloud_only_and_final_exit_costs(matrix):
    cost = splitee(offload=3.0)
    cloud = evaluate(build("cloud-only", cost=cost, num_layers=4), matrix)
    assert cloud["cost"] == 3.0 and cloud["offload_rate"] == 1.0
    assert cloud["tiers"] == {"device": 0, "edge": 0, "cloud": 500}
    assert cloud["exit_layers"]["4"] == 500
    assert cloud["accuracy"] == pytest.approx(cloud["final_exit_accuracy"])
    assert cloud["cost_ratio"] == pytest.approx(3.0 / 4.0)


def test_splitee_cost_matches_its_arms(matrix):
    p = build("splitee", {"alpha": "0.85"}, cost=splitee(offload=5.0), num_layers=4)
    res = stream(p, matrix, np.arange(500))
    lam1, lam2 = 6 / 7, 1 / 7
    device = res.tier == 0
    assert np.allclose(res.cost[device].sum(1), lam1 * res.arm[device] + lam2)
    assert np.allclose(res.cost[~device].sum(1), lam1 * res.arm[~device] + lam2 + 5.0)
    assert np.all(res.exit_layer[~device] == 4)
    assert np.all(res.exit_layer[device] == res.arm[device])


def test_pseudo_regret_against_the_best_fixed_arm(matrix):
    p = build("splitee", {"alpha": "0.85"}, cost=splitee(), num_layers=4)
    res = stream(p, matrix, np.arange(500))
    rewards = p.arm_rewards(matrix.probs.astype(np.float64))
    curve = regret_curve(res, rewards, True, p.cost.mu)
    means = rewards.mean(0)
    assert curve[-1] == pytest.approx(sum(means.max() - means[a - 1] for a in res.arm))
    report = evaluate(p, matrix, runs=2, seed=3)
    assert report["best_fixed_arm"] == int(np.argmax(means)) + 1
    assert report["regret_kind"] == "pseudo" and len(report["regret_curve"]) == 500


def test_runs_reshuffle_and_the_seed_reproduces(matrix):
    p = build("splitee", {"alpha": "0.85"}, cost=splitee(), num_layers=4)
    a = evaluate(p, matrix, runs=3, seed=1)
    b = evaluate(p, matrix, runs=3, seed=1)
    c = evaluate(p, matrix, runs=3, seed=2)
    assert a["regret_curve"] == b["regret_curve"] != c["regret_curve"]


@pytest.mark.parametrize("batch_size,delay", [(1, 0), (64, 0), (8, 5)])
def test_batching_and_delay_change_timing_not_the_count(matrix, batch_size, delay):
    p = build("splitee-s", {"alpha": "0.85"}, cost=splitee(), num_layers=4)
    r = evaluate(p, matrix, runs=1, batch_size=batch_size, feedback_delay=delay)
    assert sum(r["tiers"].values()) == 500
    assert r["most_played_arm"] in range(1, 5)


def test_compare_all_calibrates_and_skips_what_it_cannot_build(matrix):
    cal = synthetic_matrix(200, layers=4, seed=8)
    logs = []
    reports = compare(expand_specs("all"), matrix, cost=splitee(), calibration=cal, runs=1,
                      shared={"epochs": "60"}, log=logs.append)
    names = [r["spec"] for r in reports]
    assert "oracle" in names and "dimee-adaptive" in names and "splitee-s[side_info=oracle]" in names
    splitee_alpha = next(r for r in reports if r["policy"] == "splitee")["params"]["alpha"]
    assert next(r for r in reports if r["policy"] == "random-exit")["params"]["alpha"] == splitee_alpha
    text = table(reports)
    assert text.splitlines()[0].startswith("policy") and "final exit: accuracy" in text
    without = compare(["splitee", "dimee-fixed"], matrix, cost=splitee(), runs=1, log=logs.append)
    assert [r["spec"] for r in without] == ["splitee"]
    assert any("skipping dimee-fixed" in line and "calibration" in line for line in logs)


def test_a_single_policy_is_strict_about_its_settings(matrix):
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['alpah'\]"):
        compare(["splitee"], matrix, cost=splitee(), shared={"alpah": "0.9"})
    with pytest.raises(ConfigError, match="no policy takes"):
        compare(["splitee", "deex"], matrix, cost=splitee(), shared={"nonsense": "1"})
    with pytest.raises(ConfigError, match="unknown policy 'splitter'"):
        Calibrator().build("splitter", {}, splitee(), 4, 2)


def test_exitflow_eval_cli(tmp_path, capsys):
    synthetic_matrix(300, layers=4, seed=9).save(tmp_path / "m.npz")
    synthetic_matrix(200, layers=4, seed=10).save(tmp_path / "cal.npz")
    out = tmp_path / "eval.json"
    code = main(["eval", "--matrix", str(tmp_path / "m.npz"), "--calibration", str(tmp_path / "cal.npz"),
                 "--policy", "final-exit,splitee,splitee-s,oracle", "--runs", "2", "--offload-cost", "4",
                 "--json", str(out), "--plot", str(tmp_path / "plots")])
    assert code == 0
    text = capsys.readouterr().out
    assert "splitee-s" in text and "o = 4λ" in text
    data = json.loads(out.read_text())
    assert [r["spec"] for r in data["reports"]] == ["final-exit", "splitee", "splitee-s", "oracle"]
    sweep = data["offload_sweep"]       # the paper's o = 1..5λ (12 layers), carried to 4 layers by o·4/12
    assert sweep["offload_paper"] == [1, 2, 3, 4, 5] and sweep["offload"] == pytest.approx([o / 3 for o in range(1, 6)])
    assert data["reports"][0]["offload_cost"] == 4 and data["reports"][0]["offload_ratio"] == pytest.approx(1.0)
    assert (tmp_path / "plots" / "regret.png").stat().st_size > 0
    assert (tmp_path / "plots" / "offload_sweep.png").stat().st_size > 0
    assert main(["eval", "--matrix", str(tmp_path / "m.npz"), "--policy", "dimee-fixed"]) == 1
    assert "needs calibration=FILE" in capsys.readouterr().err
