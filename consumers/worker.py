"""The loop every stage worker shares: poll a batch, process it, commit it atomically, then publish.

Batch lifecycle (a failed step leaves the applied offset where it was, so the records come again):

1. poll up to ``batch_size`` records of the partitions this worker leases; drop those at or below the
   partition's applied offset in Redis (applied before a crash; their outputs sit in the outbox), once
   the log is checked to be the one fenced (an empty broker restart reuses offsets);
2. ``process`` them (stage specific) into per-sample :class:`SampleCommit` s: state deltas + outputs;
3. one Lua call, refused unless this worker holds the partitions' leases, applies deltas once per
   sample id, appends outputs to the partition's outbox in Redis and raises the applied offsets
   (:mod:`stream.checkpoint`);
4. produce the outbox to Kafka and wait for the acks, then clear it.

A partition's new owner first re-publishes whatever outbox a crashed owner left, then starts right
after the applied offset (Kafka's committed offsets are not used).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from typing import Any

import msgpack

from stream import kafka as K
from stream import messages
from stream.checkpoint import Checkpointer, LeaseLost, SampleCommit
from stream.config import Topics
from stream.errors import InfraError
from stream.infra import port_open

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """How a stage worker connects and batches; every field is a CLI option of `exitflow worker`."""

    bootstrap: str
    redis_url: str
    topic_prefix: str = "exitflow."
    redis_prefix: str = "exitflow:"
    group: str | None = None
    batch_size: int = 32
    poll_ms: int = 50
    idle_exit_s: float | None = None          # stop after this long without records (demo/tests)
    broker_timeout_s: float = 60.0            # exit non-zero after the broker is unreachable this long
    lease_s: float = 6.0                      # partition lease time: a dead worker's partitions move after it
    exit_process_on_outage: bool = False      # a CLI worker leaves the process then (see StageWorker._watchdog)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    max_message_bytes: int = messages.MAX_MESSAGE_BYTES
    max_text_chars: int = messages.MAX_TEXT_CHARS

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


#: Where ``EXITFLOW_CRASH_AT=POINT[:N]`` (tests only) kills the worker with SIGKILL, at the N-th batch.
#: ``lost_reply`` is no kill: the N-th Redis commit applies, then its reply is dropped (a ConnectionError),
#: the case where the worker cannot know whether its commit went through.
CRASH_POINTS = ("after_redis_commit", "after_produce", "after_outbox_clear", "lost_reply")


def crash_plan(value: str | None) -> tuple[str, int] | None:
    """``EXITFLOW_CRASH_AT`` parsed: ``'after_produce:3'`` → ``('after_produce', 3)``; unset → None.

    >>> crash_plan("after_produce:3"), crash_plan(None)
    (('after_produce', 3), None)
    """
    if not value:
        return None
    point, _, nth = value.partition(":")
    if point not in CRASH_POINTS or (nth and not nth.isdigit()):
        raise InfraError(f"EXITFLOW_CRASH_AT={value!r}: expected POINT[:N] with POINT one of {CRASH_POINTS}")
    return point, int(nth or 1)


#: A consumer poll (asked to return within ``poll_ms``) still blocked after this long is stuck: the
#: watchdog ends the process (exit code 3) for its supervisor to restart.
POLL_STALL_S = 15.0


class OutageError(InfraError):
    """Kafka or Redis stayed unreachable past the configured timeout."""


def envelope(topic: str, key: str, value: bytes) -> bytes:
    """An output as stored in the outbox until it is produced."""
    return msgpack.packb([topic, key, value], use_bin_type=True)


def dlq_envelope(topics: Topics, stage: str, record, reason: str) -> bytes:
    """The rejected record and why, for the dead-letter topic (value kept up to 64 KB)."""
    value = record.value if isinstance(record.value, bytes) else b""
    key = record.key.decode("utf-8", "replace") if isinstance(record.key, bytes) else ""
    payload = {"reason": reason, "stage": stage, "topic": record.topic, "partition": record.partition,
               "offset": record.offset, "key": key, "value": value[:65536],
               "value_bytes": len(value), "ts": time.time()}
    return envelope(topics.dlq, key, messages.encode("dlq", payload))


REASON_KINDS = (("duplicate", "duplicate"), ("schema version", "schema"), ("tensor", "tensor"),
                ("hidden state", "tensor"), ("exceeds the limit", "size"), ("over the limit", "size"),
                ("could not decode", "decode"), ("policy", "policy"), ("lacks required", "schema"),
                ("must be", "schema"), ("empty", "empty"))


def reason_kind(reason: str) -> str:
    """A bounded label for a DLQ reason (metrics never carry free text)."""
    for needle, kind in REASON_KINDS:
        if needle in reason:
            return kind
    return "other"


def record_mark(record) -> str:
    """What identifies a record within its partition's log: its key (a sample id), else its timestamp."""
    return record.key.decode("utf-8", "replace") if record.key else f"ts:{record.timestamp}"


def _tp(part: str):
    """``'topic:3'`` as a kafka-python TopicPartition."""
    from kafka import TopicPartition

    topic, _, num = part.rpartition(":")
    return TopicPartition(topic, int(num))


def part_key(record) -> str:
    return f"{record.topic}:{record.partition}"


class StageWorker:
    """Base of the device, edge and cloud workers: subclasses set ``stage``/``inputs`` and ``process``.

    Partitions are owned through leases in Redis (:mod:`consumers.leases`) and fetched by manual
    assignment: the embedded Tansu coordinator (0.6) could leave a group without an assignment for good.
    Progress lives in Redis (applied offsets, committed atomically with the state and checked against the
    lease), so a new owner starts each partition right after its applied offset.
    """

    stage = ""

    def __init__(self, config: WorkerConfig, metrics=None) -> None:
        import redis
        self.config = config
        self.topics = config.topics
        self.redis = redis.Redis.from_url(config.redis_url)
        self.group = config.group or f"{config.topic_prefix}{self.stage}"
        self.checkpoint = Checkpointer(self.redis, self.group, prefix=config.redis_prefix)
        self.metrics = metrics
        self.fence: dict[str, int] = {}
        self._verified: set[tuple[str, int]] = set()
        self._leases = None
        self._assigned: set[str] = set()
        self._parts: list[str] = []
        self._parts_at = 0.0
        self._balanced_at = 0.0
        self._recheck = False
        self._crash = crash_plan(os.environ.get("EXITFLOW_CRASH_AT"))
        self._crash_seen = 0
        self._high: dict[str, int] = {}          # highest offset seen per partition (this log)
        self._high_before: dict[str, int] = {}   # ... as it was when the broker was last seen down
        self.processed = 0
        self._stop = threading.Event()
        self._consumer = None
        self._producer = None
        self._last_probe = 0.0
        self._renew = False           # replace the consumer before the next poll (after a broker failure)
        self._polling_since = 0.0     # when the consumer poll now running began (0: none), for the watchdog
        self._down_since: float | None = None
        self._probe_lock = threading.Lock()

    # -- what subclasses implement -------------------------------------------------------------
    def inputs(self) -> list[str]:
        raise NotImplementedError

    def process(self, records: list) -> list[SampleCommit]:
        raise NotImplementedError

    # -- the loop -------------------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        self._stop.set()

    def run(self) -> int:
        """Consume until stopped (SIGTERM/SIGINT, idle timeout); returns the process exit code."""
        from consumers.leases import PartitionLeases

        self._producer = K.producer(self.config.bootstrap)
        self._consumer = K.consumer(self.config.bootstrap, max_poll_records=self.config.batch_size)
        self._leases = PartitionLeases(self.redis, self.group, prefix=self.config.redis_prefix,
                                       ttl_s=self.config.lease_s).start()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
        log.info("%s worker: group %s (member %s), inputs %s", self.stage, self.group, self._leases.member,
                 self.inputs())
        if self.config.exit_process_on_outage:
            threading.Thread(target=self._watchdog, name="broker-watchdog", daemon=True).start()
        last_data = time.monotonic()
        try:
            while not self._stop.is_set():
                if self._renew:
                    self._renew_consumer()
                self._retry(self._rebalance)
                if not self._leases.held:
                    time.sleep(self.config.poll_ms / 1000)
                    polled = {}
                else:
                    self._polling_since = time.monotonic()
                    polled = self._consumer.poll(timeout_ms=self.config.poll_ms, max_records=self.config.batch_size)
                    self._polling_since = 0.0
                records = [r for batch in polled.values() for r in batch if part_key(r) in self._leases.held]
                if not records:
                    self._retry(self.idle)
                    if not self._broker_ok():
                        return 3
                    idle = self.config.idle_exit_s
                    if idle is not None and time.monotonic() - last_data > idle:
                        log.info("%s worker: idle for %.0fs, stopping", self.stage, idle)
                        break
                    continue
                last_data = time.monotonic()
                self._handle(records)
            return 0
        except OutageError as exc:
            log.error("%s worker: giving up: %s", self.stage, exc)
            return 3
        finally:
            self.close()

    def idle(self) -> None:
        """Called when a poll brought nothing: housekeeping that must not wait for records (override)."""

    # -- partition ownership (consumers/leases.py) ------------------------------------------------
    def _partitions(self) -> list[str]:
        """Every partition of the input topics (metadata refreshed at most every 5 s)."""
        now = time.monotonic()
        if now - self._parts_at > 5.0 or not self._parts:
            found = []
            for topic in self.inputs():
                found += [f"{topic}:{p}" for p in sorted(self._consumer.partitions_for_topic(topic) or ())]
            if found:
                self._parts, self._parts_at = found, now
        return self._parts

    def _rebalance(self) -> None:
        """Take the partitions the lease spread gives this member, hand back the others (between batches)."""
        now = time.monotonic()
        if now - self._balanced_at < 0.5 and not self._recheck:
            return
        self._balanced_at = now
        before = set(self._assigned)
        self._leases.balance(self._partitions())
        held = set(self._leases.held)             # the renewal thread may also have dropped some
        if held != before:
            log.info("%s worker: partitions now %s (gained %s, handed back %s)", self.stage, sorted(held),
                     sorted(held - before), sorted(before - held))
            if self.metrics:
                self.metrics.handover(len(held - before), len(before - held))
            tps = {p: _tp(p) for p in held}
            self._consumer.assign(list(tps.values()))
            self._assigned = held
            if held - before:
                self._on_assigned([tps[p] for p in sorted(held - before)])
            for part in sorted(held - before):
                self._seek(tps[part], part)
        if self._recheck:                           # the broker came back: it may have come back empty
            self._recheck = False
            self._verified.clear()
            for part in sorted(held):
                fence = self.fence.get(part, -1)
                self._check_log(part)
                if self.fence.get(part, -1) != fence:
                    self._seek(_tp(part), part)

    def _renew_consumer(self) -> None:
        """A fresh consumer on the partitions held, each started again right after its fence.

        After sends failed on a broker that came back (empty), kafka-python's consumer was measured to
        stay blocked on fetches the new broker never answers; a new one, with every partition's log
        checked again (:meth:`_check_log`), goes on.
        """
        self._renew = False
        log.warning("%s worker: replacing the consumer after a broker failure", self.stage)
        try:
            self._consumer.close()
        except Exception:
            log.debug("error closing the old consumer", exc_info=True)
        self._consumer = K.consumer(self.config.bootstrap, max_poll_records=self.config.batch_size)
        self._parts_at = 0.0
        self._verified.clear()
        held = sorted(self._assigned)
        self._consumer.assign([_tp(p) for p in held])
        for part in held:
            self._seek(_tp(part), part)

    def _seek(self, tp, part: str) -> None:
        """Start a partition right after its applied offset (Redis is the record of progress, not Kafka)."""
        self._check_log(part)
        self._consumer.seek(tp, self.fence.get(part, -1) + 1)

    def _watchdog(self) -> None:
        """Exit the process (code 3) once the broker has been unreachable past the outage timeout, or
        once one consumer poll has not returned for ``POLL_STALL_S``.

        kafka-python's poll can block indefinitely when the broker dies mid-fetch, and stays blocked
        when it comes back empty (measured: the fetcher waits on a request the new broker never
        answers), so the main loop cannot be relied on to notice; everything a batch changed is
        committed atomically or not at all, so leaving abruptly loses nothing, and the supervisor
        (the demo, compose, systemd) starts a fresh process.
        """
        while not self._stop.wait(1.0):
            stalled = self._polling_since and time.monotonic() - self._polling_since > POLL_STALL_S
            if stalled:
                log.error("%s worker: a Kafka poll has not returned for %.0fs; exiting for the supervisor",
                          self.stage, time.monotonic() - self._polling_since)
            if stalled or not self._broker_ok():
                logging.shutdown()
                os._exit(3)

    def _broker_ok(self) -> bool:
        """Probe the broker at most once a second while idle; False once it has been down too long."""
        with self._probe_lock:
            return self._probe()

    def _probe(self) -> bool:
        now = time.monotonic()
        if now - self._last_probe < 1.0:
            return self._down_since is None or now - self._down_since <= self.config.broker_timeout_s
        self._last_probe = now
        host, _, port = self.config.bootstrap.split(",")[0].rpartition(":")
        if port_open(host or "127.0.0.1", int(port), timeout=1.0):
            if self._down_since is not None:
                log.warning("%s worker: Kafka at %s is back after %.1fs", self.stage, self.config.bootstrap,
                            now - self._down_since)
                self._set_down(False)
                self._recheck = True
            return True
        if self.metrics:
            self.metrics.broker_error()             # one failed probe of the broker's port
        if self._down_since is None:
            log.error("%s worker: Kafka at %s is unreachable; retrying for up to %.0fs", self.stage,
                      self.config.bootstrap, self.config.broker_timeout_s)
            self._set_down(True)
        elif now - self._down_since > self.config.broker_timeout_s:
            log.error("%s worker: Kafka at %s unreachable for %.0fs, exiting", self.stage, self.config.bootstrap,
                      now - self._down_since)
            return False
        return True

    def _set_down(self, down: bool) -> None:
        self._down_since = time.monotonic() if down else None
        if down:
            self._high_before = dict(self._high)
        if self.metrics:
            self.metrics.broker_down(down)

    def _handle(self, records: list) -> None:
        last: dict[str, Any] = {}
        for r in records:
            part = part_key(r)
            if r.offset > getattr(last.get(part), "offset", -1):
                last[part] = r
        for part, r in last.items():
            self._high[part] = max(self._high.get(part, -1), r.offset)
        for part in sorted({part_key(r) for r in records if r.offset <= self.fence.get(part_key(r), -1)}):
            self._check_log(part)           # about to skip records as applied: is this the log we fenced?
        fresh = [r for r in records if r.offset > self.fence.get(part_key(r), -1)]
        commits = self._retry(self.process, fresh) if fresh else []
        offsets = {part: r.offset for part, r in last.items()}
        marks = {part: record_mark(r) for part, r in last.items()}
        started = time.perf_counter()
        try:
            dups = self._commit(commits, offsets, marks)
        except LeaseLost as exc:     # another member owns a partition now: it will process these records
            log.warning("%s worker: batch dropped: %s", self.stage, exc)
            for part in sorted(self._assigned):    # nothing was applied: fetch the held ones again
                self._consumer.seek(_tp(part), self.fence.get(part, -1) + 1)
            self._balanced_at = 0.0
            return
        if self.metrics:
            self.metrics.state_write(time.perf_counter() - started)
        if dups is None:  # an earlier attempt went through before Redis dropped the connection
            log.warning("%s worker: an earlier commit attempt of this batch had applied (its reply was lost); "
                        "publishing the stored outbox", self.stage)
            outputs = [b for part in sorted(offsets) for b in self.checkpoint.outbox(part)]
            dups = set()
        else:
            outputs = [out for i, c in enumerate(commits) if i not in dups for out in c.outputs]
        extra = [dlq_envelope(self.topics, self.stage, c.record, f"duplicate sample id {c.sample_id!r}: "
                              f"already processed by stage {self.stage}") for i, c in enumerate(commits)
                 if i in dups and c.record is not None]
        self._crash_point("after_redis_commit")
        self._publish(outputs + extra)
        self._crash_point("after_produce")
        self._retry(self.checkpoint.clear_outbox, sorted(offsets))
        self._crash_point("after_outbox_clear")
        self.fence.update(offsets)
        self.processed += len(fresh)
        if self.metrics:
            self.metrics.batch(len(fresh))
            for _ in dups:
                self.metrics.dlq("duplicate")
            self._report_lag()

    def _crash_point(self, point: str) -> None:
        """Die here, as a SIGKILL would, when ``EXITFLOW_CRASH_AT`` names this point (fault tests only)."""
        if self._crash and self._crash[0] == point:
            self._crash_seen += 1
            if self._crash_seen == self._crash[1] and point == "lost_reply":
                import redis
                log.warning("%s worker: EXITFLOW_CRASH_AT=lost_reply:%d, dropping the commit's reply", self.stage,
                            self._crash[1])
                raise redis.ConnectionError("EXITFLOW_CRASH_AT=lost_reply: the reply of an applied commit was lost")
            if self._crash_seen == self._crash[1]:
                log.warning("%s worker: EXITFLOW_CRASH_AT=%s:%d, killing myself", self.stage, *self._crash)
                logging.shutdown()
                os.kill(os.getpid(), signal.SIGKILL)

    def _report_lag(self) -> None:
        """Consumer lag per assigned partition, from the high watermark the last fetch returned."""
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is not None:
                self.metrics.lag(tp.topic, tp.partition, max(0, high - self._consumer.position(tp)))

    def _commit(self, commits: list[SampleCommit], offsets: dict[str, int],
                marks: dict[str, str] | None = None) -> set[int] | None:
        """The atomic Redis commit, retried while Redis is unreachable.

        Returns the duplicates' positions, or None when a lost reply hid an attempt that did apply
        (the applied offsets already cover the batch): the caller then publishes the stored outbox.
        """
        attempts = []

        def attempt():
            if attempts:
                applied = self.checkpoint.applied_offsets()
                if all(applied.get(p, -1) >= off for p, off in offsets.items()):
                    return None
            attempts.append(1)
            dups = self.checkpoint.commit(commits, offsets, marks, member=self._leases.member)
            self._crash_point("lost_reply")
            return dups

        return self._retry(attempt)

    def _retry(self, fn, *args):
        """Call ``fn`` until Redis answers, backing off up to 5 s; OutageError past the outage timeout.

        Only steps that are safe to repeat go through here: processing (nothing is written before the
        commit), the commit itself (see :meth:`_commit`) and clearing the outbox.
        """
        import redis
        deadline = time.monotonic() + self.config.broker_timeout_s
        delay, attempt = 0.2, 0
        while True:
            try:
                return fn(*args)
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                attempt += 1
                if time.monotonic() > deadline:
                    raise OutageError(f"Redis at {self.config.redis_url.split('@')[-1]} unreachable for "
                                      f"{self.config.broker_timeout_s:.0f}s: {exc}") from None
                log.warning("%s worker: Redis unreachable (%s), retry %d in %.1fs", self.stage, exc, attempt, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _publish(self, blobs: list[bytes]) -> None:
        """Produce ``blobs`` and wait for the acks; the outbox in Redis keeps them until this returns.

        A broker that restarted empty has forgotten the idempotent producer (UnknownProducerIdError, or a
        fatal InitProducerId): kafka-python then fails the sends, or leaves them unfinished so that flush
        only times out. While the broker answers, the producer is closed and replaced, and the sends not
        acknowledged that are not on their partitions either (:meth:`_unpublished`: a timed-out send may
        still have landed, and a second copy on ``results`` would be a duplicate) are sent again;
        OutageError once nothing got through for the outage timeout.
        """
        deadline = time.monotonic() + self.config.broker_timeout_s
        todo, renewals = list(blobs), 0
        while todo:
            futures = []
            for blob in todo:
                topic, key, value = msgpack.unpackb(blob, raw=False)
                futures.append(self._producer.send(topic, key=key.encode(), value=value))
            error: Exception | None = None
            try:
                self._producer.flush(timeout=max(0.1, min(10.0, deadline - time.monotonic())))
            except Exception as exc:  # KafkaTimeoutError and friends: the outbox stays in Redis for a restart
                error = exc
            left = [(blob, fut) for blob, fut in zip(todo, futures) if not fut.is_done or fut.failed()]
            if not left:
                return
            if self.metrics:
                self.metrics.broker_error()
            error = error or left[0][1].exception
            if time.monotonic() > deadline:
                raise OutageError(f"could not publish to Kafka at {self.config.bootstrap} within "
                                  f"{self.config.broker_timeout_s:.0f}s: {error}")
            renewals += 1
            self._renew = True                      # the consumer is likely wedged the same way
            log.warning("%s worker: %d of %d sends not acknowledged (%s); replacing the producer and sending them "
                        "again (%d)", self.stage, len(left), len(todo), error, renewals)
            try:
                self._producer.close(timeout=1)
            except Exception:  # a producer in a fatal state may refuse to close cleanly
                log.debug("error closing the old producer", exc_info=True)
            todo = [blob for blob, _ in left]
            try:
                todo = self._unpublished(todo)      # the old producer is closed: nothing more of it lands
            except Exception as exc:                # the broker is not back yet: look again next round
                log.debug("could not check which sends landed: %s", exc)
            while True:                             # a working producer before the loop ends, even if all landed
                time.sleep(min(0.5 * renewals, 3.0))
                try:
                    self._producer = K.producer(self.config.bootstrap)
                    break
                except InfraError as exc:        # the broker is not back yet
                    if time.monotonic() > deadline:
                        raise OutageError(f"could not publish to Kafka at {self.config.bootstrap} within "
                                          f"{self.config.broker_timeout_s:.0f}s: {exc}") from None

    # -- the offset fence against a broker that comes back empty --------------------------------
    def _check_log(self, part: str) -> None:
        """Re-base ``part``'s fence if the broker's log is not the one it was fenced on.

        Checked before records at or below the applied offset are skipped (rare: a redelivery after a
        crash or rebalance, or a new log reusing offsets). The signal: the partition's end offset is at or
        below the applied offset, or the record now at that offset is not the one applied there (its key,
        kept in Redis with the offset). Each (partition, fence) is checked once.
        """
        fence = self.fence.get(part, -1)
        if fence < 0 or (part, fence) in self._verified:
            return
        same, why = self._same_log(part, fence)
        if same:
            self._verified.add((part, fence))
            return
        high = self._high_before.get(part, -1)
        lost = max(0, high - fence)
        log.warning("%s worker: partition %s: the broker's log is not the one fenced at offset %d (%s); "
                    "re-basing the fence to the new log (samples applied before stay applied, by sample id); "
                    "%s", self.stage, part, fence, why,
                    f"{lost} records the old log held past the fence were never applied and are lost with the "
                    f"broker's memory" if lost else "no record of the old log was left unapplied that this worker saw")
        self._retry(self.checkpoint.rebase, part)
        self.fence[part] = -1
        self._high[part] = self._high_before[part] = -1
        if self.metrics:
            self.metrics.rebase(lost)

    def _same_log(self, part: str, fence: int) -> tuple[bool, str]:
        """Read the record at ``fence`` back. Tansu's ListOffsets reports the last *batch*'s base offset + 1,
        not the high watermark, so the end offset alone cannot tell; a fetch response's high watermark can."""
        mark = self._retry(self.checkpoint.marks).get(part)
        tp = _tp(part)
        reader = K.consumer(self.config.bootstrap)
        try:
            reader.assign([tp])
            reader.seek(tp, fence)
            deadline = time.monotonic() + 10
            quiet_since = time.monotonic()
            while time.monotonic() < deadline:
                for records in reader.poll(timeout_ms=200, max_records=1).values():
                    quiet_since = time.monotonic()
                    for r in records:
                        if r.offset < fence:     # out of range, reset to the start: the log is shorter
                            return False, f"it starts over (offset {r.offset} came back for offset {fence})"
                        if r.offset == fence:
                            if mark is None:     # fenced before marks were kept: nothing to compare
                                return True, ""
                            same = record_mark(r) == mark
                            return same, "" if same else f"offset {fence} now holds another record"
                        return True, ""          # compacted or transactional gap: not evidence of a new log
                high = reader.highwater(tp)
                if high is not None and high <= fence and time.monotonic() - quiet_since > 1.0:
                    return False, f"its high watermark is {high}"
            return True, ""           # could not read it back in time: keep the fence (never re-apply)
        finally:
            reader.close()

    def _on_assigned(self, assigned) -> None:
        self.fence = self._retry(self.checkpoint.applied_offsets)
        parts = [f"{tp.topic}:{tp.partition}" for tp in assigned]
        leftovers = {p: self._retry(self.checkpoint.outbox, p) for p in parts}
        leftovers = {p: blobs for p, blobs in leftovers.items() if blobs}
        if leftovers:
            blobs = [b for part in sorted(leftovers) for b in leftovers[part]]
            missing = self._unpublished(blobs)
            log.warning("%s worker: a previous owner left %d outputs in the outbox of %s; %d were not yet "
                        "published, publishing them", self.stage, len(blobs), sorted(leftovers), len(missing))
            self._publish(missing)
            self._retry(self.checkpoint.clear_outbox, sorted(leftovers))

    def _unpublished(self, blobs: list[bytes], tail: int = 2000, horizon_s: float = 300.0) -> list[bytes]:
        """The outbox entries not found among the last messages of their partitions.

        A crash can fall between Kafka's ack and clearing the outbox; those entries are then already
        on their partition (the one the producer's murmur2 of the key chose), near its end: the crash was
        moments ago. Each partition holding entries is read backwards in growing chunks (``tail``, then
        twice as many, ...) until all of its entries are found, a chunk's records are older than
        ``horizon_s``, or its start. A fixed window was not enough: a cloud draining its backlog wrote
        over 2,000 results per partition between a device's crash and its restart (the chaos soak's
        42 duplicates).
        """
        from kafka import TopicPartition
        from kafka.partitioner.default import murmur2
        reader = K.consumer(self.config.bootstrap)
        entries: dict[tuple[str, int], set[tuple[bytes, bytes]]] = defaultdict(set)
        counts: dict[str, int] = {}
        decoded = []
        for blob in blobs:
            topic, key, value = msgpack.unpackb(blob, raw=False)
            if topic not in counts:
                counts[topic] = len(reader.partitions_for_topic(topic) or ()) or 1
            part = (murmur2(key.encode()) & 0x7FFFFFFF) % counts[topic]
            entries[(topic, part)].add((key.encode(), value))
            decoded.append((topic, part, key.encode(), value))
        present: set[tuple[str, int, bytes, bytes]] = set()
        oldest_ms = (time.time() - horizon_s) * 1000.0
        try:
            for (topic, part), want in entries.items():
                tp = TopicPartition(topic, part)
                reader.assign([tp])
                hi, chunk = reader.end_offsets([tp])[tp], max(tail, 4 * len(want))
                found: set[tuple[bytes, bytes]] = set()
                while hi > 0 and not want <= found:
                    lo = max(0, hi - chunk)
                    reader.seek(tp, lo)
                    earliest, deadline = None, time.monotonic() + 30
                    # Tansu's end offset is the last batch's base + 1: reading to it fetches that whole batch
                    while reader.position(tp) < hi and time.monotonic() < deadline:
                        for records in reader.poll(timeout_ms=200, max_records=5000).values():
                            for r in records:
                                found.add((r.key, r.value))
                                earliest = r.timestamp if earliest is None else min(earliest, r.timestamp)
                    if earliest is not None and earliest < oldest_ms:
                        break
                    hi, chunk = lo, chunk * 2
                present.update((topic, part, k, v) for k, v in want & found)
        finally:
            reader.close()
        return [blob for blob, entry in zip(blobs, decoded) if entry not in present]

    def close(self) -> None:
        if self._leases is not None:
            self._leases.close()
        for client in (self._consumer, self._producer):
            try:
                if client is not None:
                    client.close()
            except Exception:  # closing a client whose broker is gone may raise; nothing to save
                log.debug("error closing a Kafka client", exc_info=True)
        self._consumer = self._producer = None

