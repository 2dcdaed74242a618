"""Where learned policy state lives: an in-memory store (offline evaluator, unit tests) or Redis.

Both apply additive deltas at most once per dedup key, so the same stream gives the same state.
"""

from __future__ import annotations

from collections import defaultdict

from stream.checkpoint import Checkpointer, SampleCommit, encode_updates

from policies.base import Delta, Value


class MemoryStore:
    """Policy state in a dict: what ``exitflow eval`` uses."""

    def __init__(self) -> None:
        self._state: dict[str, dict[str, Value]] = defaultdict(dict)
        self._seen: set[str] = set()

    def snapshot(self, ns: str) -> dict[str, Value]:
        return {k: (v.copy() if hasattr(v, "copy") else v) for k, v in self._state[ns].items()}

    def apply(self, ns: str, delta: Delta, dedup: str = "") -> bool:
        if dedup:
            if dedup in self._seen:
                return False
            self._seen.add(dedup)
        state = self._state[ns]
        for key, value in delta.items():
            state[key] = value if key not in state else state[key] + value
        return True


class RedisStore:
    """Policy state in a Redis hash per namespace, updated with the pipeline's atomic commit script."""

    def __init__(self, redis, prefix: str = "exitflow:") -> None:
        self._cp = Checkpointer(redis, group="state", prefix=prefix)

    def snapshot(self, ns: str) -> dict[str, Value]:
        return self._cp.state(ns)

    def apply(self, ns: str, delta: Delta, dedup: str = "") -> bool:
        sample = SampleCommit(dedup or "-", partition="-", dedup=dedup, updates=encode_updates(ns, delta))
        return not self._cp.commit([sample], offsets={})
