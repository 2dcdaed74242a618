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
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    max_message_bytes: int = messages.MAX_MESSAGE_BYTES
    max_text_chars: int = messages.MAX_TEXT_CHARS

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


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


def reason_kind(reason: str) -> str:
    """A bounded label for a DLQ reason (metrics never carry free text)."""
    for kind in ("duplicate", "schema version", "tensor", "exceeds the limit", "lacks required", "must be",
                 "could not decode", "empty", "policy"):
        if kind in reason:
            return kind.replace(" ", "_")
    return "other"


def part_key(record) -> str:
    return f"{record.topic}:{record.partition}"


class StageWorker:
    """Base of the device, edge and cloud workers: subclasses set ``stage``/``inputs`` and ``process``."""

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

        self._producer = K.producer(self.config.bootstrap)
        self._consumer = K.consumer(self.config.bootstrap, group=self.group,
                                    max_poll_records=self.config.batch_size)
        self._consumer.subscribe(self.inputs(), listener=Listener())
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
        log.info("%s worker: group %s, inputs %s", self.stage, self.group, self.inputs())
        last_data = time.monotonic()
        try:
            while not self._stop.is_set():
                polled = self._consumer.poll(timeout_ms=self.config.poll_ms, max_records=self.config.batch_size)
                records = [r for batch in polled.values() for r in batch]
                if not records:
                    idle = self.config.idle_exit_s
                    if idle is not None and time.monotonic() - last_data > idle:
                        log.info("%s worker: idle for %.0fs, stopping", self.stage, idle)
                        break
                    continue
                last_data = time.monotonic()
                self._handle(records)
            return 0
        finally:
            self.close()

    def _handle(self, records: list) -> None:
        fresh = [r for r in records if r.offset > self.fence.get(part_key(r), -1)]
        commits = self.process(fresh) if fresh else []
        offsets: dict[str, int] = {}
        for r in records:
            offsets[part_key(r)] = max(offsets.get(part_key(r), -1), r.offset)
        started = time.perf_counter()
        dups = self.checkpoint.commit(commits, offsets)
        if self.metrics:
            self.metrics.state_write(time.perf_counter() - started)
        outputs = [out for i, c in enumerate(commits) if i not in dups for out in c.outputs]
        extra = [dlq_envelope(self.topics, self.stage, c.record, f"duplicate sample id {c.sample_id!r}: "
                              f"already processed by stage {self.stage}") for i, c in enumerate(commits)
                 if i in dups and c.record is not None]
        self._publish(outputs + extra)
        self.checkpoint.clear_outbox(sorted(offsets))
        self._consumer.commit()
        self.fence.update(offsets)
        self.processed += len(fresh)
        if self.metrics:
            self.metrics.batch(len(fresh))
            for _ in dups:
                self.metrics.dlq("duplicate")

    def _publish(self, blobs: list[bytes]) -> None:
        futures = []
        for blob in blobs:
            topic, key, value = msgpack.unpackb(blob, raw=False)
            futures.append(self._producer.send(topic, key=key.encode(), value=value))
        self._producer.flush(timeout=self.config.broker_timeout_s)
        for fut in futures:
            if fut.failed():
                raise InfraError(f"{self.stage} worker: could not publish to Kafka: {fut.exception}")

    def _on_assigned(self, assigned) -> None:
        self.fence = self.checkpoint.applied_offsets()
        parts = [f"{tp.topic}:{tp.partition}" for tp in assigned]
        leftovers = {p: self.checkpoint.outbox(p) for p in parts}
        leftovers = {p: blobs for p, blobs in leftovers.items() if blobs}
        if leftovers:
            log.warning("%s worker: re-publishing %d outputs a previous owner left in the outbox of %s",
                        self.stage, sum(map(len, leftovers.values())), sorted(leftovers))
            self._publish([b for blobs in leftovers.values() for b in blobs])
            self.checkpoint.clear_outbox(sorted(leftovers))

    def close(self) -> None:
        for client in (self._consumer, self._producer):
            try:
                if client is not None:
                    client.close()
            except Exception:  # closing a client whose broker is gone may raise; nothing to save
                log.debug("error closing a Kafka client", exc_info=True)
        self._consumer = self._producer = None


def group_by(items, key):
    out = defaultdict(list)
    for item in items:
        out[key(item)].append(item)
    return out


def pid_tag() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"
