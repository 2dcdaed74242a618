"""The loop every stage worker shares: poll a batch, process it, commit it atomically, then publish.

Batch lifecycle (a failed step blocks the Kafka commit, so Kafka redelivers):

1. poll up to ``batch_size`` records; drop those at or below the partition's applied offset in Redis
   (they were applied before a crash; their outputs sit in the outbox, see below);
2. ``process`` them (stage specific) into per-sample :class:`SampleCommit` s: state deltas + outputs;
3. one Lua call applies deltas once per sample id, appends outputs to the partition's outbox in Redis
   and raises the applied offsets (:mod:`stream.checkpoint`);
4. produce the outbox to Kafka and wait for the acks, then clear it;
5. commit the Kafka offsets.

On partition assignment the new owner first re-publishes whatever outbox a crashed owner left.
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
from stream.checkpoint import Checkpointer, SampleCommit
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
    stall_s: float = 10.0                     # rejoin after holding no partition this long while inputs wait
    exit_process_on_outage: bool = False      # a CLI worker leaves the process then (see StageWorker._watchdog)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    max_message_bytes: int = messages.MAX_MESSAGE_BYTES
    max_text_chars: int = messages.MAX_TEXT_CHARS

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


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


def part_key(record) -> str:
    return f"{record.topic}:{record.partition}"


class StageWorker:
    """Base of the device, edge and cloud workers: subclasses set ``stage``/``inputs`` and ``process``.

    Group membership survives the embedded Tansu coordinator (0.6), which reports every failed offset
    commit as UNKNOWN_MEMBER_ID, sends the group back to rebalancing on every LeaveGroup and can leave a
    member without partitions: a failed commit, or no partition for ``stall_s`` while the inputs hold
    records nobody applies, makes the worker rejoin as a new member (``consumer_rejoins`` metric). The
    Redis fence (applied offsets per partition) makes the redelivery that follows harmless.
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
        self.processed = 0
        self._stop = threading.Event()
        self._consumer = None
        self._producer = None
        self._last_probe = 0.0
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
        from kafka import ConsumerRebalanceListener

        worker = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                pass

            def on_partitions_assigned(self, assigned):
                worker._on_assigned(assigned)

        self._listener = Listener()
        self._producer = K.producer(self.config.bootstrap)
        self._join()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
        log.info("%s worker: group %s, inputs %s", self.stage, self.group, self.inputs())
        if self.config.exit_process_on_outage:
            threading.Thread(target=self._watchdog, name="broker-watchdog", daemon=True).start()
        last_data = time.monotonic()
        try:
            while not self._stop.is_set():
                polled = self._consumer.poll(timeout_ms=self.config.poll_ms, max_records=self.config.batch_size)
                records = [r for batch in polled.values() for r in batch]
                if not records:
                    if not self._broker_ok():
                        return 3
                    if self._stalled():
                        self._rejoin("stalled")
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

    def _watchdog(self) -> None:
        """Exit the process (code 3) once the broker has been unreachable past the outage timeout.

        kafka-python's poll can block indefinitely when the broker dies mid-fetch, so the main loop
        cannot be relied on to notice; everything a batch changed is committed atomically or not at
        all, so leaving abruptly loses nothing.
        """
        while not self._stop.wait(1.0):
            if not self._broker_ok():
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
            return True
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
        if self.metrics:
            self.metrics.broker_down(down)

    def _handle(self, records: list) -> None:
        fresh = [r for r in records if r.offset > self.fence.get(part_key(r), -1)]
        commits = self._retry(self.process, fresh) if fresh else []
        offsets: dict[str, int] = {}
        for r in records:
            offsets[part_key(r)] = max(offsets.get(part_key(r), -1), r.offset)
        started = time.perf_counter()
        dups = self._commit(commits, offsets)
        if self.metrics:
            self.metrics.state_write(time.perf_counter() - started)
        if dups is None:  # an earlier attempt went through before Redis dropped the connection
            outputs = [b for part in sorted(offsets) for b in self.checkpoint.outbox(part)]
            dups = set()
        else:
            outputs = [out for i, c in enumerate(commits) if i not in dups for out in c.outputs]
        extra = [dlq_envelope(self.topics, self.stage, c.record, f"duplicate sample id {c.sample_id!r}: "
                              f"already processed by stage {self.stage}") for i, c in enumerate(commits)
                 if i in dups and c.record is not None]
        self._publish(outputs + extra)
        self._retry(self.checkpoint.clear_outbox, sorted(offsets))
        self.fence.update(offsets)
        self._commit_kafka()
        self.processed += len(fresh)
        if self.metrics:
            self.metrics.batch(len(fresh))
            for _ in dups:
                self.metrics.dlq("duplicate")
            self._report_lag()

    # -- consumer-group recovery (the embedded Tansu coordinator, see the class docstring) ---------
    def _join(self) -> None:
        """A fresh consumer (new member id) subscribed to the inputs."""
        self._consumer = K.consumer(self.config.bootstrap, group=self.group, max_poll_records=self.config.batch_size)
        self._consumer.subscribe(self.inputs(), listener=self._listener)
        self._unassigned_since: float | None = None
        self._stall_mark: tuple | None = None
        self._last_stall_check = 0.0

    def _rejoin(self, reason: str) -> None:
        """Leave the group and join it again as a new member; redelivered records meet the Redis fence."""
        log.warning("%s worker: rejoining group %s (%s)", self.stage, self.group, reason)
        if self.metrics:
            self.metrics.rejoin(reason)
        try:
            self._consumer.close(autocommit=False)
        except Exception:  # the old member may already be gone on the broker's side
            log.debug("error closing the old consumer", exc_info=True)
        self._join()

    def _commit_kafka(self) -> None:
        """Commit the consumer's offsets; a failed commit (Tansu reports every one as UNKNOWN_MEMBER_ID,
        a rebalance as ILLEGAL_GENERATION) means rejoin: Redis holds the applied offsets, so nothing is lost."""
        from kafka.errors import CommitFailedError, KafkaError

        try:
            self._consumer.commit()
        except (CommitFailedError, KafkaError) as exc:
            log.warning("%s worker: offset commit failed (%s)", self.stage, exc)
            self._rejoin("commit_failed")

    def _stalled(self) -> bool:
        """True when this member has held no partition for ``stall_s`` while the inputs have records
        nobody applies (the coordinator left it out of the assignment). An idle member whose peers are
        making progress is not stalled. Checked at most every 2 s."""
        now = time.monotonic()
        if self._consumer.assignment():
            self._unassigned_since = self._stall_mark = None
            return False
        if self._unassigned_since is None:
            self._unassigned_since = now
        if now - self._last_stall_check < 2.0:
            return False
        self._last_stall_check = now
        from kafka import TopicPartition

        tps = [TopicPartition(t, p) for t in self.inputs() for p in sorted(self._consumer.partitions_for_topic(t) or ())]
        if not tps:
            return False
        try:
            ends = self._consumer.end_offsets(tps)
        except Exception:  # the broker is down or busy: the outage watchdog handles that, not a rejoin
            return False
        applied = self._retry(self.checkpoint.applied_offsets)
        behind = tuple(sorted((f"{tp.topic}:{tp.partition}", applied.get(f"{tp.topic}:{tp.partition}", -1))
                              for tp in tps if ends.get(tp, 0) - 1 > applied.get(f"{tp.topic}:{tp.partition}", -1)))
        if not behind or behind != self._stall_mark:
            self._stall_mark = behind or None          # progress (or nothing to do): start the clock again
            self._unassigned_since = now
            return False
        return now - self._unassigned_since > self.config.stall_s

    def _report_lag(self) -> None:
        """Consumer lag per assigned partition, from the high watermark the last fetch returned."""
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is not None:
                self.metrics.lag(tp.topic, tp.partition, max(0, high - self._consumer.position(tp)))

    def _commit(self, commits: list[SampleCommit], offsets: dict[str, int]) -> set[int] | None:
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
            return self.checkpoint.commit(commits, offsets)

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
        futures = []
        for blob in blobs:
            topic, key, value = msgpack.unpackb(blob, raw=False)
            futures.append(self._producer.send(topic, key=key.encode(), value=value))
        try:
            self._producer.flush(timeout=self.config.broker_timeout_s)
        except Exception as exc:  # KafkaTimeoutError and friends: the outbox stays in Redis for a restart
            raise OutageError(f"could not publish to Kafka at {self.config.bootstrap} within "
                              f"{self.config.broker_timeout_s:.0f}s: {exc}") from None
        for fut in futures:
            if fut.failed():
                raise OutageError(f"could not publish to Kafka at {self.config.bootstrap}: {fut.exception}")

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

    def _unpublished(self, blobs: list[bytes], tail: int = 2000) -> list[bytes]:
        """The outbox entries not found among the last messages of their topics.

        A crash can fall between Kafka's ack and clearing the outbox; those entries are then already
        on their topic, right at its end (the crash was moments ago), so a bounded look at the tail of
        each partition tells them apart from the ones never sent.
        """
        from kafka import TopicPartition
        wanted: dict[str, set[tuple[bytes, bytes]]] = defaultdict(set)
        for blob in blobs:
            topic, key, value = msgpack.unpackb(blob, raw=False)
            wanted[topic].add((key.encode(), value))
        present: set[tuple[str, bytes, bytes]] = set()
        reader = K.consumer(self.config.bootstrap)
        try:
            for topic, entries in wanted.items():
                tps = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]
                if not tps:
                    continue
                reader.assign(tps)
                ends = reader.end_offsets(tps)
                window = max(tail, 4 * len(entries))
                for tp in tps:
                    reader.seek(tp, max(0, ends[tp] - window))
                deadline = time.monotonic() + 30
                while any(reader.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
                    for records in reader.poll(timeout_ms=200, max_records=5000).values():
                        present.update((r.topic, r.key, r.value) for r in records)
        finally:
            reader.close()
        out = []
        for blob in blobs:
            topic, key, value = msgpack.unpackb(blob, raw=False)
            if (topic, key.encode(), value) not in present:
                out.append(blob)
        return out

    def close(self) -> None:
        for client in (self._consumer, self._producer):
            try:
                if client is not None:
                    client.close()
            except Exception:  # closing a client whose broker is gone may raise; nothing to save
                log.debug("error closing a Kafka client", exc_info=True)
        self._consumer = self._producer = None

