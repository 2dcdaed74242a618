"""The record every sample yields exactly once on `results`, built the same way by every stage."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from stream.costs import CostModel, Trace


def result_record(msg: dict[str, Any], trace: Trace, cost: CostModel, probs: np.ndarray, exit_layer: int,
                  policy: dict[str, Any], *, decision: dict[str, Any] | Any, stage: str,
                  latency_device_ms: float = 0.0, latency_remote_ms: float = 0.0, bytes_offloaded: int = 0,
                  embedding_distance: float | None = None, ts_device: float | None = None,
                  ts_remote: float | None = None) -> dict[str, Any]:
    """Prediction, confidence, tier, exit layer, layers per tier, cost breakdown, bytes, policy, latencies.

    ``ts_device`` / ``ts_remote``: when the device's and the remote stage's batch of the sample began
    (wall clock); with ``ts_in`` and ``ts`` they split the latency into queueing, compute and hops.
    """
    now = time.time()
    if not isinstance(decision, dict):  # an Observation from the device loop
        layer = decision.layer
        decision = {"layer": layer,
                    "confidence": float(np.max(decision.probs[layer])) if layer in decision.probs else None}
    return {
        "id": msg["id"],
        "source": msg.get("source", ""),
        "seq": msg.get("seq"),
        "prediction": int(np.argmax(probs)),
        "confidence": float(np.max(probs)),
        "tier": trace.tier,
        "exit_layer": int(exit_layer),
        "layers": {"device": trace.device_layers, "edge": trace.edge_layers, "cloud": trace.cloud_layers},
        "exits_evaluated": trace.device_exits,
        "decision": decision,
        "cost": cost.breakdown(trace).as_dict(),
        "bytes_offloaded": int(bytes_offloaded),
        "policy": {"name": policy["name"], "version": int(policy["version"]), "ns": policy["ns"]},
        "latency_ms": {"device": float(latency_device_ms), "remote": float(latency_remote_ms),
                       "total": max(0.0, (now - float(msg["ts"])) * 1000.0)},
        "embedding_distance": embedding_distance,
        "ts": now,
        "ts_in": float(msg["ts"]),
        "ts_device": ts_device,
        "ts_remote": ts_remote,
        "stage": stage,
    }
