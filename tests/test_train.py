"""Joint-loss training, evaluation, matrix export, and the model CLI on a tiny random backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stream import cli
from stream.datasets import Dataset
from stream.errors import ConfigError, DataError, ModelError
from stream.matrix import ConfidenceMatrix
from stream.model import MultiExitModel
from stream.train import TrainConfig, _train_batches, evaluate, export_matrix, make_card, train

TINY = "random:L=2,H=32,A=2,I=64"


def toy(n: int = 96, seed: int = 0) -> Dataset:
    """Label 1 iff the text says 'great'; filler words vary the length."""
    rng = np.random.default_rng(seed)
    fillers = ["the", "movie", "was", "plot", "actors", "quite", "really", "film", "story"]
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = list(rng.choice(fillers, size=rng.integers(2, 9))) + ["great" if label else "awful"]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return Dataset("toy", "train", [f"toy/{i}" for i in range(n)], texts, None,
                   np.array(labels, dtype=np.int64), ("neg", "pos"), "generated")


def joint_loss(model: MultiExitModel, ds: Dataset) -> float:
    with torch.inference_mode():
        logits = model(model.tokenize(ds.texts, max_len=32))
        target = torch.as_tensor(ds.labels)
        return sum(torch.nn.functional.cross_entropy(lg, target).item() for lg in logits)


def test_a_few_steps_lower_the_joint_loss_deterministically():
    ds = toy()
    config = TrainConfig(epochs=6, max_len=32, batch_size=16, lr=5e-3, warmup=0.1, seed=0)
    model = MultiExitModel.from_backbone(TINY, 2, seed=0)
    before = joint_loss(model, ds)
    summary = train(model, ds, config, dev_ds=ds, progress=False)
    after = joint_loss(model, ds)
    assert summary["steps"] == 36 and summary["samples_seen"] == 6 * 96
    assert after < 0.2 * before
    assert len(summary["dev_accuracy"]) == 2 and summary["dev_accuracy"][-1] > 0.9
    assert not model.training

    again = MultiExitModel.from_backbone(TINY, 2, seed=0)
    assert train(again, ds, config, progress=False)["losses"] == summary["losses"]


def test_exit_weights_change_the_loss_and_are_checked():
    ds = toy(32)
    config = TrainConfig(epochs=1, max_len=32, batch_size=16, seed=0)
    plain = train(MultiExitModel.from_backbone(TINY, 2), ds, config, progress=False)["losses"]
    weighted = train(MultiExitModel.from_backbone(TINY, 2), ds,
                     TrainConfig(epochs=1, max_len=32, batch_size=16, seed=0, exit_weights=(0.0, 1.0)),
                     progress=False)["losses"]
    assert weighted[0] < plain[0]  # the first exit's loss is left out
    with pytest.raises(ConfigError, match="3 exit weights for a model with 2 exits"):
        train(MultiExitModel.from_backbone(TINY, 2), ds, TrainConfig(exit_weights=(1, 1, 1)), progress=False)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        TrainConfig(lr=0)


def test_batches_cover_every_sample_once_with_similar_lengths():
    lengths = np.random.default_rng(0).integers(3, 60, size=1000)
    batches = _train_batches(lengths, 32, np.random.default_rng(1), pool=10)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 10  # a random batch of 32 would span ~50 tokens


def test_labels_out_of_range_are_rejected():
    ds = toy(8)
    bad = Dataset(ds.name, ds.split, ds.ids, ds.texts, None, ds.labels + 2, None, "f.tsv")
    with pytest.raises(DataError, match="label 3 but the model has 2 classes"):
        evaluate(MultiExitModel.from_backbone(TINY, 2), bad)


def test_export_matrix_shapes_dtypes_and_payload(tmp_path):
    ds = toy(20)
    model = MultiExitModel.from_backbone(TINY, 2)
    matrix = export_matrix(model, ds, max_len=32, batch_size=8, progress=False)
    assert matrix.probs.shape == (20, 2, 2) and matrix.probs.dtype == np.float32
    assert matrix.labels.dtype == np.int64 and matrix.labels.tolist() == ds.labels.tolist()
    assert matrix.embeddings.shape == (20, 32) and matrix.embeddings.dtype == np.float32
    assert matrix.hidden_bytes.dtype == np.int64 and matrix.hidden_bytes.shape == (2,)
    real = model.tokenize(ds.texts, max_len=32)["attention_mask"].sum(1).float().mean().item()
    assert matrix.hidden_bytes[0] == round(real * 32 * 2)
    assert matrix.ids == ds.ids
    # rows stay in dataset order although batches are sorted by length
    with torch.inference_mode():
        one = model.run(*model.start(model.tokenize([ds.texts[7]], max_len=32)), 0, 2)[1]
        emb = model.embed(model.tokenize([ds.texts[7]], max_len=32))
    np.testing.assert_allclose(matrix.probs[7, 1], one[2][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(matrix.embeddings[7], emb[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(matrix.accuracy(), evaluate(model, ds, 32, 8), atol=1e-4)
    back = ConfidenceMatrix.load(matrix.save(tmp_path / "m.npz"))
    assert back.meta["dataset"] == "toy" and back.meta["max_len"] == 32


def test_card_records_provenance():
    ds = toy(16)
    model = MultiExitModel.from_backbone(TINY, 2, seed=3)
    config = TrainConfig(epochs=1, max_len=32, batch_size=8, seed=3)
    summary = train(model, ds, config, dev_ds=ds, progress=False)
    card = make_card(model, ds, config, summary)
    assert card["backbone"]["spec"] == TINY and card["seed"] == 3 and card["train_samples"] == 16
    assert card["max_len"] == 32 and len(card["dev_accuracy"]) == 2 and card["train_time_s"] >= 0
    json.dumps(card)  # serialisable


def test_cli_train_export_and_info(tmp_path, capsys):
    data = tmp_path / "toy.tsv"
    ds = toy(40)
    data.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(ds.texts, ds.labels)))
    out = tmp_path / "model"
    code = cli.main(["train", "--dataset", f"tsv:{data}", "--text-column", "text", "--label-column", "label",
                     "--backbone", TINY, "--out", str(out), "--epochs", "1", "--batch-size", "8",
                     "--max-len", "32", "--threads", "1"])
    assert code == 0 and (out / "model.safetensors").is_file()
    matrix_path = tmp_path / "m.npz"
    code = cli.main(["export-matrix", "--model", str(out), "--dataset", f"tsv:{data}", "--text-column", "text",
                     "--label-column", "label", "--shuffle", "--seed", "1", "--limit", "10", "--out", str(matrix_path)])
    assert code == 0
    matrix = ConfidenceMatrix.load(matrix_path)
    assert matrix.probs.shape == (10, 2, 2) and matrix.meta["shuffle"] is True
    capsys.readouterr()
    assert cli.main(["model", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == info["exits"] == 2 and info["path"] == str(out.resolve())
    assert info["parameters"] == MultiExitModel.load(out).num_parameters()
    assert info["backbone"]["spec"] == TINY and info["train_samples"] == 40


def test_cli_errors_are_clear(tmp_path, capsys, monkeypatch):
    assert cli.main(["model", "info", str(tmp_path)]) == 1
    assert "is not an exitflow model" in capsys.readouterr().err
    assert cli.main(["export-matrix", "--model", str(tmp_path), "--dataset", "sst2", "--out", str(tmp_path / "x.npz")]) == 1
    assert "not an exitflow model" in capsys.readouterr().err


def test_prepare_reuses_an_existing_default_model(tmp_path, monkeypatch, capsys):
    out = tmp_path / "default"
    MultiExitModel.from_backbone(TINY, 2).save(out)
    monkeypatch.setenv("EXITFLOW_MODEL", str(out))
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert cli.main(["model", "prepare", "--threads", "1"]) == 0
    assert "default model ready" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ModelError):
        MultiExitModel.load(tmp_path / "missing")
