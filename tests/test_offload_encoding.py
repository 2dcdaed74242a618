"""The hidden state on the wire: int8 per token against float16, negotiated by the offload's ``encoding``."""

import doctest

import numpy as np
import pytest

from stream import messages
from stream.errors import MessageError


def _hidden(tokens=128, size=384, seed=0):
    """A hidden state shaped like a BERT layer's: mostly small values, a few outlier channels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.4, (tokens, size)).astype(np.float32)
    x[:, [7, 99, 200]] *= 20.0
    return x


def _offload(hidden, enc, sample_id="imdb-7", **extra):
    """A complete offload message, with the fields the device stage sends."""
    fields = messages.encode_hidden(hidden, enc) if enc else {"hidden": messages.pack_tensor(hidden)}
    payload = {"id": sample_id, "source": "imdb", "seq": 3, "resume_layer": 2, "run_to": 6, "threshold": None,
               "policy": {"name": "splitee", "params": {}, "cost": "splitee", "cost_overrides": {}, "version": 1,
                          "ns": "splitee:0123456789ab"},
               "context": {"arm": 2, "ns": "splitee:0123456789ab"},
               "trace": {"device_layers": 2, "device_exits": 1, "tier": "cloud"},
               "decision": {"layer": 2, "confidence": 0.61}, "embedding_distance": 1.25, "ts": 1700000000.0,
               "latency_device_ms": 12.5, **fields, **extra}
    return messages.encode("offload", payload)


def _received(data):
    msg = messages.decode("offload", data)
    return messages.decode_hidden(msg, where=f"offload {msg['id']!r}", last_dim=384, max_tokens=128)


def test_int8_round_trip_error_is_at_most_half_a_step_per_token():
    x = _hidden()
    q, scale = messages.quantize_i8(x)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (128,)
    back = q.astype(np.float32) * scale[:, None]
    err = np.abs(back - x).max(axis=1)
    bound = np.abs(x).max(axis=1) / 254.0          # scale / 2, scale = absmax / 127
    assert (err <= bound * (1 + 1e-5) + 1e-7).all()
    assert np.abs(q).max() == 127                   # each token's absmax is used in full


def test_int8_of_an_all_zero_token_is_exact():
    x = _hidden(4)
    x[1] = 0.0
    q, scale = messages.quantize_i8(x)
    assert scale[1] == 0.0 and (q[1] == 0).all()
    assert (q.astype(np.float32) * scale[:, None])[1].tolist() == [0.0] * 384


@pytest.mark.parametrize("encoding, tolerance", [("f16", 1e-2), ("i8", None)])
def test_both_encodings_decode_to_float32(encoding, tolerance):
    x = _hidden(40)
    back = _received(_offload(x, encoding))
    assert back.dtype == np.float32 and back.shape == x.shape
    bound = np.abs(x).max(axis=1, keepdims=True) / 254.0 * (1 + 1e-5) + 1e-7 if tolerance is None else tolerance
    assert (np.abs(back - x) <= bound).all()


def test_an_offload_without_encoding_is_float16():
    x = _hidden(8).astype(np.float16)
    back = _received(_offload(x, None))
    np.testing.assert_array_equal(back, x.astype(np.float32))


def test_unknown_encoding_is_rejected_naming_the_sample_and_what_was_expected():
    data = _offload(_hidden(8), "i8", sample_id="imdb-42", encoding="i4")
    with pytest.raises(MessageError, match=r"offload 'imdb-42': unknown hidden-state encoding 'i4'; "
                                           r"expected one of \['f16', 'i8'\]"):
        _received(data)


@pytest.mark.parametrize("change, message", [
    (lambda f: {**f, "encoding": "f16"},
     r"encoding 'f16' must be float16 \(f16: float16; i8: int8 with a float32 scale per token\), got int8"),
    (lambda f: {k: v for k, v in f.items() if k != "hidden_scale"}, r"hidden_scale: expected a tensor"),
    (lambda f: {**f, "hidden_scale": messages.pack_tensor(np.ones(3, np.float32))}, r"a float32 scale >= 0 per token"),
    (lambda f: {**f, "hidden_scale": messages.pack_tensor(-np.ones(8, np.float32))}, r"a float32 scale >= 0 per token"),
])
def test_a_bad_int8_payload_is_rejected(change, message):
    fields = change(messages.encode_hidden(_hidden(8), "i8"))
    msg = {"id": "imdb-1", **fields}
    with pytest.raises(MessageError, match=message):
        messages.decode_hidden(msg, where="offload 'imdb-1'", last_dim=384)


def test_too_many_tokens_are_rejected():
    msg = {"id": "imdb-1", **messages.encode_hidden(_hidden(130), "i8")}
    with pytest.raises(MessageError, match="130 tokens, over max_len 128"):
        messages.decode_hidden(msg, where="offload 'imdb-1'", last_dim=384, max_tokens=128)


def test_the_device_refuses_an_unknown_encoding():
    with pytest.raises(MessageError, match="unknown hidden-state encoding 'bf16'"):
        messages.encode_hidden(_hidden(2), "bf16")


@pytest.mark.parametrize("tokens", [128, 32])
def test_an_int8_offload_message_is_at_most_055_of_float16(tokens):
    x = _hidden(tokens)
    f16, i8 = len(_offload(x, "f16")), len(_offload(x, "i8"))
    assert i8 / f16 <= 0.55
    tensors = messages.hidden_payload_bytes(tokens, 384, "i8")
    assert tensors < i8 < tensors + 1000             # the rest of the message is a few hundred bytes


def test_messages_docstring_examples():
    assert doctest.testmod(messages).failed == 0
