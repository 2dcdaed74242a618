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

import dataclasses
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from stream.checkpoint import EPOCH_LUA, Checkpointer

from policies.base import Delta, StateView, Value, epoch_namespace, merge_deltas, split_namespace


@dataclasses.dataclass(frozen=True)
class EpochStart:
    """A request to begin epoch ``from_epoch + 1`` of the state of ``base`` (a policy's base namespace).

    It applies only while ``base`` is still at ``from_epoch`` (workers that detect one shift together agree
    on one new epoch) and at most once per ``key`` (the detecting sample's id: a redelivered detection
    batch starts nothing). The new epoch starts empty (``reset``), as ``seed`` when the policy gives one,
    or as ``factor`` × every additive field of the old epoch (``decay``), less the fields in ``drop``
    (a policy's own reaction: e.g. SplitEE's online α starts again from its prior). The old epoch stays
    readable under its namespace. ``info`` is what the event records (policy, reason, sample, seq, time...).
    """

    base: str
    from_epoch: int
    mode: Literal["reset", "decay"] = "reset"
    factor: float = 0.0
    key: str = ""
    seed: Mapping[str, Value] | None = None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    add: Mapping[str, float] = dataclasses.field(default_factory=dict)
    drop: tuple[str, ...] = ()

    def payload(self) -> dict[str, Any]:
        """The JSON the Lua side reads (see ``stream.checkpoint.EPOCH_LUA``)."""
        out: dict[str, Any] = {"from": int(self.from_epoch), "mode": self.mode, "factor": float(self.factor),
                               "key": self.key, "info": dict(self.info) or _EMPTY}
        if self.seed is not None:
            out["seed"] = {k: _encode_value(v) for k, v in self.seed.items()} or _EMPTY
        if self.add:
            out["add"] = {k: repr(float(v)) for k, v in self.add.items()}
        if self.drop:
            out["drop"] = {k: 1 for k in self.drop}
        return out

    def update(self) -> list:
        """As one ``[ns, field, kind, value]`` update of a batch commit (``stream.checkpoint``)."""
        return [self.base, "", "e", self.payload()]


def _encode_value(value: Value) -> str:
    if isinstance(value, np.ndarray):
        return ",".join(repr(float(x)) for x in value.ravel())
    return repr(float(value))


def dedup_key(ns: str, key: str) -> str:
    """The once-only key of a delta: its namespace plus the view's key (``decision:<id>``)."""
    return f"{ns}:{key}" if key else ""


class MemoryStore:
    """Policy state in a dict: what ``exitflow eval`` uses."""

    def __init__(self) -> None:
        self._state: dict[str, dict[str, Value]] = defaultdict(dict)
        self._seen: set[str] = set()
        self._epochs: dict[str, list[dict[str, Any]]] = {}

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

    def epoch(self, base: str) -> int:
        """The current epoch of ``base``'s state (0 before any)."""
        return len(self._epochs.get(base, ()))

    def epochs(self, base: str) -> list[dict[str, Any]]:
        """The events that started each epoch of ``base``, oldest first."""
        return list(self._epochs.get(base, ()))

    def start_epoch(self, start: EpochStart) -> int:
        """Begin the next epoch of ``start.base`` (see :class:`EpochStart`); its number, or 0 if refused."""
        current = self.epoch(start.base)
        if current != start.from_epoch:
            return 0
        if start.key:
            seen = f"epoch:{start.base}:{start.key}"
            if seen in self._seen:
                return 0
            self._seen.add(seen)
        old = self._state.get(epoch_namespace(start.base, current), {})
        new = epoch_namespace(start.base, current + 1)
        if start.seed is not None:
            self._state[new] = {k: (v.copy() if hasattr(v, "copy") else float(v)) for k, v in start.seed.items()}
        elif start.mode == "decay":
            self._state[new] = {k: v * start.factor for k, v in old.items() if k not in start.drop}
        else:
            self._state[new] = {}
        for k, v in start.add.items():
            self._state[new][k] = self._state[new].get(k, 0.0) + float(v)
        self._epochs.setdefault(start.base, []).append({**start.info, "epoch": current + 1, "from": current,
                                                        "ns": start.base})
        return current + 1


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
        self._epoch = redis.register_script(EPOCH_SCRIPT)
        self.redis = redis
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


    def epoch(self, base: str) -> int:
        return int(self.redis.hget(f"{self.prefix}epoch:{base}", "n") or 0)

    def epochs(self, base: str) -> list[dict[str, Any]]:
        return epoch_events(self.redis, base, self.prefix)

    def start_epoch(self, start: EpochStart) -> int:
        """Begin the next epoch atomically (one Lua call, the same code as the batch commit's)."""
        return int(self._epoch(keys=[], args=[self.prefix, start.base, json.dumps(start.payload()), self.ttl_s]))


EPOCH_SCRIPT = EPOCH_LUA + r"""
return start_epoch(ARGV[1], ARGV[2], cjson.decode(ARGV[3]), tonumber(ARGV[4]))
"""


def epoch_events(redis, base: str, prefix: str = "exitflow:") -> list[dict[str, Any]]:
    """The events that started each epoch of ``base`` in Redis, oldest first."""
    raw = redis.hgetall(f"{prefix}epoch:{base}")
    events = {}
    for field, value in raw.items():
        field = field.decode() if isinstance(field, bytes) else field
        if field.startswith("e") and field[1:].isdigit():
            events[int(field[1:])] = json.loads(value)
    return [events[k] for k in sorted(events)]


def epoch_of(store: "MemoryStore | RedisStore", ns: str) -> tuple[str, dict[str, Value]]:
    """The namespace of the current epoch of ``ns``'s policy and its state (what a reader should look at)."""
    base, _ = split_namespace(ns)
    current = epoch_namespace(base, store.epoch(base))
    return current, store.snapshot(current)


class _EmptyObject(dict):
    """Serialises as ``{}`` so Lua's cjson sees an object (an empty list would read the same)."""


_EMPTY = _EmptyObject()


def flush(store: MemoryStore | RedisStore, ns: str, view: StateView) -> int:
    """Apply what ``view`` learned since its snapshot to ``store``, once per key; returns how many applied."""
    items = [(dedup_key(ns, key), delta) for key, delta in view.take_keyed()]
    return sum(store.apply_many(ns, items))
