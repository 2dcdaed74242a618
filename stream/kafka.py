"""Thin kafka-python wrappers with the settings measured to work well against Tansu and Kafka.

* consumers: short group session (2 s; Tansu holds a join for half the session timeout), fetch wait
  10 ms (the default 500 ms adds ≈150 ms per hop), manual commits only;
* producers: linger 10 ms with 64 KB batches (linger 0 makes the broker burn a core), acks=all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from stream.errors import InfraError

log = logging.getLogger(__name__)

CONSUMER_DEFAULTS = dict(
    enable_auto_commit=False,
    auto_offset_reset="earliest",
    session_timeout_ms=3000,
    heartbeat_interval_ms=500,
    fetch_max_wait_ms=10,
    max_poll_interval_ms=30_000,   # also bounds how long a rebalance can wait for a member
    request_timeout_ms=30_000,
)
PRODUCER_DEFAULTS = dict(
    acks="all",
    linger_ms=10,
    batch_size=64 * 1024,
    max_request_size=8 * 1024 * 1024,
    request_timeout_ms=30_000,
    retries=10,
)


def producer(bootstrap: str, **overrides):
    from kafka import KafkaProducer
    try:
        return KafkaProducer(bootstrap_servers=bootstrap, **{**PRODUCER_DEFAULTS, **overrides})
    except Exception as exc:
        raise InfraError(f"cannot connect a producer to Kafka at {bootstrap}: {exc}") from None


def consumer(bootstrap: str, topics: Iterable[str] = (), group: str | None = None, **overrides):
    """A consumer subscribed to ``topics`` in ``group`` (or unsubscribed, for ``assign``)."""
    from kafka import KafkaConsumer
    try:
        cons = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, **{**CONSUMER_DEFAULTS, **overrides})
    except Exception as exc:
        raise InfraError(f"cannot connect a consumer to Kafka at {bootstrap}: {exc}") from None
    topics = list(topics)
    if topics:
        cons.subscribe(topics)
    return cons


def create_topics(bootstrap: str, topics: Iterable[str], partitions: int = 1, timeout: float = 30.0) -> None:
    """Create the topics that do not exist yet (idempotent)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
            break
        except Exception as exc:
            if time.monotonic() > deadline:
                raise InfraError(f"cannot reach Kafka at {bootstrap} to create topics: {exc}") from None
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
        wanted = [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics if t not in existing]
        if wanted:
            try:
                admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The end offset of every partition of ``topic``."""
    from kafka import TopicPartition
    cons = consumer(bootstrap)
    try:
        parts = cons.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        return {tp.partition: off for tp, off in cons.end_offsets(tps).items()}
    finally:
        cons.close()


def read_all(bootstrap: str, topic: str, idle_s: float = 1.0, timeout: float = 60.0):
    """Every record of ``topic`` from the beginning to its current end (for tests, reports, recovery)."""
    from kafka import TopicPartition
    cons = consumer(bootstrap)
    try:
        parts = cons.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        cons.assign(tps)
        cons.seek_to_beginning(*tps)
        ends = cons.end_offsets(tps)
        out = []
        deadline = time.monotonic() + timeout
        while any(cons.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            for records in cons.poll(timeout_ms=int(idle_s * 1000), max_records=5000).values():
                out.extend(records)
        return out
    finally:
        cons.close()
