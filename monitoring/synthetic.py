"""Synthetic result and label records with the live schema, for tests, benchmarks and trying the dashboard
without a trained model. A shift at ``shift_at`` lowers confidence, raises offloads and errors and moves
the embedding distance, as a domain change (SST-2 → IMDb) does.
"""

from __future__ import annotations

import random
import time
from typing import Any


def records(n: int, *, seed: int = 0, start: float | None = None, rate: float = 50.0, shift_at: int | None = None,
            policy: str = "splitee", ns: str = "splitee:0123456789ab", swap_at: int | None = None,
            sources: tuple[str, str] = ("sst2", "imdb")) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``n`` (result, label) pairs, ``rate`` per second of record time from ``start`` (default: just past)."""
    rng = random.Random(seed)
    start = time.time() - n / rate if start is None else start
    out = []
    for i in range(n):
        shifted = shift_at is not None and i >= shift_at
        conf = min(0.999, max(0.5, rng.gauss(0.75 if shifted else 0.92, 0.06)))
        layer = rng.randint(1, 3)
        tier = "device" if conf > 0.8 or rng.random() < 0.3 else rng.choice(("edge", "cloud"))
        remote = 0 if tier == "device" else 6 - layer
        label = rng.randint(0, 1)
        prediction = label if rng.random() < (0.7 if shifted else 0.9) else 1 - label
        cost = {"device": float(layer), "edge": 0.5 * remote if tier == "edge" else 0.0,
                "offload": 0.0 if tier == "device" else 5.0, "fee": 0.5 if tier == "cloud" else 0.0}
        cost["total"] = sum(cost.values())
        ts = start + i / rate
        source = sources[1] if shifted else sources[0]
        version = 2 if swap_at is not None and i >= swap_at else 1
        result = {"id": f"s{seed}-{i}", "source": source, "seq": i, "prediction": prediction,
                  "confidence": conf, "tier": tier, "exit_layer": layer if tier == "device" else 6,
                  "layers": {"device": layer, "edge": remote if tier == "edge" else 0,
                             "cloud": remote if tier == "cloud" else 0},
                  "exits_evaluated": layer, "decision": {"layer": layer, "confidence": conf}, "cost": cost,
                  "bytes_offloaded": 0 if tier == "device" else 4096 * layer,
                  "policy": {"name": policy, "version": version, "ns": ns},
                  "latency_ms": {"device": 3.0, "remote": 0.0 if tier == "device" else 5.0,
                                 "total": 10.0 + 20 * rng.random()},
                  "ts": ts, "ts_in": ts - 0.01, "embedding_distance": rng.gauss(2.0 if shifted else 1.0, 0.2),
                  "stage": tier}
        out.append((result, {"id": result["id"], "label": label, "source": source, "seq": i}))
    return out
