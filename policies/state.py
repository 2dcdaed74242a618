"""Where learned policy state lives: an in-memory store (offline evaluator, unit tests) or Redis.

Both apply additive deltas at most once per dedup key, so the same stream gives the same state.
Dedup keys are ``<namespace>:<stage>:<sample id>`` (:func:`dedup_key`): a redelivered sample is not
learned twice by the same policy, while a policy swapped in later still learns from it.

>>> import numpy as np
>>> from policies.base import StateView
>>> store = MemoryStore()
>>> view = StateView(store.snapshot("p:1"))
>>> view.add({"n1": 1.0, "s1": 0.5}, key="decision:a")
>>> view.add({"n1": 1.0, "s1": 0.25}, key="decision:b")
>>> flush(store, "p:1", view)
2
>>> store.apply("p:1", {"n1": 1.0}, dedup=dedup_key("p:1", "decision:a"))  # redelivered: ignored
False
>>> store.snapshot("p:1")
{'n1': 2.0, 's1': 0.75}
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from stream.checkpoint import Checkpointer, SampleCommit, encode_updates

from policies.base import Delta, StateView, Value


def dedup_key(ns: str, key: str) -> str:
    """The once-only key of a delta: its namespace plus the view's key (``decision:<id>``)."""
    return f"{ns}:{key}" if key else ""


class MemoryStore:
    """Policy state in a dict: what ``exitflow eval`` uses."""

    def __init__(self) -> None:
        self._state: dict[str, dict[str, Value]] = defaultdict(dict)
        self._seen: set[str] = set()

    def snapshot(self, ns: str) -> dict[str, Value]:
        return {k: (v.copy() if hasattr(v, "copy") else v) for k, v in self._state.get(ns, {}).items()}

    def apply(self, ns: str, delta: Delta, dedup: str = "") -> bool:
        """Add ``delta`` to namespace ``ns`` unless ``dedup`` was applied before; True if applied."""
        if dedup:
            if dedup in self._seen:
                return False
            self._seen.add(dedup)
        state = self._state[ns]
        for key, value in delta.items():
            state[key] = value if key not in state else state[key] + value
        return True

    def apply_many(self, ns: str, items: Sequence[tuple[str, Delta]]) -> list[bool]:
        """Apply ``(dedup, delta)`` pairs in order; which ones were applied."""
        return [self.apply(ns, delta, dedup) for dedup, delta in items]

    def namespaces(self) -> list[str]:
        return sorted(self._state)


class RedisStore:
    """Policy state in a Redis hash per namespace, updated with the pipeline's atomic commit script.

    :meth:`apply_many` sends a whole batch in one Lua call (one round trip, atomic); :meth:`apply` is
    the same for a single delta.
    """

    def __init__(self, redis, prefix: str = "exitflow:") -> None:
        self._cp = Checkpointer(redis, group="state", prefix=prefix)

    def snapshot(self, ns: str) -> dict[str, Value]:
        return self._cp.state(ns)

    def apply(self, ns: str, delta: Delta, dedup: str = "") -> bool:
        return self.apply_many(ns, [(dedup, delta)])[0]

    def apply_many(self, ns: str, items: Sequence[tuple[str, Delta]]) -> list[bool]:
        commits = [SampleCommit(dedup or "-", partition="-", dedup=dedup, updates=encode_updates(ns, delta))
                   for dedup, delta in items]
        if not commits:
            return []
        dups = self._cp.commit(commits, offsets={})
        return [i not in dups for i in range(len(commits))]


def flush(store: MemoryStore | RedisStore, ns: str, view: StateView) -> int:
    """Apply what ``view`` learned since its snapshot to ``store``, once per key; returns how many applied."""
    items = [(dedup_key(ns, key), delta) for key, delta in view.take_keyed()]
    return sum(store.apply_many(ns, items))
