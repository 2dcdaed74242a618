"""Partition ownership through leases in Redis, instead of Kafka's consumer-group coordinator.

Why: the embedded Tansu coordinator (0.6) can leave a group without an assignment for good after a
member leaves: in a clean-clone run and in 1 of 4 local runs of the rebalance fault test, the second
device worker held no partition for the rest of the test although it rejoined as a new member 20 times
(`make fault-repeat`; see the README). The workers already keep the truth about progress in Redis (the
applied offset of every partition, committed atomically with the policy state), so they need from Kafka
only fetches by manual assignment, and from Redis one more thing: who owns which partition.

How: every member refreshes its heartbeat in a sorted set (``members:<group>``, score = time) and computes
the same target from the live members: partition k of the sorted partition list goes to member
k mod M of the sorted members. It acquires a targeted partition's lease (``lease:<group>:<partition>``,
SET NX PX) once free, renews the leases it holds (every ``ttl / 3``, from a thread, so a long batch does
not lose them), and releases, between batches, those no longer targeted to it. A member that dies stops
renewing and its leases expire after ``ttl``. The atomic Redis commit checks the lease (see
:class:`stream.checkpoint.Checkpointer`), so a member that lost its lease while busy can never apply a
batch twice: its commit is refused and it drops the batch. Heartbeats carry the workers' wall clocks:
keep them within a fraction of the lease time of each other (NTP); lease expiry itself is Redis's clock.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

log = logging.getLogger(__name__)

# Release a lease only if this member still holds it (compare-and-delete), renew likewise.
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"


def member_id() -> str:
    """A member name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def target(partitions: list[str], members: list[str], me: str) -> set[str]:
    """The partitions the deterministic spread gives ``me``: the k-th sorted partition to member k mod M.

    >>> sorted(target(["t:0", "t:1", "t:2"], ["b", "a"], "a")), sorted(target(["t:0", "t:1", "t:2"], ["a", "b"], "b"))
    (['t:0', 't:2'], ['t:1'])
    """
    ranked = sorted(set(members) | {me})
    mine = ranked.index(me)
    return {p for k, p in enumerate(sorted(partitions)) if k % len(ranked) == mine}


class PartitionLeases:
    """The leases of one member of ``group``; :meth:`balance` returns the partitions it holds now."""

    def __init__(self, redis, group: str, prefix: str = "exitflow:", ttl_s: float = 6.0, member: str | None = None):
        self.redis = redis
        self.group = group
        self.prefix = prefix
        self.ttl_ms = int(ttl_s * 1000)
        self.member = member or member_id()
        self.held: set[str] = set()
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def key(self, partition: str) -> str:
        return f"{self.prefix}lease:{self.group}:{partition}"

    @property
    def members_key(self) -> str:
        return f"{self.prefix}members:{self.group}"

    def members(self) -> list[str]:
        """Live members: heartbeats younger than the lease time (older ones are dropped)."""
        now = time.time()
        pipe = self.redis.pipeline()
        pipe.zadd(self.members_key, {self.member: now})
        pipe.zremrangebyscore(self.members_key, "-inf", now - self.ttl_ms / 1000)
        pipe.zrange(self.members_key, 0, -1)
        return [m.decode() for m in pipe.execute()[2]]

    def balance(self, partitions: list[str]) -> tuple[set[str], set[str]]:
        """Acquire targeted partitions that are free, release the others; returns (gained, lost)."""
        want = target(partitions, self.members(), self.member)
        with self._lock:
            gained, lost = set(), set()
            for part in sorted(self.held - want):
                self._release(keys=[self.key(part)], args=[self.member])
                lost.add(part)
            for part in sorted(want - self.held):
                if self.redis.set(self.key(part), self.member, nx=True, px=self.ttl_ms):
                    gained.add(part)
            self.held = (self.held - lost) | gained
            return gained, lost

    def renew(self) -> set[str]:
        """Extend every held lease; returns the ones found taken (they expired meanwhile) and drops them."""
        with self._lock:
            pipe = self.redis.pipeline()
            for part in sorted(self.held):
                self._renew(keys=[self.key(part)], args=[self.member, self.ttl_ms], client=pipe)
            gone = {p for p, ok in zip(sorted(self.held), pipe.execute()) if not ok}
            self.held -= gone
            self.redis.zadd(self.members_key, {self.member: time.time()})
            return gone

    def start(self) -> "PartitionLeases":
        """Renew from a daemon thread every ttl / 3 (Redis errors are retried at the next tick)."""
        def loop():
            while not self._stop.wait(self.ttl_ms / 3000):
                try:
                    gone = self.renew()
                    if gone:
                        log.warning("leases of %s expired before renewal: %s", self.member, sorted(gone))
                except Exception as exc:  # Redis down: the worker's own retries report it; keep trying
                    log.debug("lease renewal failed: %s", exc)
        self._thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop renewing and release everything (a clean stop hands partitions over at once)."""
        self._stop.set()
        try:
            with self._lock:
                for part in sorted(self.held):
                    self._release(keys=[self.key(part)], args=[self.member])
                self.held = set()
            self.redis.zrem(self.members_key, self.member)
        except Exception:  # Redis gone: the leases expire on their own
            log.debug("could not release leases", exc_info=True)
