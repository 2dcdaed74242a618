"""The multi-exit model: layer ranges compose exactly, payloads survive float16 and trimming, save/load."""

from __future__ import annotations

import shutil

import pytest
import torch

from stream import model as model_module
from stream.errors import ModelError
from stream.model import FP16_PROB_TOLERANCE, MultiExitModel, collate, trim, unbatch

TINY = "random:L=3,H=32,A=2,I=64"
TEXTS = ["a gripping , beautifully shot film .", "dull", "the plot never quite comes together , sadly"]


@pytest.fixture(scope="module")
def tiny() -> MultiExitModel:
    return MultiExitModel.from_backbone(TINY, num_classes=3, seed=1, label_names=["a", "b", "c"])


@pytest.fixture(scope="module")
def batch(tiny):
    return tiny.tokenize(TEXTS, max_len=32)


def test_shape_of_a_model(tiny):
    assert (tiny.num_layers, tiny.num_classes, tiny.hidden_size) == (3, 3, 32)
    assert len(tiny.heads) == 3 and tiny.label_names == ["a", "b", "c"]
    assert tiny.card["backbone"]["spec"] == TINY


def test_tokenize_pads_to_longest_and_marks_pairs(tiny):
    batch = tiny.tokenize(["short", "a somewhat longer text here"], max_len=64)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert batch["input_ids"].shape[1] == max(lengths) and lengths[0] < lengths[1]
    assert tiny.tokenize(["word " * 100], max_len=16)["input_ids"].shape == (1, 16)
    pair = tiny.tokenize(["premise here"], ["hypothesis"], max_len=64)
    assert pair["token_type_ids"][0].tolist().count(1) == 2  # "hypothesis" + [SEP]
    assert set(pair) == {"input_ids", "attention_mask", "token_type_ids"}


@pytest.mark.parametrize("split", [0, 1, 2, 3])
def test_resume_equals_uninterrupted_pass_exactly(tiny, batch, split):
    with torch.inference_mode():
        hidden, mask = tiny.start(batch)
        full_hidden, full = tiny.run(hidden, mask, 0, 3)
        mid, first = tiny.run(hidden, mask, 0, split)
        end, rest = tiny.run(mid.clone(), mask, split, 3)
    assert sorted(first) == list(range(1, split + 1)) and sorted(rest) == list(range(split + 1, 4))
    assert torch.equal(end, full_hidden)
    for layer, probs in {**first, **rest}.items():
        assert torch.equal(probs, full[layer])


def test_forward_logits_match_run_probabilities(tiny, batch):
    with torch.inference_mode():
        logits = tiny(batch)
        _, probs = tiny.run(*tiny.start(batch), 0, 3)
    assert len(logits) == 3 and logits[0].shape == (3, 3)
    for layer in range(1, 4):
        torch.testing.assert_close(torch.softmax(logits[layer - 1], -1), probs[layer])
        torch.testing.assert_close(probs[layer].sum(-1), torch.ones(3))


def test_exit_selection(tiny, batch):
    with torch.inference_mode():
        hidden, mask = tiny.start(batch)
        assert list(tiny.run(hidden, mask, 0, 2, exits="last")[1]) == [2]
        assert list(tiny.run(hidden, mask, 0, 3, exits=[1, 3])[1]) == [1, 3]
        assert tiny.run(hidden, mask, 1, 1)[1] == {}
        with pytest.raises(ModelError, match=r"exits \[1\] are not among the layers run \(2..3\)"):
            tiny.run(hidden, mask, 1, 3, exits=[1])
        with pytest.raises(ModelError, match="layer range 2..4 invalid"):
            tiny.run(hidden, mask, 2, 4)


def test_float16_payload_within_documented_tolerance(tiny, batch):
    with torch.inference_mode():
        hidden, mask = tiny.start(batch)
        mid, _ = tiny.run(hidden, mask, 0, 1)
        _, exact = tiny.run(mid, mask, 1, 3)
        _, rounded = tiny.run(mid.half(), mask, 1, 3)  # a float16 payload resumes in float32
    diffs = [(exact[layer] - rounded[layer]).abs().max().item() for layer in (2, 3)]
    assert max(diffs) <= FP16_PROB_TOLERANCE
    assert max(diffs) > 0  # the round trip does lose precision; the check is not vacuous


def test_trimmed_per_sample_payloads_resume_like_the_batch(tiny, batch):
    with torch.inference_mode():
        hidden, mask = tiny.start(batch)
        mid, _ = tiny.run(hidden, mask, 0, 1)
        _, full = tiny.run(mid, mask, 1, 3, exits="last")
        pieces = unbatch(mid, mask)
        assert [h.shape[1] for h, _ in pieces] == mask.sum(1).tolist()
        assert all(m.all() for _, m in pieces)
        alone = torch.cat([tiny.run(h, m, 1, 3, exits="last")[1][3] for h, m in pieces])
        again = tiny.run(*collate(pieces), 1, 3, exits="last")[1][3]
    torch.testing.assert_close(alone, full[3], atol=1e-5, rtol=0)
    torch.testing.assert_close(again, full[3], atol=1e-5, rtol=0)


def test_trim_drops_only_common_padding():
    hidden = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    h, m = trim(hidden, mask)
    assert h.shape == (2, 3, 4) and m.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert torch.equal(h, hidden[:, :3])
    h2, m2 = collate(unbatch(hidden, mask))
    assert torch.equal(m2, m) and torch.equal(h2[0], hidden[0, :3]) and torch.equal(h2[1, :2], hidden[1, :2])
    assert h2[1, 2].abs().sum() == 0


def test_embed_is_masked_mean_of_word_embeddings(tiny):
    with torch.inference_mode():
        alone = tiny.embed(tiny.tokenize(["dull"]))
        padded = tiny.embed(tiny.tokenize(["dull", "a much longer sentence than the other one"]))
        ids = tiny.tokenize(["dull"])["input_ids"][0]
        manual = tiny.encoder.embeddings.word_embeddings.weight[ids].mean(0)
    assert alone.dtype == torch.float32 and alone.shape == (1, 32)
    torch.testing.assert_close(padded[0], alone[0])  # padding does not change it
    torch.testing.assert_close(alone[0], manual)


def test_save_load_identical_and_never_unpickles(tiny, batch, tmp_path, monkeypatch):
    tiny.card["note"] = "kept"
    tiny.save(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in files and "card.json" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]

    def no_pickle(*args, **kwargs):
        raise AssertionError("load must not unpickle anything")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = MultiExitModel.load(tmp_path / "m")
    assert loaded.card["note"] == "kept" and loaded.label_names == ["a", "b", "c"]
    assert loaded.path == tmp_path / "m"
    with torch.inference_mode():
        for a, b in zip(tiny(batch), loaded(batch)):
            assert torch.equal(a, b)
        assert torch.equal(tiny.embed(batch), loaded.embed(batch))


def test_seed_makes_init_deterministic():
    a = MultiExitModel.from_backbone(TINY, 2, seed=5)
    b = MultiExitModel.from_backbone(TINY, 2, seed=5)
    c = MultiExitModel.from_backbone(TINY, 2, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.heads[0].classifier.weight, c.heads[0].classifier.weight)


def test_bad_specs_and_directories(tmp_path):
    with pytest.raises(ModelError, match="bad item 'Q=3'"):
        MultiExitModel.from_backbone("random:L=2,Q=3", 2)
    with pytest.raises(ModelError, match="not a multiple"):
        MultiExitModel.from_backbone("random:L=1,H=30,A=4,I=8", 2)
    with pytest.raises(ModelError, match="checkpoint directory with config.json"):
        MultiExitModel.from_backbone(str(tmp_path / "nowhere"), 2)
    with pytest.raises(ModelError, match="not an exitflow model: exitflow_model.json missing"):
        MultiExitModel.load(tmp_path)


def test_default_backbone_sha256_check(tmp_path, monkeypatch):
    real = model_module.default_backbone_dir()
    assert model_module.verify_default_backbone(real) == model_module.DEFAULT_BACKBONE_SHA256
    copy = tmp_path / "model"
    copy.mkdir()
    shutil.copyfile(real / "model.safetensors", copy / "model.safetensors")
    with open(copy / "model.safetensors", "r+b") as f:  # flip one byte near the end
        f.seek(-10, 2)
        byte = f.read(1)
        f.seek(-10, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(model_module, "default_backbone_dir", lambda: copy)
    with pytest.raises(ModelError, match=r"model\.safetensors have sha256 [0-9a-f]{64}, expected 53aa5117"):
        MultiExitModel.from_backbone("default", 2)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="default backbone weights missing"):
        MultiExitModel.from_backbone("default", 2)
