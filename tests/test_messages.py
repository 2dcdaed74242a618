"""Message schemas: round trips, clear errors on bad input, and garbage never escapes as another error."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream import messages
from stream.errors import MessageError

SAMPLE = {"id": "s1", "text": "a fine film", "source": "sst2", "ts": 1.0, "seq": 0}


def test_sample_round_trip():
    assert messages.decode("sample", messages.encode("sample", SAMPLE))["text"] == "a fine film"


@pytest.mark.parametrize("payload,expected", [
    ({**SAMPLE, "text": "   "}, "text is empty"),
    ({k: v for k, v in SAMPLE.items() if k != "source"}, "lacks required field 'source'"),
    ({**SAMPLE, "ts": "yesterday"}, "field 'ts' must be float/int, got str"),
    ({**SAMPLE, "text": "x" * 200}, "over the limit of 100"),
    ({**SAMPLE, "id": ""}, "empty id"),
])
def test_bad_samples_say_what_is_wrong(payload, expected):
    with pytest.raises(MessageError, match=expected):
        messages.decode("sample", messages.encode("sample", payload), max_text=100)


def test_size_is_checked_before_parsing():
    with pytest.raises(MessageError, match="exceeds the limit of 1000 bytes"):
        messages.decode("sample", b"\x00" * 1001, max_bytes=1000)


def test_wrong_schema_version_and_kind():
    data = msgpack.packb({"v": 99, "kind": "sample", **SAMPLE})
    with pytest.raises(MessageError, match="schema version 99"):
        messages.decode("sample", data)
    with pytest.raises(MessageError, match="expected a result message, got kind 'sample'"):
        messages.decode("result", messages.encode("sample", SAMPLE))


def test_tensor_round_trip_and_checks():
    x = np.arange(12, dtype=np.float16).reshape(3, 4)
    back = messages.unpack_tensor(messages.pack_tensor(x), where="t", ndim=2, last_dim=4)
    assert back.dtype == np.float16 and np.array_equal(back, x)
    packed = messages.pack_tensor(x)
    with pytest.raises(MessageError, match="expected last dimension 8"):
        messages.unpack_tensor(packed, where="t", last_dim=8)
    with pytest.raises(MessageError, match="needs 24 bytes, got 23"):
        messages.unpack_tensor({**packed, "data": packed["data"][:-1]}, where="t")
    with pytest.raises(MessageError, match="dtype 'int64' not accepted"):
        messages.unpack_tensor({**packed, "dtype": "int64"}, where="t")
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(MessageError, match="NaN or inf"):
        messages.unpack_tensor(messages.pack_tensor(bad), where="t")
    with pytest.raises(MessageError, match="cannot send a int64 tensor"):
        messages.pack_tensor(np.zeros(3, dtype=np.int64))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_message_errors(data):
    for kind in ("sample", "offload", "feedback", "label", "result"):
        try:
            messages.decode(kind, data)
        except MessageError:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "kind", "id", "text", "source", "ts", "hidden", "resume_layer",
                                        "run_to", "policy", "context", "trace", "probs", "exit_layer"]),
                       json_values, max_size=12))
def test_generated_maps_are_accepted_or_rejected_cleanly(payload):
    data = msgpack.packb(payload, use_bin_type=True)
    for kind in ("sample", "offload", "feedback"):
        try:
            msg = messages.decode(kind, data)
        except MessageError:
            continue
        assert msg["v"] == messages.SCHEMA_VERSION and msg["kind"] == kind
        if kind == "sample":
            assert isinstance(msg["text"], str) and msg["text"].strip()
        if kind == "offload" and "hidden" in msg:
            try:
                arr = messages.unpack_tensor(msg["hidden"], where="h")
                assert np.isfinite(arr).all()
            except MessageError:
                pass
        if kind == "feedback":
            assert all(isinstance(p, (int, float)) and math.isfinite(p) for p in msg["probs"])
