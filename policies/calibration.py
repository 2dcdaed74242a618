"""Calibration files: what a policy learned from a *labelled* validation split, kept as plain JSON.

Policies never see labels while they run. The ones that need a labelled split (DIMEE's pools and α,
EENet's scoring networks and thresholds, SplitEE's α) get it through one explicit step,
``exitflow policy calibrate NAME --matrix cal.npz --out FILE`` (or ``exitflow eval --calibration``),
which writes a JSON file; the policy then takes ``calibration=FILE``. JSON, never pickle: the file is
readable, diffable and safe to load from anywhere. A policy's namespace includes a digest of its
calibration, so recalibrating starts a fresh state.

>>> data = {"policy": "splitee", "alpha": 0.9}
>>> load_calibration(data, "splitee-s", accept=("splitee",))["alpha"]
0.9
>>> calibration_digest(data)
'140449bae1ed'
>>> load_calibration(data, "eenet", accept=("eenet",))
Traceback (most recent call last):
...
stream.errors.ConfigError: policy 'eenet': calibration was made for 'splitee', expected eenet
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stream.errors import ConfigError

FORMAT_VERSION = 1


def save_calibration(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``data`` (JSON-able, with a ``policy`` key) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT_VERSION, **data}, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def load_calibration(value: str | Path | Mapping[str, Any] | None, policy: str,
                     accept: tuple[str, ...], required: bool = False) -> dict[str, Any]:
    """A calibration from a file path or an already loaded mapping; ``{}`` when none is given."""
    if value is None or value == "":
        if required:
            raise ConfigError(f"policy {policy!r} needs calibration=FILE (write one with "
                              f"`exitflow policy calibrate {policy} --matrix VALIDATION.npz --out FILE`)")
        return {}
    if isinstance(value, Mapping):
        data = dict(value)
    else:
        path = Path(value)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"policy {policy!r}: calibration file {str(path)!r} not found") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"policy {policy!r}: calibration file {str(path)!r} is not readable JSON "
                              f"({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"policy {policy!r}: calibration file {str(path)!r} must hold a JSON object")
    made_for = data.get("policy")
    if made_for not in accept:
        raise ConfigError(f"policy {policy!r}: calibration was made for {made_for!r}, expected {' or '.join(accept)}")
    return data


def calibration_digest(data: Mapping[str, Any]) -> str | None:
    """A short content hash (part of the namespace), ``None`` when uncalibrated."""
    if not data:
        return None
    blob = json.dumps({k: v for k, v in data.items() if k != "format"}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
