"""`exitflow reproduce drift` on generated matrices: every stream and variant, ratios against plain splitee."""

import json

import numpy as np
import pytest

from arm_segments import arm_segment
from stream.errors import ConfigError
from stream.matrix import ConfidenceMatrix

from policies import reproduce_drift

LAYERS, DIM = 6, 8


def segment(n, good, seed, shift, labels=True):
    return arm_segment(n, good, seed, layers=LAYERS, shift=shift, dim=DIM, labels=labels)


@pytest.fixture(scope="module")
def result():
    mats = {"sst2": segment(600, 1, 0, 0.0), "imdb": segment(700, 1, 1, 0.2),
            "ag_news": segment(700, 4, 2, 1.5, labels=False)}
    return reproduce_drift.run(mats, mats["sst2"], streams=["sst2-imdb", "imdb", "imdb-agnews"], runs=2,
                               readings=("depth",))


def test_every_stream_variant_and_segment_has_a_row(result):
    rows = result["rows"]
    assert {r["reading"] for r in rows} == {"depth"}
    assert {(r["stream"], r["policy"]) for r in rows} == {
        (s, v) for s in ("sst2-imdb", "imdb", "imdb-agnews") for v, _, _ in reproduce_drift.VARIANTS}
    plain = [r for r in rows if r["policy"] == "splitee"]
    assert all(r["ratio_first_500"] == pytest.approx(1.0) for r in plain if r["regret_first_500"] > 0)
    news = [r for r in rows if r["stream"] == "imdb-agnews" and r["segment"] == "ag_news"]
    assert {r["best_fixed_arm"] for r in news} == {4} and all(r["accuracy"] is None for r in news)
    # the stale-split bound: 500 × (arm 4's mean − arm 1's) on the news segment, none on a first segment
    means = news[0]["arm_rewards"]
    assert news[0]["stale_regret_500"] == pytest.approx(500 * (means[3] - means[0]))
    assert all(r["stale_regret_500"] is None for r in rows if r["position"] == 0)


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
    # plain splitee's regret on IMDb alone over the positions that follow the boundary in sst2-imdb
    assert t["boundary"]["plain_same_positions_no_shift"] is not None and t["boundary"]["stale_regret_500"] == 0


def test_write_makes_json_table_and_one_png_per_stream(result, tmp_path):
    paths = reproduce_drift.write(result, tmp_path)
    assert sorted(p.name for p in paths if p.suffix == ".png") == [
        "drift-regret-depth-imdb-agnews.png", "drift-regret-depth-imdb.png", "drift-regret-depth-sst2-imdb.png"]
    data = json.loads((tmp_path / "drift.json").read_text())
    assert data["targets"] == json.loads(json.dumps(result["targets"]))
    assert (tmp_path / "drift-regret-depth-imdb.png").stat().st_size > 1000


def test_unknown_stream_and_unlabelled_calibration_are_refused():
    m = segment(50, 1, 0, 0.0)
    with pytest.raises(ConfigError, match=r"unknown stream\(s\) \['nope'\]"):
        reproduce_drift.run({"sst2": m}, m, streams=["nope"], runs=1)
    with pytest.raises(ConfigError, match="needs labels and embeddings"):
        reproduce_drift.run({"sst2": m}, segment(50, 1, 0, 0.0, labels=False), runs=1)
    with pytest.raises(ConfigError, match="readings must be some of"):
        reproduce_drift.run({"sst2": m}, m, streams=["imdb"], runs=1, readings=("upside-down",))


def test_cached_matrix_exports_once_label_free_and_again_for_a_newer_model(tmp_path, monkeypatch):
    import os

    from stream.model import MultiExitModel

    from policies.reproduce import cached_matrix

    monkeypatch.setenv("EXITFLOW_HOME", str(tmp_path / "home"))
    model = tmp_path / "tiny"
    MultiExitModel.from_backbone("random:L=2,H=32,A=2,I=64", 2, seed=0).save(model)
    (tmp_path / "data" / "ag_news").mkdir(parents=True)   # AG News's own format: 4 topics, no SST-2 classes
    (tmp_path / "data" / "ag_news" / "test.csv").write_text(
        "".join(f'"{i % 4 + 1}","Story {i}","Markets moved on day {i}."\n' for i in range(12)))
    monkeypatch.setenv("EXITFLOW_DATA", str(tmp_path / "data"))
    name = "ag_news"
    m = cached_matrix(model, name, "test", 8, labels=False)
    file = m.meta["path"]
    assert m.labels is None and m.num_samples == 8 and m.num_layers == 2 and "/home/reproduce/tiny/" in file
    assert os.path.basename(file) == "ag_news-test-8-s0-nolabels.npz"
    first = os.stat(file).st_mtime_ns
    assert cached_matrix(model, name, "test", 8, labels=False).meta["path"] == file and os.stat(file).st_mtime_ns == first
    os.utime(model / "model.safetensors", ns=(first + 10**9, first + 10**9))   # the model was retrained
    cached_matrix(model, name, "test", 8, labels=False)
    assert os.stat(file).st_mtime_ns > first

    # the same through `exitflow export-matrix`: refused with the way out named, then written label-free
    from stream.cli import main

    argv = ["export-matrix", "--model", str(model), "--dataset", "ag_news", "--limit", "6", "--out", str(tmp_path / "n.npz")]
    assert main(argv) == 1
    assert not (tmp_path / "n.npz").exists()
    assert main(argv + ["--no-labels"]) == 0
    out = ConfidenceMatrix.load(tmp_path / "n.npz")
    assert out.labels is None and out.num_samples == 6 and out.meta["label_names"] == ["0", "1"]  # the model's, not the four topics


def test_exitflow_reproduce_drift_cli_runs_the_chosen_streams(tmp_path, monkeypatch, capsys):
    """The command's wiring, with generated matrices in place of the default model's exports."""
    from stream.cli import main

    mats = {"sst2": segment(300, 1, 0, 0.0), "imdb": segment(300, 1, 1, 0.2),
            "ag_news": segment(300, 4, 2, 1.5, labels=False)}
    monkeypatch.setattr(reproduce_drift, "prepare_matrices", lambda **kw: (mats, mats["sst2"]))
    assert main(["reproduce", "drift", "--datasets", "imdb-agnews", "--runs", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "imdb-agnews" in out and "literal reading: o = 5λ" in out and f"wrote {tmp_path / 'drift.json'}" in out
    data = json.loads((tmp_path / "drift.json").read_text())
    assert {r["stream"] for r in data["rows"]} == {"imdb-agnews"} and data["settings"]["streams"] == ["imdb-agnews"]
    monkeypatch.setattr(reproduce_drift, "prepare_matrices", lambda **kw: pytest.fail("prepared before the check"))
    assert main(["reproduce", "drift", "--datasets", "nope", "--runs", "1", "--out", str(tmp_path)]) == 1
    assert "unknown stream(s) ['nope']" in capsys.readouterr().err
