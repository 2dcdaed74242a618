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

import json

import numpy as np

from stream.checkpoint import Checkpointer

from policies.base import Delta, StateView, Value, merge_deltas


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


# Apply the summed deltas of a batch of samples to one namespace, atomically, if none of the samples'
# dedup keys was seen before; otherwise apply nothing and return the positions of those that were (the
# caller drops them, re-sums the rest and calls again). Summing in numpy first means each field, and each
# vector (kept as a comma-separated string), is read and written once per batch, not once per sample.
# Same hash and seen-key layout as stream.checkpoint's commit, so both dedup against each other.
# ARGV[1]: JSON {prefix, ttl, ns, keys: [dedup...], n: {field: number}, v: {field: [numbers]}}
STATE_LUA = r"""
local h = cjson.decode(ARGV[1])
local seen = {}
for pos, k in ipairs(h.keys) do
  if k ~= '' and redis.call('EXISTS', h.prefix .. 'seen:' .. k) == 1 then table.insert(seen, pos - 1) end
end
if #seen > 0 then return seen end
for _, k in ipairs(h.keys) do
  if k ~= '' then redis.call('SET', h.prefix .. 'seen:' .. k, '1', 'EX', h.ttl) end
end
local key = h.prefix .. 'state:' .. h.ns
for f, x in pairs(h.n) do
  redis.call('HINCRBYFLOAT', key, f, string.format('%.17g', x))
end
for f, acc in pairs(h.v) do
  local out, cur = {}, redis.call('HGET', key, f)
  if cur then
    local i = 1
    for x in string.gmatch(cur, '[^,]+') do out[i] = string.format('%.17g', tonumber(x) + acc[i]); i = i + 1 end
  else
    for j = 1, #acc do out[j] = string.format('%.17g', acc[j]) end
  end
  redis.call('HSET', key, f, table.concat(out, ','))
end
return seen
"""


class RedisStore:
    """Policy state in a Redis hash per namespace (``<prefix>state:<ns>``), updated atomically.

    :meth:`apply_many` sends a whole batch in one Lua call (one round trip, atomic, the fresh samples'
    deltas summed before they touch the hash; a second call only when some were duplicates);
    :meth:`apply` is the same for a single delta.
    """

    def __init__(self, redis, prefix: str = "exitflow:", ttl_s: int = 7 * 24 * 3600) -> None:
        self._cp = Checkpointer(redis, group="state", prefix=prefix)
        self._script = redis.register_script(STATE_LUA)
        self.prefix = prefix
        self.ttl_s = int(ttl_s)

    def snapshot(self, ns: str) -> dict[str, Value]:
        return self._cp.state(ns)

    def apply(self, ns: str, delta: Delta, dedup: str = "") -> bool:
        return self.apply_many(ns, [(dedup, delta)])[0]

    def apply_many(self, ns: str, items: Sequence[tuple[str, Delta]]) -> list[bool]:
        applied, todo, keys = [True] * len(items), [], set()
        for i, (dedup, _) in enumerate(items):   # a key repeated within the batch counts once
            if dedup and dedup in keys:
                applied[i] = False
            else:
                keys.add(dedup)
                todo.append(i)
        while todo:
            total = merge_deltas([items[i][1] for i in todo])
            header = {"prefix": self.prefix, "ttl": self.ttl_s, "ns": ns, "keys": [items[i][0] for i in todo],
                      "n": {k: float(v) for k, v in total.items() if not isinstance(v, np.ndarray)} or _EMPTY,
                      "v": {k: v.astype(float).ravel().tolist() for k, v in total.items()
                            if isinstance(v, np.ndarray)} or _EMPTY}
            seen = {int(d) for d in self._script(keys=[], args=[json.dumps(header)])}
            if not seen:
                break
            for pos in seen:
                applied[todo[pos]] = False
            todo = [i for k, i in enumerate(todo) if k not in seen]
        return applied


class _EmptyObject(dict):
    """Serialises as ``{}`` so Lua's cjson sees an object (an empty list would read the same)."""


_EMPTY = _EmptyObject()


def flush(store: MemoryStore | RedisStore, ns: str, view: StateView) -> int:
    """Apply what ``view`` learned since its snapshot to ``store``, once per key; returns how many applied."""
    items = [(dedup_key(ns, key), delta) for key, delta in view.take_keyed()]
    return sum(store.apply_many(ns, items))
