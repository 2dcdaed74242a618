"""Message schemas of every topic, msgpack-encoded with an explicit schema version.

Tensors travel as raw little-endian bytes with dtype and shape (never pickled). Decoding checks the
size limit before parsing, the schema version, required fields and their types, and tensor sanity
(dtype, shape, finite values); any failure raises :class:`MessageError` saying what was expected and
what arrived, so the worker can send the record to the dead-letter topic with that reason.

An offload's hidden state travels in the encoding its ``encoding`` field names (absent: ``f16``):
``f16`` is float16; ``i8`` is int8 quantized per token with a float32 scale per token (symmetric absmax,
``x ≈ q · scale``, at most ``scale / 2`` off per value), about half the bytes. ``python -m bench offload``
measures what ``i8`` changes in the predictions against ``f16``.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from stream.errors import MessageError

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_TEXT_CHARS = 100_000
TENSOR_DTYPES = {"float16": np.float16, "float32": np.float32, "int8": np.int8}
#: Hidden-state encodings of an offload: name → dtype of its ``hidden`` tensor.
HIDDEN_ENCODINGS = {"f16": "float16", "i8": "int8"}
DEFAULT_HIDDEN_ENCODING = "i8"

# Required fields and their types per message kind (optional fields are checked where used).
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "sample": {"id": (str,), "text": (str,), "source": (str,), "ts": (float, int)},
    "label": {"id": (str,), "label": (int,), "source": (str,)},
    "offload": {"id": (str,), "resume_layer": (int,), "run_to": (int,), "policy": (dict,),
                "context": (dict,), "trace": (dict,), "ts": (float, int)},
    "result": {"id": (str,), "prediction": (int,), "confidence": (float, int), "tier": (str,),
               "exit_layer": (int,), "layers": (dict,), "cost": (dict,), "bytes_offloaded": (int,),
               "policy": (dict,), "latency_ms": (dict,), "ts": (float, int)},
    "feedback": {"id": (str,), "policy": (dict,), "context": (dict,), "trace": (dict,),
                 "exit_layer": (int,), "probs": (list,)},
    "dlq": {"reason": (str,), "stage": (str,), "topic": (str,), "partition": (int,), "offset": (int,)},
}


def encode(kind: str, payload: dict[str, Any]) -> bytes:
    """Pack ``payload`` as a ``kind`` message (adds the schema version and kind)."""
    return msgpack.packb({"v": SCHEMA_VERSION, "kind": kind, **payload}, use_bin_type=True)


def decode(kind: str, data: bytes | None, *, max_bytes: int = MAX_MESSAGE_BYTES,
           max_text: int = MAX_TEXT_CHARS) -> dict[str, Any]:
    """Unpack and validate a ``kind`` message; raises MessageError naming what is wrong."""
    if data is None:
        raise MessageError(f"expected a {kind} message, got an empty value (tombstone)")
    if len(data) > max_bytes:
        raise MessageError(f"{kind} message of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=max_bytes,
                              max_str_len=max_bytes, max_array_len=1_000_000, max_map_len=10_000)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise MessageError(f"expected a msgpack {kind} message, could not decode it: "
                           f"{type(exc).__name__}: {exc}") from None
    if not isinstance(msg, dict):
        raise MessageError(f"expected a msgpack map for a {kind} message, got {type(msg).__name__}")
    if msg.get("v") != SCHEMA_VERSION:
        raise MessageError(f"{kind} message has schema version {msg.get('v')!r}; this worker reads version "
                           f"{SCHEMA_VERSION}")
    if msg.get("kind") != kind:
        raise MessageError(f"expected a {kind} message, got kind {msg.get('kind')!r}")
    for field, types in SCHEMAS[kind].items():
        if field not in msg:
            raise MessageError(f"{kind} message lacks required field {field!r}")
        value = msg[field]
        if not isinstance(value, types) or isinstance(value, bool):
            raise MessageError(f"{kind} field {field!r} must be {'/'.join(t.__name__ for t in types)}, "
                               f"got {type(value).__name__}")
    if "id" in msg and not msg["id"]:
        raise MessageError(f"{kind} message has an empty id")
    if kind == "sample":
        _check_text(msg, "text", max_text)
        if msg.get("text_pair") is not None:
            _check_text(msg, "text_pair", max_text)
    if kind in ("result", "feedback") and not all(_finite(x) for x in msg.get("probs", []) or [0.0]):
        raise MessageError(f"{kind} message {msg['id']!r} has non-finite probabilities")
    if kind in ("offload", "feedback"):
        require_fields(msg, "policy", POLICY_REF)
        trace = require_fields(msg, "trace", TRACE)
        if trace["tier"] not in ("device", "edge", "cloud") or trace["device_layers"] < 0 or trace["device_exits"] < 0:
            raise MessageError(f"{kind} {msg['id']!r}: bad trace {trace!r}")
    return msg


def require_fields(msg: dict[str, Any], field: str, spec: dict[str, tuple[type, ...]]) -> dict[str, Any]:
    """Check a nested map field (e.g. the policy reference of an offload) has ``spec``'s keys and types."""
    value = msg.get(field)
    if not isinstance(value, dict):
        raise MessageError(f"{msg.get('kind')} {msg.get('id')!r}: field {field!r} must be a map")
    for key, types in spec.items():
        if not isinstance(value.get(key), types) or isinstance(value.get(key), bool):
            raise MessageError(f"{msg.get('kind')} {msg.get('id')!r}: {field}.{key} must be "
                               f"{'/'.join(t.__name__ for t in types)}, got {type(value.get(key)).__name__}")
    return value


POLICY_REF = {"name": (str,), "version": (int,), "ns": (str,)}
TRACE = {"device_layers": (int,), "device_exits": (int,), "tier": (str,)}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check_text(msg: dict[str, Any], field: str, max_text: int) -> None:
    text = msg[field]
    if not isinstance(text, str):
        raise MessageError(f"sample {msg['id']!r}: {field} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise MessageError(f"sample {msg['id']!r}: {field} is empty")
    if len(text) > max_text:
        raise MessageError(f"sample {msg['id']!r}: {field} has {len(text)} characters, over the limit of {max_text}")


def pack_tensor(array: np.ndarray) -> dict[str, Any]:
    """A tensor as ``{dtype, shape, data}`` with little-endian raw bytes."""
    array = np.ascontiguousarray(array)
    name = array.dtype.name
    if name not in TENSOR_DTYPES:
        raise MessageError(f"cannot send a {name} tensor; expected one of {sorted(TENSOR_DTYPES)}")
    return {"dtype": name, "shape": list(array.shape), "data": array.astype(array.dtype.newbyteorder("<")).tobytes()}


def unpack_tensor(obj: Any, *, where: str, ndim: int | None = None, last_dim: int | None = None) -> np.ndarray:
    """Back from ``{dtype, shape, data}``, checking dtype, shape, byte count and finiteness."""
    if not isinstance(obj, dict) or not {"dtype", "shape", "data"} <= set(obj):
        raise MessageError(f"{where}: expected a tensor {{dtype, shape, data}}, got {type(obj).__name__}")
    dtype = TENSOR_DTYPES.get(obj["dtype"])
    if dtype is None:
        raise MessageError(f"{where}: tensor dtype {obj['dtype']!r} not accepted; expected one of "
                           f"{sorted(TENSOR_DTYPES)}")
    shape = obj["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise MessageError(f"{where}: tensor shape must be a list of positive ints, got {shape!r}")
    if ndim is not None and len(shape) != ndim:
        raise MessageError(f"{where}: expected a {ndim}-d tensor, got shape {shape}")
    if last_dim is not None and shape[-1] != last_dim:
        raise MessageError(f"{where}: expected last dimension {last_dim}, got shape {shape}")
    data = obj["data"]
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if not isinstance(data, bytes) or len(data) != expected:
        raise MessageError(f"{where}: tensor of shape {shape} and dtype {obj['dtype']} needs {expected} bytes, "
                           f"got {len(data) if isinstance(data, bytes) else type(data).__name__}")
    array = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    if not np.isfinite(array).all():
        raise MessageError(f"{where}: tensor holds NaN or inf")
    return array


def quantize_i8(hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: ``q = round(x / s)`` with ``s = max|x| / 127`` per row; ``x ≈ q · s``.

    >>> q, s = quantize_i8(np.array([[0.5, -1.27, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32))
    >>> q.tolist(), [round(float(v), 4) for v in s]
    ([[50, -127, 0], [0, 0, 0]], [0.01, 0.0])
    """
    x = np.asarray(hidden, dtype=np.float32)
    scale = np.abs(x).max(axis=-1) / 127.0
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def encode_hidden(hidden: np.ndarray, encoding: str = DEFAULT_HIDDEN_ENCODING) -> dict[str, Any]:
    """The offload fields that carry a ``[tokens, hidden]`` state: ``encoding``, ``hidden`` (+ ``hidden_scale``)."""
    if encoding == "f16":
        return {"encoding": "f16", "hidden": pack_tensor(np.asarray(hidden).astype(np.float16))}
    if encoding == "i8":
        q, scale = quantize_i8(hidden)
        return {"encoding": "i8", "hidden": pack_tensor(q), "hidden_scale": pack_tensor(scale)}
    raise MessageError(f"unknown hidden-state encoding {encoding!r}; expected one of {sorted(HIDDEN_ENCODINGS)}")


def decode_hidden(msg: dict[str, Any], *, where: str, last_dim: int | None = None,
                  max_tokens: int | None = None) -> np.ndarray:
    """The float32 ``[tokens, hidden]`` state of an offload message, checked against its ``encoding``."""
    encoding = msg.get("encoding", "f16")
    if encoding not in HIDDEN_ENCODINGS:
        raise MessageError(f"{where}: unknown hidden-state encoding {encoding!r}; expected one of "
                           f"{sorted(HIDDEN_ENCODINGS)}")
    hidden = unpack_tensor(msg.get("hidden"), where=f"{where} hidden", ndim=2, last_dim=last_dim)
    if max_tokens is not None and hidden.shape[0] > max_tokens:
        raise MessageError(f"{where}: hidden state has {hidden.shape[0]} tokens, over max_len {max_tokens}")
    if hidden.dtype.name != HIDDEN_ENCODINGS[encoding]:
        raise MessageError(f"{where}: a hidden state of encoding {encoding!r} must be {HIDDEN_ENCODINGS[encoding]} "
                           f"(f16: float16; i8: int8 with a float32 scale per token), got {hidden.dtype.name}")
    if encoding == "f16":
        return hidden.astype(np.float32)
    scale = unpack_tensor(msg.get("hidden_scale"), where=f"{where} hidden_scale", ndim=1)
    if scale.dtype != np.float32 or scale.shape[0] != hidden.shape[0] or (scale < 0).any():
        raise MessageError(f"{where}: an i8 hidden state needs a float32 scale >= 0 per token "
                           f"({hidden.shape[0]}), got {scale.dtype.name} of shape {list(scale.shape)}")
    return hidden.astype(np.float32) * scale[:, None]


def hidden_payload_bytes(tokens: int, hidden_size: int, encoding: str = DEFAULT_HIDDEN_ENCODING) -> int:
    """Bytes of a ``tokens``-long hidden state's tensors in ``encoding`` (the message adds a few hundred).

    >>> hidden_payload_bytes(128, 384, "f16"), hidden_payload_bytes(128, 384, "i8")
    (98304, 49664)
    """
    if encoding not in HIDDEN_ENCODINGS:
        raise MessageError(f"unknown hidden-state encoding {encoding!r}; expected one of {sorted(HIDDEN_ENCODINGS)}")
    per_value = np.dtype(HIDDEN_ENCODINGS[encoding]).itemsize
    return int(tokens) * (int(hidden_size) * per_value + (4 if encoding == "i8" else 0))
