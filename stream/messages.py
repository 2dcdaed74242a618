"""Message schemas of every topic, msgpack-encoded with an explicit schema version.

Tensors travel as raw little-endian bytes with dtype and shape (never pickled). Decoding checks the
size limit before parsing, the schema version, required fields and their types, and tensor sanity
(dtype, shape, finite values); any failure raises :class:`MessageError` saying what was expected and
what arrived, so the worker can send the record to the dead-letter topic with that reason.
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
TENSOR_DTYPES = {"float16": np.float16, "float32": np.float32}

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

