"""`exitflow reproduce drift` on generated matrices: every stream and variant, ratios against plain splitee."""

import json

import numpy as np
import pytest

from stream.errors import ConfigError
from stream.matrix import ConfidenceMatrix

from policies import reproduce_drift

LAYERS, DIM = 6, 8


def segment(n, good, seed, shift, labels=True):
    """Exits below ``good`` unsure, from ``good`` on sure; embeddings around ``shift``."""
    rng = np.random.default_rng(seed)
    c = np.full((n, LAYERS), 0.55) + rng.uniform(-0.04, 0.04, (n, LAYERS))
    c[:, good - 1:] = rng.uniform(0.92, 0.99, (n, LAYERS - good + 1))
    y = rng.integers(0, 2, n)
    probs = np.empty((n, LAYERS, 2), np.float32)
    probs[np.arange(n), :, y] = c
    probs[np.arange(n), :, 1 - y] = 1 - c
    emb = (rng.normal(0, 0.3, (n, DIM)) + shift).astype(np.float32)
    return ConfidenceMatrix(probs=probs, labels=y.astype(np.int64) if labels else None, embeddings=emb,
                            ids=[f"x{i}" for i in range(n)])


@pytest.fixture(scope="module")
def result():
    mats = {"sst2": segment(600, 1, 0, 0.0), "imdb": segment(700, 1, 1, 0.2),
            "ag_news": segment(700, 4, 2, 1.5, labels=False)}
    return reproduce_drift.run(mats, mats["sst2"], streams=["sst2-imdb", "imdb", "imdb-agnews"], runs=2)


def test_every_stream_variant_and_segment_has_a_row(result):
    rows = result["rows"]
    assert {(r["stream"], r["policy"]) for r in rows} == {
        (s, v) for s in ("sst2-imdb", "imdb", "imdb-agnews") for v, _, _ in reproduce_drift.VARIANTS}
    plain = [r for r in rows if r["policy"] == "splitee"]
    assert all(r["ratio_first_500"] == pytest.approx(1.0) for r in plain if r["regret_first_500"] > 0)
    news = [r for r in rows if r["stream"] == "imdb-agnews" and r["segment"] == "ag_news"]
    assert {r["best_fixed_arm"] for r in news} == {4} and all(r["accuracy"] is None for r in news)


def test_the_hook_fires_at_the_news_boundary_and_helps_there(result):
    rows = {(r["stream"], r["policy"], r["segment"]): r for r in result["rows"]}
    hooked = rows[("imdb-agnews", "splitee+hook", "ag_news")]
    assert hooked["epochs"] >= 1 and hooked["detection_delay"] < 150
    assert rows[("imdb-agnews", "splitee+hook", "imdb")]["epochs"] == 0
    assert hooked["ratio_first_500"] < 1.0
    assert rows[("imdb-agnews", "splitee", "ag_news")]["epochs"] == 0


def test_targets_name_the_issues_two_numbers(result):
    t = result["targets"]
    assert t["boundary"]["stream"] == "sst2-imdb" and set(t["boundary"]["ratio_first_500"]) == {
        "splitee-drift", "splitee+hook", "splitee-drift+hook"}
    assert set(t["stationary"]["ratio_regret"]) == set(t["boundary"]["ratio_first_500"])
    text = reproduce_drift.table(result)
    assert "target <= 0.5" in text and "o = 2.5λ (o/(λL) = 0.417)" in text


def test_write_makes_json_table_and_one_png_per_stream(result, tmp_path):
    paths = reproduce_drift.write(result, tmp_path)
    assert sorted(p.name for p in paths if p.suffix == ".png") == [
        "drift-regret-imdb-agnews.png", "drift-regret-imdb.png", "drift-regret-sst2-imdb.png"]
    data = json.loads((tmp_path / "drift.json").read_text())
    assert data["targets"] == json.loads(json.dumps(result["targets"]))
    assert (tmp_path / "drift-regret-imdb.png").stat().st_size > 1000


def test_unknown_stream_and_unlabelled_calibration_are_refused():
    m = segment(50, 1, 0, 0.0)
    with pytest.raises(ConfigError, match=r"unknown stream\(s\) \['nope'\]"):
        reproduce_drift.run({"sst2": m}, m, streams=["nope"], runs=1)
    with pytest.raises(ConfigError, match="needs labels and embeddings"):
        reproduce_drift.run({"sst2": m}, segment(50, 1, 0, 0.0, labels=False), runs=1)
