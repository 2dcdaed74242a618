"""The confidence-matrix format: every exit's softmax for N samples, for fast offline policy evaluation.

An ``.npz`` (read with ``allow_pickle=False``) holding ``probs`` float32 [N, L, C], and optionally
``labels`` int64 [N], ``embeddings`` float32 [N, D], ``hidden_bytes`` int64 [L] (float16 payload
size if offloaded after layer l, index 0 = layer 1), ``ids`` (unicode array [N]) and ``meta``
(a JSON string).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from stream.errors import DataError

SUM_TOLERANCE = 1e-3


@dataclasses.dataclass
class ConfidenceMatrix:
    probs: np.ndarray                       # float32 [N, L, C]
    labels: np.ndarray | None = None        # int64 [N]
    embeddings: np.ndarray | None = None    # float32 [N, D]
    hidden_bytes: np.ndarray | None = None  # int64 [L]
    ids: list[str] | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_samples(self) -> int:
        return int(self.probs.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.probs.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.probs.shape[2])

    def __len__(self) -> int:
        return self.num_samples

    def subset(self, rows) -> "ConfidenceMatrix":
        """The samples at ``rows`` (in that order), with the same meta."""
        rows = np.asarray(rows, dtype=np.int64)
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return ConfidenceMatrix(self.probs[rows], pick(self.labels), pick(self.embeddings), self.hidden_bytes,
                                None if self.ids is None else [self.ids[i] for i in rows], dict(self.meta))

    def accuracy(self) -> np.ndarray:
        """Accuracy of each exit [L] (needs labels)."""
        if self.labels is None:
            raise DataError("this confidence matrix has no labels")
        return (self.probs.argmax(-1) == self.labels[:, None]).mean(0)

    def validate(self, where: str = "confidence matrix") -> None:
        """Check shapes, dtypes and that every probability row sums to 1; raise DataError saying what is wrong."""
        p = self.probs
        if not isinstance(p, np.ndarray) or p.dtype != np.float32 or p.ndim != 3:
            raise DataError(f"{where}: probs must be a float32 array [N, L, C], got "
                            f"{getattr(p, 'dtype', type(p).__name__)} with shape {getattr(p, 'shape', None)}")
        n, layers, classes = p.shape
        if layers < 1 or classes < 2:
            raise DataError(f"{where}: probs shape {p.shape} needs L >= 1 and C >= 2")
        if not np.isfinite(p).all() or (p < 0).any():
            raise DataError(f"{where}: probs must be finite and >= 0")
        sums = p.sum(-1)
        bad = np.argwhere(np.abs(sums - 1.0) > SUM_TOLERANCE)
        if len(bad):
            i, layer = bad[0]
            raise DataError(f"{where}: probs of sample {i} at exit {layer + 1} sum to {sums[i, layer]:.6f}, "
                            f"not 1 ({len(bad)} such rows)")
        self._check(where, "labels", self.labels, np.int64, (n,))
        if self.labels is not None and len(self.labels) and not (0 <= self.labels.min() and self.labels.max() < classes):
            raise DataError(f"{where}: labels must lie in 0..{classes - 1}, got {self.labels.min()}..{self.labels.max()}")
        if self.embeddings is not None:
            self._check(where, "embeddings", self.embeddings, np.float32, (n, self.embeddings.shape[-1]))
        self._check(where, "hidden_bytes", self.hidden_bytes, np.int64, (layers,))
        if self.ids is not None and len(self.ids) != n:
            raise DataError(f"{where}: {len(self.ids)} ids for {n} samples")
        if not isinstance(self.meta, dict):
            raise DataError(f"{where}: meta must be a dict, got {type(self.meta).__name__}")

    @staticmethod
    def _check(where, name, value, dtype, shape) -> None:
        if value is None:
            return
        if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape != shape:
            raise DataError(f"{where}: {name} must be {np.dtype(dtype).name} with shape {shape}, got "
                            f"{getattr(value, 'dtype', type(value).__name__)} with shape {getattr(value, 'shape', None)}")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {"probs": self.probs, "meta": np.array(json.dumps(self.meta, sort_keys=True))}
        for name in ("labels", "embeddings", "hidden_bytes"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        if self.ids is not None:
            arrays["ids"] = np.array(self.ids, dtype=str) if self.ids else np.zeros(0, dtype="<U1")
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)  # never leave a half-written matrix under the real name
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ConfidenceMatrix":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: confidence matrix not found (write one with `exitflow export-matrix`)")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: not a readable .npz confidence matrix ({exc})") from None
        if "probs" not in arrays:
            raise DataError(f"{path}: no 'probs' array (has {sorted(arrays)})")
        try:
            meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: meta is not valid JSON ({exc.msg})") from None
        ids = [str(i) for i in arrays["ids"]] if "ids" in arrays else None
        matrix = cls.__new__(cls)
        matrix.probs, matrix.ids, matrix.meta = arrays["probs"], ids, meta
        matrix.labels, matrix.embeddings, matrix.hidden_bytes = (arrays.get(k) for k in ("labels", "embeddings", "hidden_bytes"))
        matrix.validate(str(path))
        return matrix
