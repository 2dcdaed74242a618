"""One atomic Redis commit per batch: policy-state deltas, per-sample dedup, input offsets and an outbox.

A batch is committed in one Lua call (atomic in Redis) that, for every sample whose id it has not seen
in this stage yet, applies the sample's state deltas and appends its output messages to the outbox of
its input partition, and then raises ``last_applied_offset[topic, partition]``. Only after that does the
worker produce the outbox to Kafka and clear it; the applied offsets are the record of progress. So:

* a crash before the Lua call loses nothing (the records are fetched again, nothing was applied);
* a crash after it replays nothing twice (records at or below the applied offset are skipped, and the
  outbox left in Redis is produced by whoever owns the partition next, see :meth:`Checkpointer.recover`);
* a sample id seen twice (redelivery past the offset fence, or a producer that repeats ids) is reported
  as a duplicate and produces no second output.

The hand-written Lua is needed because no client library offers "apply these deltas once per id and
fence offsets" as one atomic step (MULTI cannot branch on SET NX).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Value = float | np.ndarray

# A new epoch of a policy's state (policies/state.py): defined once, used by the batch commit below and by
# policies.state.RedisStore.start_epoch. ``e`` = {from, mode, factor, key, seed?, add?, drop?, info}. Applies only if the
# namespace's epoch is still ``from`` (several workers detecting one shift agree on one epoch) and, with a
# key (the detecting sample id), only once per key. The new epoch's hash starts empty (reset), as ``seed``,
# or as ``factor`` × every field of the old epoch but those in ``drop`` (decay), plus the numbers of ``add``; the old epoch's hash
# is left as it was.
EPOCH_LUA = r"""
local function start_epoch(p, base, e, ttl)
  local ekey = p .. 'epoch:' .. base
  local cur = tonumber(redis.call('HGET', ekey, 'n') or '0')
  if cur ~= tonumber(e.from) then return 0 end
  if e.key and e.key ~= '' then
    if not redis.call('SET', p .. 'seen:epoch:' .. base .. ':' .. e.key, '1', 'NX', 'EX', ttl) then return 0 end
  end
  local new = cur + 1
  local src = p .. 'state:' .. base
  if cur > 0 then src = src .. '@' .. cur end
  local dst = p .. 'state:' .. base .. '@' .. new
  redis.call('DEL', dst)
  if type(e.seed) == 'table' then
    for f, v in pairs(e.seed) do redis.call('HSET', dst, f, v) end
  elseif e.mode == 'decay' then
    local flat = redis.call('HGETALL', src)
    local factor = tonumber(e.factor)
    local drop = type(e.drop) == 'table' and e.drop or {}
    for i = 1, #flat, 2 do
      if not drop[flat[i]] then
        local out = {}
        for x in string.gmatch(flat[i + 1], '[^,]+') do out[#out + 1] = string.format('%.17g', tonumber(x) * factor) end
        redis.call('HSET', dst, flat[i], table.concat(out, ','))
      end
    end
  end
  if type(e.add) == 'table' then
    for f, x in pairs(e.add) do redis.call('HINCRBYFLOAT', dst, f, x) end
  end
  local info = e.info or {}
  info.epoch = new
  info.from = cur
  info.ns = base
  local event = cjson.encode(info)
  redis.call('HSET', ekey, 'n', new, 'e' .. new, event)
  redis.call('RPUSH', p .. 'epochs', event)
  redis.call('LTRIM', p .. 'epochs', -1000, -1)
  return new
end
"""

# KEYS: none (all keys derive from the prefix, single-node Redis).
# ARGV[1]: JSON {prefix, ttl, group, offsets: {"topic:partition": offset}, marks: {"topic:partition": key},
#                samples: [{id, dedup, part, n_out, updates: [[ns, field, kind, value], ...]}]}
# An update of kind 'e' starts a new epoch of namespace ``ns`` (EPOCH_LUA), after the batch's deltas;
# 'w' registers a pull awaiting feedback ([ns, sample id, 'w', {at, expire}]), 'r' removes it (see EXPIRE_LUA).
# ARGV[2..]: output blobs, n_out per sample in order.
# Returns the 0-based positions of the samples that were duplicates (nothing applied for them), or {-1}
# when ARGV[1] names a member that does not hold the lease of every partition (nothing applied at all).
COMMIT_LUA = EPOCH_LUA + r"""
local h = cjson.decode(ARGV[1])
local p = h.prefix
if h.member and h.member ~= '' then
  -- partition leases (consumers/leases.py): a member that lost a partition's lease applies nothing
  for part, _ in pairs(h.offsets) do
    if redis.call('GET', p .. 'lease:' .. h.group .. ':' .. part) ~= h.member then return {-1} end
  end
end
local dups = {}
local epochs = {}
local argi = 2
-- Vector deltas (e.g. DIMEE centroid sums) are summed over the batch's fresh samples first and
-- written once per field: parsing and formatting a 384-float string per sample would dominate.
local vectors = {}
local function queue_vector(key, field, delta)
  local slot = key .. '\n' .. field
  local acc = vectors[slot]
  if not acc then
    acc = {key = key, field = field}
    for j = 1, #delta do acc[j] = tonumber(delta[j]) end
    vectors[slot] = acc
  else
    for j = 1, #delta do acc[j] = acc[j] + tonumber(delta[j]) end
  end
end
local function flush_vector(acc)
  local cur = redis.call('HGET', acc.key, acc.field)
  local out = {}
  local i = 1
  if cur then
    for x in string.gmatch(cur, '[^,]+') do
      out[i] = string.format('%.17g', tonumber(x) + acc[i]); i = i + 1
    end
  else
    for j = 1, #acc do out[j] = string.format('%.17g', acc[j]) end
  end
  redis.call('HSET', acc.key, acc.field, table.concat(out, ','))
end
for pos, s in ipairs(h.samples) do
  local fresh = true
  if s.dedup ~= '' then
    fresh = redis.call('SET', p .. 'seen:' .. s.dedup, '1', 'NX', 'EX', h.ttl)
  end
  if fresh then
    for _, u in ipairs(s.updates) do
      local key = p .. 'state:' .. u[1]
      if u[3] == 'n' then
        redis.call('HINCRBYFLOAT', key, u[2], u[4])
      elseif u[3] == 'v' then
        queue_vector(key, u[2], u[4])
      elseif u[3] == 'e' then
        table.insert(epochs, u)
      elseif u[3] == 'w' then      -- a pull awaiting its feedback: what undoing it would add, and since when
        redis.call('ZADD', p .. 'pending:' .. u[1], u[4].at, u[2])
        redis.call('HSET', p .. 'pending_delta:' .. u[1], u[2], cjson.encode(u[4].expire))
      elseif u[3] == 'r' then      -- its feedback came: no longer awaited
        redis.call('ZREM', p .. 'pending:' .. u[1], u[2])
        redis.call('HDEL', p .. 'pending_delta:' .. u[1], u[2])
      else
        redis.call('HSET', key, u[2], u[4])
      end
    end
    for k = 1, s.n_out do
      redis.call('RPUSH', p .. 'outbox:' .. h.group .. ':' .. s.part, ARGV[argi + k - 1])
    end
  else
    table.insert(dups, pos - 1)
  end
  argi = argi + s.n_out
end
for _, acc in pairs(vectors) do flush_vector(acc) end
for _, u in ipairs(epochs) do start_epoch(p, u[1], u[4], h.ttl) end
for part, off in pairs(h.offsets) do
  local key = p .. 'offsets:' .. h.group
  local cur = tonumber(redis.call('HGET', key, part) or '-1')
  if tonumber(off) > cur then
    redis.call('HSET', key, part, off)
    local mark = h.marks and h.marks[part]
    if mark then redis.call('HSET', p .. 'marks:' .. h.group, part, mark) end
  end
end
return dups
"""


# Pulls whose feedback never came (lost with a broker that restarted empty, or a cloud that dropped them)
# would stay pending for ever and bias the policy. ARGV[1]: JSON {prefix, ttl, ns, cutoff, limit}. Every pull
# of ``ns`` registered before ``cutoff`` is expired: its undo delta is applied once, and only if the
# feedback's own dedup key (``seen:feedback:<ns>:<id>``, the device's) can still be claimed, so a feedback
# arriving later is a duplicate and cannot count twice, and an expiry cannot undo a pull already resolved.
# Returns {pulls looked at, pulls expired}.
EXPIRE_LUA = r"""
local h = cjson.decode(ARGV[1])
local p = h.prefix
local zkey = p .. 'pending:' .. h.ns
local hkey = p .. 'pending_delta:' .. h.ns
local ids = redis.call('ZRANGEBYSCORE', zkey, '-inf', h.cutoff, 'LIMIT', 0, h.limit)
local expired = 0
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', hkey, id)
  if raw and redis.call('SET', p .. 'seen:feedback:' .. h.ns .. ':' .. id, '1', 'NX', 'EX', h.ttl) then
    for f, v in pairs(cjson.decode(raw)) do redis.call('HINCRBYFLOAT', p .. 'state:' .. h.ns, f, v) end
    expired = expired + 1
  end
  redis.call('ZREM', zkey, id)
  redis.call('HDEL', hkey, id)
end
if expired > 0 then redis.call('HINCRBY', p .. 'expired', h.ns, expired) end
return {#ids, expired}
"""


def awaiting(ns: str, sample_id: str, undo: Mapping[str, float], at: float) -> list:
    """The update registering a pull of ``ns`` that awaits feedback; ``undo`` is what expiring it adds."""
    return [ns, sample_id, "w", {"at": float(at), "expire": {k: repr(float(v)) for k, v in undo.items()}}]


def resolved(ns: str, sample_id: str) -> list:
    """The update saying a pull's feedback came (it no longer awaits)."""
    return [ns, sample_id, "r", ""]


def encode_updates(ns: str, delta: Mapping[str, Value]) -> list[list]:
    """Deltas as ``[ns, field, kind, value]``: numbers add (``n``), vectors add elementwise (``v``).

    Numbers travel as repr strings so Redis adds them at full double precision.
    """
    out = []
    for field, value in delta.items():
        if isinstance(value, np.ndarray):
            out.append([ns, field, "v", [repr(float(x)) for x in value.ravel()]])
        else:
            out.append([ns, field, "n", repr(float(value))])
    return out


def decode_state(raw: Mapping[bytes | str, bytes | str]) -> dict[str, Value]:
    """A Redis state hash back to floats and vectors."""
    out: dict[str, Value] = {}
    for key, value in raw.items():
        key = key.decode() if isinstance(key, bytes) else key
        value = value.decode() if isinstance(value, bytes) else value
        out[key] = np.array([float(x) for x in value.split(",")]) if "," in value else float(value)
    return out


class LeaseLost(RuntimeError):
    """A batch was refused because its worker no longer owns one of its partitions."""


@dataclasses.dataclass
class SampleCommit:
    """What one sample's processing wants committed: its dedup key, state updates and output blobs."""

    sample_id: str
    partition: str                      # "topic:partition" of the input record
    dedup: str = ""                     # e.g. "device:<id>"; empty: no dedup (always applied)
    updates: list[list] = dataclasses.field(default_factory=list)
    outputs: list[bytes] = dataclasses.field(default_factory=list)
    record: Any = None                  # the input record, to dead-letter it if it turns out a duplicate


class Checkpointer:
    """Commits batches to Redis atomically and keeps the outbox / applied offsets of one consumer group."""

    def __init__(self, redis, group: str, prefix: str = "exitflow:", ttl_s: int = 7 * 24 * 3600) -> None:
        self.redis = redis
        self.group = group
        self.prefix = prefix
        self.ttl_s = int(ttl_s)
        self._commit = redis.register_script(COMMIT_LUA)
        self._expire = redis.register_script(EXPIRE_LUA)

    def commit(self, samples: Sequence[SampleCommit], offsets: Mapping[str, int],
               marks: Mapping[str, str] | None = None, member: str = "") -> set[int]:
        """Apply a batch atomically; returns the positions in ``samples`` of duplicates (nothing applied).

        ``marks`` names the record at each partition's new applied offset (its key), so a later owner can
        tell the log it fenced from a new one that reuses the offsets (:meth:`rebase`). With ``member``,
        the batch applies only if that member holds the lease of every partition in ``offsets``, else
        :class:`LeaseLost` is raised and nothing is applied.
        """
        header = {"prefix": self.prefix, "ttl": self.ttl_s, "group": self.group, "member": member,
                  "offsets": {k: str(int(v)) for k, v in offsets.items()}, "marks": dict(marks or {}),
                  "samples": [{"id": s.sample_id, "dedup": s.dedup, "part": s.partition,
                               "n_out": len(s.outputs), "updates": s.updates} for s in samples]}
        args = [json.dumps(header)] + [out for s in samples for out in s.outputs]
        dups = {int(d) for d in self._commit(keys=[], args=args)}
        if -1 in dups:
            raise LeaseLost(f"member {member} no longer holds the lease of {sorted(offsets)}; nothing applied")
        return dups

    def expire_pending(self, older_than_s: float, now: float, limit: int = 1000) -> dict[str, int]:
        """Expire the pulls of every namespace that have awaited feedback for over ``older_than_s``
        (:data:`EXPIRE_LUA`); returns how many were expired, by namespace (those with any)."""
        out = {}
        start = len(self.prefix + "pending:")
        for key in self.redis.scan_iter(match=self.prefix + "pending:*", count=100):
            ns = key.decode()[start:]
            header = {"prefix": self.prefix, "ttl": self.ttl_s, "ns": ns, "cutoff": repr(now - older_than_s),
                      "limit": int(limit)}
            while True:      # in chunks of ``limit`` pulls, so one Lua call never blocks Redis for long
                looked, expired = self._expire(keys=[], args=[json.dumps(header)])
                if expired:
                    out[ns] = out.get(ns, 0) + int(expired)
                if looked < limit:
                    break
        return out

    def expired(self) -> dict[str, int]:
        """Pulls expired so far, by namespace."""
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.prefix + "expired").items()}

    def applied_offsets(self) -> dict[str, int]:
        raw = self.redis.hgetall(self.prefix + "offsets:" + self.group)
        return {k.decode(): int(v) for k, v in raw.items()}

    def marks(self) -> dict[str, str]:
        """The key of the record at each partition's applied offset (see :meth:`commit`)."""
        raw = self.redis.hgetall(self.prefix + "marks:" + self.group)
        return {k.decode(): v.decode() for k, v in raw.items()}

    def rebase(self, partition: str) -> None:
        """Forget the applied offset of ``partition``: its log is a new one (an empty broker restart).

        Only the offset fence moves; the per-sample dedup and the policy state stay, so a sample applied
        before is never applied again, whatever its new offset.
        """
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.prefix + "offsets:" + self.group, partition, -1)
        pipe.hdel(self.prefix + "marks:" + self.group, partition)
        pipe.execute()

    def outbox(self, partition: str) -> list[bytes]:
        return self.redis.lrange(self._outbox_key(partition), 0, -1)

    def clear_outbox(self, partitions: Sequence[str], counts: Mapping[str, int] | None = None) -> None:
        """Drop what was produced: the first ``counts[p]`` entries (all when no count is given)."""
        pipe = self.redis.pipeline(transaction=True)
        for part in partitions:
            if counts is None:
                pipe.delete(self._outbox_key(part))
            else:
                pipe.ltrim(self._outbox_key(part), counts[part], -1)
        pipe.execute()

    def outbox_partitions(self) -> list[str]:
        pattern = self._outbox_key("*")
        start = len(self._outbox_key(""))
        return [k.decode()[start:] for k in self.redis.scan_iter(match=pattern, count=1000)]

    def state(self, ns: str) -> dict[str, Value]:
        return decode_state(self.redis.hgetall(self.prefix + "state:" + ns))

    def _outbox_key(self, partition: str) -> str:
        return f"{self.prefix}outbox:{self.group}:{partition}"
