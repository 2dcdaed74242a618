"""DEEx reproduction: the p_d sweep, the measured-time model, the crossing points, calibration, the writer."""

import json
import types

import numpy as np
import pytest

from stream.costs import splitee
from stream.errors import ConfigError
from stream.matrix import ConfidenceMatrix

from policies import reproduce_deex as rd
from policies.deex import Deex, offload_pays
from policies.evaluate import synthetic_matrix


def fake_timing(layers=6, hidden=4):
    """1 ms embeddings, 1 ms per layer, 0.1 ms per head at 10 tokens; three times that at 30."""
    return rd.Timing([10, 30], [1.0, 3.0], [[1.0] * layers, [3.0] * layers], [[0.1] * layers, [0.3] * layers], hidden)


def two_class(conf_correct):
    """probs [N, L, 2] with label 0 everywhere from (confidence, correct?) per sample and exit."""
    conf, ok = np.asarray(conf_correct[0], float), np.asarray(conf_correct[1], bool)
    p0 = np.where(ok, conf, 1 - conf)
    probs = np.stack([p0, 1 - p0], -1).astype(np.float32)
    return ConfidenceMatrix(probs=probs, labels=np.zeros(len(conf), np.int64))


def test_time_model_on_hand_computed_paths():
    t = fake_timing(layers=4)
    link = rd.Link(rtt_ms=5.0, mbps=0.128, cloud_speedup=2.0)     # 20 tokens × 4 × 2 B = 1280 bit → 10 ms
    times = rd.sample_times(t, [20, 20], stop=[2, 1], offload=[False, True], link=link)
    # kept to exit 2: 2 + 2·(2 + 0.2); offloaded after 1: 2 + 2.2 + (5 + 10) + (3·2 + 0.2) / 2
    assert times.tolist() == pytest.approx([6.4, 22.3])
    assert rd.sample_times(t, [20], [1], [True], rd.LINKS["paper"]).tolist() == pytest.approx([4.2 + 6.2])
    # offload after 1 vs staying to 3: 2·2.2 − (3·2 + 0.2) / 2 = 1.3 ms for the link; 1280 bit in 0.8 ms
    assert rd.break_even(t, [20], link, 4, 3)["mbps_needed"] is None                  # RTT 5 ms > 1.3 ms
    fast = rd.break_even(t, [20], rd.Link(rtt_ms=0.5, cloud_speedup=2.0), 4, 3)
    assert (fast["budget_ms"], fast["mbps_needed"]) == pytest.approx((1.3, 1.6))
    assert rd.break_even(t, [20], rd.LINKS["paper"], 4, 3)["budget_ms"] < 0
    cost = rd.measured_cost(t, [20, 20], link)
    assert (cost.device_layer, cost.device_exit, cost.cloud_layer, cost.offload_cloud, cost.cloud_fee) == \
        pytest.approx((2.0, 0.2, 1.0, 15.0, 0.1))


def test_offload_pays_only_where_it_is_cheaper_than_staying():
    assert offload_pays(splitee(num_layers=6), 6, 5) == 4        # 3.5λ < 4λ (exit 4)
    assert offload_pays(splitee(), 6, 5) is None                  # λ + 5λ = 6λ: never below a device path
    assert offload_pays(splitee(num_layers=6), 6, 2) is None
    t = fake_timing()
    assert offload_pays(rd.measured_cost(t, [20], rd.LINKS["paper"]), 6, 5) is None   # the backbone is deeper
    fast = rd.Link(rtt_ms=0.5, mbps=1e4, cloud_speedup=100.0)
    assert offload_pays(rd.measured_cost(t, [20], fast), 6, 5) == 2


def test_calibration_never_offloads_at_5_lambda_but_does_at_2_5():
    # A: confident and right from exit 2; B: unsure, wrong at exits 2-4, right at 5 and 6
    a = ([0.95] * 6, [True] * 6)
    b = ([0.6] * 6, [True, False, False, False, True, True])
    m = two_class(tuple(np.array([x] * 50 + [y] * 50) for x, y in zip(a, b)))
    literal = Deex.calibrate(m, cost=splitee(), max_layer=5)
    scaled = Deex.calibrate(m, cost=splitee(num_layers=6), max_layer=5)
    assert (literal["p_d"], literal["validation"]["offloaded"], literal["offload_pays_from"]) == (0.5, 0.0, None)
    assert literal["note"] and literal["validation"]["cost"] == pytest.approx(3.5)     # (2 + 5) / 2
    assert (scaled["p_d"], scaled["validation"]["offloaded"], scaled["offload_pays_from"]) == (0.625, 0.5, 4)
    assert scaled["validation"]["cost"] == pytest.approx(2.75)                         # (2 + 3.5) / 2


@pytest.mark.parametrize("shape", sorted(rd.SHAPES))
def test_sweep_shares_sum_to_one_and_move_with_p_d(shape):
    m = synthetic_matrix(400, layers=6, seed=5)
    grid = rd.p_grid(2)
    sw = rd.sweep(m, fake_timing(), np.full(400, 20), grid=grid, **rd.SHAPES[shape])
    shares = np.array(list(sw["shares"].values()))
    assert np.allclose(shares.sum(0), 1.0)
    cloud = shares[0]
    assert cloud[0] == 0.0 and cloud[-1] == 1.0 and (np.diff(cloud) >= 0).all()
    assert (np.diff(shares[1:].sum(0)) <= 1e-12).all()
    assert (np.diff(sw["time_ms"]["paper"]) >= -1e-9).all()      # the backbone is the slowest path
    assert sw["accuracy"][-1] == pytest.approx(m.accuracy()[-1])
    assert rd.check_eval_loop(m, sw) == pytest.approx(0.0, abs=1e-12)


def test_p_grid_holds_the_papers_values():
    grid = rd.p_grid(2).tolist()
    assert grid[0] == 0.5 and grid[-1] == 1.0 and {0.55, 0.75, 0.85, 0.995} <= set(grid)
    assert rd.p_grid(10, fine=False)[0] == 0.1 and 0.2 in rd.p_grid(10).tolist()


def crossing_matrix():
    """Four groups of 25 with exit-1 confidence 0.555/0.655/0.755/0.955 (off the float32 grid); exit 2 right
    5/15/20/24 times, the backbone (exit 3) right 25/25/20/20 times (accuracy 0.9)."""
    conf, ok = [], []
    for c1, right2, right3 in ((0.555, 5, 25), (0.655, 15, 25), (0.755, 20, 20), (0.955, 24, 20)):
        for i in range(25):
            conf.append([c1, 0.9, 0.8])
            ok.append([True, i < right2, i < right3])
    return two_class((np.array(conf), np.array(ok)))


def test_crossing_points_on_a_constructed_matrix():
    m = crossing_matrix()
    sw = rd.sweep(m, fake_timing(layers=3), np.full(100, 10), grid=rd.p_grid(2), max_layer=2, p_tar=0.9)
    c = rd.crossings(sw)
    assert c["backbone_accuracy"] == pytest.approx(0.9) and c["offload_begins"] == 0.56
    # p_d 0.66: device 44/50 < cloud 50/50 but overall 94% ≥ 90%; p_d 0.76: device 24/25 ≥ cloud 70/75
    assert c["p_match"]["p_d"] == 0.66 and c["p_match"]["accuracy"] == pytest.approx(0.94)
    assert c["p_cross"]["p_d"] == 0.76 and c["crossed"]
    assert c["p_cross"]["early_share"] == pytest.approx(0.25)
    assert (c["p_cross"]["accuracy_device"], c["p_cross"]["accuracy_cloud"]) == pytest.approx((0.96, 70 / 75))
    # paper link: kept = 1 + 2·1.1 = 3.2 ms, offloaded = 1 + 1.1 + 2 + 0.1 = 4.2 ms
    assert c["p_cross"]["time_saving"]["paper"] == pytest.approx(1 - (0.25 * 3.2 + 0.75 * 4.2) / 4.2)
    assert c["all_early"]["accuracy"] == pytest.approx(0.64)
    with pytest.raises(ConfigError, match="end at 1"):
        rd.crossings({**sw, "p_d": sw["p_d"][:-1] + [0.999]})


def test_run_table_and_writer_on_generated_matrices(tmp_path):
    mats = {"sst2": synthetic_matrix(300, layers=6, seed=1), "imdb": synthetic_matrix(200, layers=6, seed=2)}
    tokens = {"sst2": np.full(300, 12), "imdb": np.full(200, 28)}
    logs = []
    result = rd.run(mats, fake_timing(), tokens, calibration=(mats["sst2"], tokens["sst2"]), fine=False,
                    log=logs.append)
    assert set(result["sweeps"]) == {"sst2", "imdb"} and set(result["sweeps"]["imdb"]) == set(rd.SHAPES)
    models = {r["cost_model"] for r in result["calibration"]}
    assert models == {"o=5λ", "o=2.5λ", "ms, paper link", "ms, network link"}
    assert any("imdb: deep shape" in line for line in logs)
    paths = rd.write(result, tmp_path)
    assert [p.name for p in paths] == ["deex.json", "deex_table.txt", "deex_pd.png"]
    data = json.loads(paths[0].read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert data["links"]["paper"]["mbps"] is None and data["sweeps"]["sst2"]["paper"]["p_d"][-1] == 1.0
    text = paths[1].read_text()
    assert "sst2 · paper shape" in text and "imdb · deep shape" in text and " 1.000 " in text
    assert "paper binary" in text and "0.850" in text and "26.9" in text   # the paper's p_cross and share, as data
    assert "calibration on SST-2 dev" in text and "paper link never" in text
    assert paths[2].stat().st_size > 10_000


def test_main_rejects_unknown_datasets():
    args = types.SimpleNamespace(datasets="sst2,qqp")
    with pytest.raises(ConfigError, match="unknown dataset"):
        rd.main(args, print)
