"""Generated confidence matrices whose best SplitEE split is known, for the ordered-evaluation tests."""

import numpy as np

from stream.matrix import ConfidenceMatrix


def arm_segment(n: int, good: int, seed: int, *, layers: int, shift: float | None = None, dim: int = 8,
                labels: bool = True) -> ConfidenceMatrix:
    """Exits below ``good`` are unsure (C ≈ 0.55, offloaded at α = 0.8), from ``good`` on sure (C ≥ 0.9):
    the best split is ``good`` unless exiting at 1 is cheaper. With ``shift``, input embeddings ~ N(shift,
    0.3²) in ``dim`` dimensions (the drift hook's signal); ids repeat across segments on purpose."""
    rng = np.random.default_rng(seed)
    c = np.full((n, layers), 0.55) + rng.uniform(-0.04, 0.04, (n, layers))
    c[:, good - 1:] = rng.uniform(0.9, 0.99, (n, layers - good + 1))
    y = rng.integers(0, 2, n)
    probs = np.empty((n, layers, 2), np.float32)
    probs[np.arange(n), :, y] = c
    probs[np.arange(n), :, 1 - y] = 1 - c
    emb = None if shift is None else (rng.normal(0, 0.3, (n, dim)) + shift).astype(np.float32)
    return ConfidenceMatrix(probs=probs, labels=y.astype(np.int64) if labels else None, embeddings=emb,
                            ids=[f"x{i}" for i in range(n)])
