"""The confidence-matrix .npz: round trip without pickle, and validation errors that say what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from stream.errors import DataError
from stream.matrix import ConfidenceMatrix


def _matrix(n=5, layers=3, classes=2, seed=0) -> ConfidenceMatrix:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, layers, classes))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    return ConfidenceMatrix(probs, rng.integers(0, classes, n).astype(np.int64),
                            rng.normal(size=(n, 8)).astype(np.float32), np.full(layers, 4096, dtype=np.int64),
                            [f"s/{i}" for i in range(n)], {"dataset": "toy", "max_len": 64})


def test_round_trip_without_pickle(tmp_path):
    m = _matrix()
    path = m.save(tmp_path / "m.npz")
    with np.load(path, allow_pickle=False) as z:  # every array loads without pickle
        assert {k: z[k].dtype.kind for k in z.files} == {"probs": "f", "labels": "i", "embeddings": "f",
                                                          "hidden_bytes": "i", "ids": "U", "meta": "U"}
    back = ConfidenceMatrix.load(path)
    np.testing.assert_array_equal(back.probs, m.probs)
    np.testing.assert_array_equal(back.labels, m.labels)
    np.testing.assert_array_equal(back.embeddings, m.embeddings)
    np.testing.assert_array_equal(back.hidden_bytes, m.hidden_bytes)
    assert back.ids == m.ids and back.meta == m.meta
    assert (back.num_samples, back.num_layers, back.num_classes) == (5, 3, 2)


def test_optional_fields_may_be_absent(tmp_path):
    m = ConfidenceMatrix(_matrix().probs)
    back = ConfidenceMatrix.load(m.save(tmp_path / "bare.npz"))
    assert back.labels is None and back.embeddings is None and back.hidden_bytes is None and back.ids is None
    with pytest.raises(DataError, match="no labels"):
        back.accuracy()


def test_accuracy_per_exit():
    probs = np.array([[[0.9, 0.1], [0.2, 0.8]], [[0.6, 0.4], [0.3, 0.7]]], dtype=np.float32)
    m = ConfidenceMatrix(probs, np.array([1, 1], dtype=np.int64))
    assert m.accuracy().tolist() == [0.0, 1.0]


@pytest.mark.parametrize("change,message", [
    (lambda m: setattr(m, "probs", m.probs.astype(np.float64)), "probs must be a float32 array"),
    (lambda m: setattr(m, "probs", m.probs[:, :, :1] * 0 + 1), r"needs L >= 1 and C >= 2"),
    (lambda m: m.probs.__setitem__((2, 1), [0.5, 0.6]), r"sample 2 at exit 2 sum to 1.1"),
    (lambda m: setattr(m, "labels", m.labels.astype(np.int32)), "labels must be int64 with shape"),
    (lambda m: setattr(m, "labels", m.labels[:3]), r"labels must be int64 with shape \(5,\)"),
    (lambda m: setattr(m, "labels", m.labels + 5), r"labels must lie in 0..1"),
    (lambda m: setattr(m, "embeddings", m.embeddings[:4]), "embeddings must be float32"),
    (lambda m: setattr(m, "hidden_bytes", m.hidden_bytes[:2]), r"hidden_bytes must be int64 with shape \(3,\)"),
    (lambda m: setattr(m, "ids", m.ids[:2]), "2 ids for 5 samples"),
])
def test_validation_errors(change, message):
    m = _matrix()
    change(m)
    with pytest.raises(DataError, match=message):
        m.validate()


def test_load_reports_bad_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ConfidenceMatrix.load(tmp_path / "none.npz")
    np.savez(tmp_path / "noprobs.npz", labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match="no 'probs' array"):
        ConfidenceMatrix.load(tmp_path / "noprobs.npz")
    bad = _matrix().probs.copy()
    bad[0, 0] = [0.3, 0.3]
    np.savez(tmp_path / "badsum.npz", probs=bad)
    with pytest.raises(DataError, match=r"badsum\.npz: probs of sample 0 at exit 1"):
        ConfidenceMatrix.load(tmp_path / "badsum.npz")
    np.savez(tmp_path / "objects.npz", probs=_matrix().probs, ids=np.array([{"a": 1}] * 5, dtype=object))
    with pytest.raises(DataError, match="not a readable"):
        ConfidenceMatrix.load(tmp_path / "objects.npz")
