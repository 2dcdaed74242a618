"""DIMEE under its paper's protocol: Eq. 2 with the conversion factor μ, the α grid, pools, the μ search,
the probe router, the 80/10/10 splitter and the Table I builder (generated matrices, hand-computed cases)."""

import numpy as np
import pytest

from stream import datasets
from stream.config import data_dir
from stream.costs import dimee, preset
from stream.errors import ConfigError, DataError
from stream.matrix import ConfidenceMatrix

from policies import dimee as dm
from policies.base import Continue, Exit, Observation, Offload, StateView
from policies.evaluate import synthetic_matrix
from policies.registry import build


def two_class(conf, labels=None, embeddings=None):
    conf = np.asarray(conf, dtype=np.float32)
    return ConfidenceMatrix(probs=np.stack([conf, 1 - conf], -1).astype(np.float32),
                            labels=None if labels is None else np.asarray(labels, dtype=np.int64),
                            embeddings=None if embeddings is None else np.asarray(embeddings, dtype=np.float32))


def test_eq2_subtracts_mu_times_the_tier_cost_from_the_served_confidence():
    # 3 layers, m = 1, n = 2, 12-layer dimee costs: λ_m = 1.5, λ_e = 1, o_e = 2.5, o_c = 3, γ = 12
    cost = dimee()
    conf = np.array([[0.95, 0.97, 0.99], [0.6, 0.9, 0.95], [0.6, 0.7, 0.8]])
    pool, layer = dm.assign_pools(conf, 0.85, m=1, n=2)
    assert pool.tolist() == [0, 1, 2] and layer.tolist() == [1, 2, 3]
    assert dm.tier_costs(pool, layer, cost, 3).tolist() == [1.5, 2.5 + 2 * 1.0, 3.0 + 12.0]
    for mu, expected in ((0.1, [0.95 - 0.15, 0.9 - 0.45, 0.8 - 1.5]), (0.01, [0.95 - 0.015, 0.9 - 0.045, 0.8 - 0.15]),
                         (1.0, [0.95 - 1.5, 0.9 - 4.5, 0.8 - 15.0])):
        assert dm.pool_rewards(conf, pool, layer, cost, mu) == pytest.approx(expected)
    # Eq. 2 as printed (μ = 1): exiting at mobile layer 1 beats every other outcome for every sample
    easy = np.zeros(3, dtype=int)
    assert (dm.pool_rewards(conf, easy, np.ones(3, dtype=int), cost, 1.0) > dm.pool_rewards(conf, pool, layer, cost, 1.0)).sum() == 2


def test_routed_samples_resume_after_the_mobile_layers_they_ran():
    cost = dimee(num_layers=6)                  # o_e = 1.25, o_c = 1.5, γ = 6
    pool, layer = np.array([0, 1, 2]), np.array([2, 3, 6])
    assert dm.tier_costs(pool, layer, cost, 6).tolist() == [3.0, 1.25 + 3.0, 1.5 + 6.0]
    assert dm.tier_costs(pool, layer, cost, 6, first=1).tolist() == [3.0, 1.5 + 1.25 + 2.0, 1.5 + 1.5 + 6.0]
    conf = np.array([[0.5, 0.9, 0.99, 0.99, 0.99, 0.99]] * 3)
    assert dm.served_layer(conf, np.array([0, 1, 2]), 0.95, 2, 3).tolist() == [2, 3, 6]


def test_best_alpha_maximises_eq3_and_keeps_every_pool_populated():
    conf = np.array([[0.95, 0.97, 0.99]] * 4 + [[0.6, 0.9, 0.95]] * 4 + [[0.6, 0.7, 0.8]] * 4)
    grid = np.array([0.5, 0.65, 0.85, 0.96])
    # α = 0.5 and 0.65 put every sample in the easy pool, 0.96 empties it: only α = 0.85 keeps three pools
    alpha, expected = dm.best_alpha(conf, grid, 1, 2, dimee(), 0.01)
    assert alpha == 0.85 and list(expected) == [0.85]
    assert expected[0.85] == pytest.approx(np.mean([0.935] * 4 + [0.855] * 4 + [0.65] * 4))
    with pytest.raises(ConfigError, match="no α .* every pool .*easy at 1 of 2, moderate at 1 of 2, hard at 1 of 2"):
        dm.best_alpha(conf[[0, 1, 2, 3, 8, 9, 10, 11]], np.array([0.5, 0.96]), 1, 2, dimee(), 0.01)


def test_alpha_grid_is_the_paper_grid_refined_where_the_pools_jump():
    rng = np.random.default_rng(0)
    conf = np.sort(rng.uniform(0.90, 0.96, (500, 3)), axis=1)   # every pool change happens inside one grid step
    paper = np.linspace(0.5, 1.0, 10)
    grid = dm.alpha_grid(conf, 2, 1, 2)
    assert set(np.round(paper, 9)) <= set(np.round(grid, 9)) and len(grid) > 20
    shares = np.array([dm.pool_shares(conf, a, 1, 2) for a in grid])
    coarse = np.array([dm.pool_shares(conf, a, 1, 2) for a in paper])
    assert np.abs(np.diff(shares, axis=0)).max() < np.abs(np.diff(coarse, axis=0)).max()


def test_mu_is_chosen_on_validation_as_the_cheapest_within_tolerance():
    val = synthetic_matrix(800, layers=6, seed=3)
    cost = preset("dimee", num_layers=6)
    cal = dm.calibrate(val, cost=cost, tolerance=0.06)
    search = cal["mu_search"]
    final = cal["validation"]["final_exit_accuracy"]
    ok = [r for r in search if r["accuracy"] >= final - 0.06]
    assert 0 < len(ok) < len(search) and cal["validation"]["cost"] == min(r["cost"] for r in ok)
    assert cal["mu"] in [r["mu"] for r in ok] and min(cal["counts"].values()) >= 8
    assert "route_all" not in cal
    strict = dm.calibrate(val, cost=cost, tolerance=0.0)        # nothing within: the cloud for everyone
    assert strict["route_all"] == "hard" and strict["validation"]["accuracy"] == final
    assert "route_all" not in dm.calibrate(val, cost=cost, mu=1.0, tolerance=0.0)
    assert strict["validation"]["cost_ratio_vs_cloud"] == 1.0
    p = build("dimee-adaptive", {"calibration": strict}, cost=cost, num_layers=6)
    assert p.decide(Observation("s", 6, embedding=val.embeddings[0]), StateView()) == Offload("cloud")
    fixed = dm.calibrate(val, cost=cost, mu=0.1)
    assert [r["mu"] for r in fixed["mu_search"]] == [0.1]


def test_probe_learns_pools_the_centroids_cannot_separate():
    # the pool shows in one small coordinate; five loud coordinates of noise drown it for Euclidean centroids
    rng = np.random.default_rng(1)
    n = 900
    pool = rng.integers(0, 3, n)
    emb = np.concatenate([pool[:, None] + rng.normal(0, 0.1, (n, 1)), rng.normal(0, 10, (n, 5))], axis=1)
    rows = np.array([[0.99] * 6, [0.6, 0.7, 0.98, 0.99, 0.99, 0.99], [0.6, 0.65, 0.7, 0.75, 0.8, 0.99]])
    m = two_class(rows[pool], labels=np.zeros(n), embeddings=emb)
    cost = preset("dimee", num_layers=6)
    centroid = dm.calibrate(m, cost=cost, mu=0.01)
    probe = dm.calibrate_probe(m, cost=cost, features="embedding", mu=0.01)
    agree = lambda c: np.trace(np.asarray(c["confusion"])) / n  # noqa: E731
    assert agree(probe) > 0.9 > 0.6 > agree(centroid)
    assert probe["validation"]["cost"] < centroid["validation"]["cost"]
    p = build("dimee-probe", {"calibration": probe}, cost=cost, num_layers=6)
    assert p.decide(Observation("h", 6, embedding=np.array([2.0, 9, -9, 0, 5, 1])), StateView()) == Offload("cloud")
    assert p.decide(Observation("e", 6, embedding=np.array([0.0, -9, 9, 3, 0, 0])), StateView()) == Continue(1, exits="last")


def test_probe_with_exit1_runs_layer_one_first_and_exits_there_when_confident():
    val = synthetic_matrix(600, layers=6, seed=4)
    cal = dm.calibrate_probe(val, cost=preset("dimee", num_layers=6), mu=0.02, tolerance=0.3)
    assert cal["features"] == "exit1" and len(cal["probe"]["coef"]) == 3
    p = build("dimee-probe", {"calibration": cal}, cost=preset("dimee", num_layers=6), num_layers=6)
    obs = Observation("s", 6, embedding=val.embeddings[0])
    assert p.decide(obs, StateView()) == Continue(1, exits="last")
    obs.layer, obs.probs = 1, {1: np.array([1.0, 0.0])}
    assert p.decide(obs, StateView()) == Exit()
    obs.probs = {1: np.array([0.5, 0.5])}
    action = p.decide(obs, StateView())
    assert action in (Continue(2, exits="last"), Offload("edge", run_to=p.n, threshold=p.alpha), Offload("cloud"))
    with pytest.raises(ConfigError, match="has no probe"):
        build("dimee-probe", {"calibration": dm.calibrate(val, cost=preset("dimee", num_layers=6), mu=0.02)},
              cost=preset("dimee", num_layers=6), num_layers=6)


def test_random_router_is_uniform_and_the_same_for_a_sample_everywhere():
    cal = {"policy": "dimee", "alpha": 0.8, "m": 2, "n": 3, "centroids": {"easy": [0.0], "moderate": [1.0], "hard": [2.0]},
           "counts": {"easy": 1, "moderate": 1, "hard": 1}}
    p = build("dimee-fixed", {"calibration": cal, "router": "random"}, cost=dimee(num_layers=6), num_layers=6)
    actions = [p.decide(Observation(f"s{i}", 6, embedding=np.zeros(1)), StateView()) for i in range(600)]
    tiers = [a.tier if isinstance(a, Offload) else "mobile" for a in actions]
    assert all(150 < tiers.count(t) < 250 for t in ("mobile", "edge", "cloud"))
    assert p.decide(Observation("s7", 6, embedding=np.zeros(1)), StateView()) == actions[7]
    with pytest.raises(ConfigError, match="router must be one of"):
        build("dimee-adaptive", {"calibration": cal, "router": "random"}, cost=dimee(num_layers=6), num_layers=6)


def test_default_split_carries_m_and_n_over_from_12_layers():
    assert dm.default_split(12) == (3, 6) and dm.default_split(6) == (2, 3) and dm.default_split(24) == (6, 12)


def test_dimee_preset_states_gamma_and_orders_the_tiers():
    cost = preset("dimee", num_layers=6)
    assert (cost.offload_edge, cost.offload_cloud, cost.cloud_fee) == (1.25, 1.5, 6.0)
    most_edge = dm.tier_costs(np.array([1]), np.array([3]), cost, 6)[0]
    cloud = dm.tier_costs(np.array([2]), np.array([6]), cost, 6)[0]
    assert 1.5 * 2 < most_edge < cloud


# -- the in-domain protocol -------------------------------------------------------------------------

def test_split_80_10_10_is_deterministic_disjoint_and_complete():
    parts = datasets.split_indices(1003, seed=7)
    assert [len(p) for p in parts] == [803, 100, 100]
    assert sorted(np.concatenate(parts).tolist()) == list(range(1003))
    again = datasets.split_indices(1003, seed=7)
    assert all((a == b).all() for a, b in zip(parts, again))
    other = datasets.split_indices(1003, seed=8)
    assert not (parts[1] == other[1]).all()
    with pytest.raises(DataError, match="sum to 1"):
        datasets.split_indices(10, fractions=(0.8, 0.1))


def test_three_way_split_keeps_every_sample_once_and_names_its_share():
    ds = datasets.Dataset("toy", "train", [f"toy/train/{i}" for i in range(50)], [f"t{i}" for i in range(50)], None,
                          np.arange(50) % 2, ("a", "b"), "toy.tsv")
    parts = datasets.three_way(ds, seed=1)
    assert [len(p) for p in parts.values()] == [40, 5, 5] and parts["val"].split == "val-s1"
    assert sorted(sum((p.texts for p in parts.values()), [])) == sorted(ds.texts)
    with pytest.raises(DataError, match="too few"):
        datasets.three_way(ds.subset([0, 1]), seed=1)


@pytest.mark.skipif(not (data_dir() / "MRPC" / "train.tsv").is_file(),
                    reason="splits MRPC from the shared datasets folder, not found (set EXITFLOW_DATA)")
def test_three_way_split_of_a_labelled_task_has_no_shared_sample():
    parts = datasets.three_way(datasets.labelled("mrpc"), seed=0)
    ids = [set(p.ids) for p in parts.values()]
    assert [len(p) for p in parts.values()] == [3262, 407, 407]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert {i.split("/")[1] for i in ids[0]} == {"train", "dev"}      # both labelled files are pooled
    assert parts["val"].ids == datasets.three_way(datasets.labelled("mrpc"), seed=0)["val"].ids


# -- exitflow reproduce dimee -----------------------------------------------------------------------

def test_reproduce_dimee_builds_table_1_beside_the_paper(tmp_path):
    from policies import reproduce_dimee as rd

    whole = synthetic_matrix(1200, layers=6, seed=5)
    test, val = whole.subset(np.arange(600)), whole.subset(np.arange(600, 1200))
    result = rd.run({"sst2": (test, val)}, runs=2, sweep=False)
    rows = {r["policy"]: r for r in result["rows"]}
    assert {"BERT", "Random", "Early-Exit", "Ours-F", "Ours-D", "probe: embedding + exit 1",
            "pool oracle (perfect routing)", "hindsight oracle (labels)"} <= set(rows)
    assert rows["BERT"]["cost_ratio_vs_cloud"] == pytest.approx(1.0) and rows["BERT"]["paper_acc"] == 93.5
    assert rows["Ours-D"]["paper_delta_cost"] == -47
    assert rows["hindsight oracle (labels)"]["accuracy"] >= rows["BERT"]["accuracy"]
    for r in result["rows"]:
        assert {"dataset", "policy", "accuracy", "full_model_accuracy", "cost_ratio_vs_cloud", "paper_acc",
                "paper_delta_cost"} <= set(r)
    assert np.asarray(result["confusion"]["sst2"]["centroid"]["test"]).sum() == 600
    paths = rd.write(result, tmp_path)
    assert (tmp_path / "dimee_table1.png").stat().st_size > 0 and "Ours-D" in (tmp_path / "dimee_table1.txt").read_text()
    assert len(paths) == 3
