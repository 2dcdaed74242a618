"""Discounted and sliding-window SplitEE: bucketed statistics against numpy, shared state, drift cuts."""

import math

import numpy as np
import pytest

from stream.costs import splitee

from policies.base import Observation, StateView
from policies.engine import feedback_event, learn_feedback, remote_trace, run_device, run_remote
from policies.evaluate import MatrixRunner, stream, synthetic_matrix
from policies.registry import build, parameters, registry
from policies.splitee import DISCOUNT_TAIL, SplitEE, SplitEEDrift
from policies.state import MemoryStore, flush

LAYERS = 4


def reference(pulls, t, *, bucket, discount=1.0, window=0):
    """Straight from the definitions: pull number τ (1-based) lies in bucket (τ − 1) // k; at t pulls the
    current bucket is B = t // k; bucket b weighs γ^(k(B − b)) while that is >= the tail (discount) and
    while B − b < ceil(W / k) (window). Returns weighted count, sum and sum of squares per arm, and ticks."""
    k = bucket
    big_b = t // k
    horizon = math.inf
    if window:
        horizon = math.ceil(window / k)
    if discount < 1:
        horizon = min(horizon, int(math.log(DISCOUNT_TAIL) / (k * math.log(discount))) + 1)
    weight = lambda b: discount ** (k * (big_b - b)) if big_b - b < horizon else 0.0  # noqa: E731
    n, s, v = np.zeros(LAYERS), np.zeros(LAYERS), np.zeros(LAYERS)
    for tau, arm, r in pulls:
        w = weight((tau - 1) // k)
        n[arm - 1] += w
        s[arm - 1] += w * r
        v[arm - 1] += w * r * r
    ticks = sum(weight((tau - 1) // k) for tau in range(1, t + 1))
    return n, s, v, ticks


def always_exit_matrix(n, seed):
    """Every exit confident enough (C >= 0.9 > α): every reward is known at once, r = C_i − μ γ_i."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(0.9, 1.0, (n, LAYERS))
    probs = np.stack([c, 1 - c], -1).astype(np.float32)
    from stream.matrix import ConfidenceMatrix
    return ConfidenceMatrix(probs=probs, labels=np.zeros(n, np.int64), ids=[f"x{i}" for i in range(n)])


@pytest.mark.parametrize("settings", [{"discount": 0.97, "bucket": 3}, {"window": 10, "bucket": 4},
                                      {"discount": 0.9, "window": 12, "bucket": 1}, {"discount": 0.99, "bucket": 1}])
def test_bucketed_statistics_match_numpy_after_every_prefix(settings):
    m = always_exit_matrix(120, seed=3)
    p = SplitEE(cost=splitee(offload=2.0), num_layers=LAYERS, alpha=0.8, alpha_rule="fixed", **settings)
    store, ns = MemoryStore(), p.namespace()
    pulls = []
    for t in range(len(m)):                     # one sample per batch: the reference sees every prefix
        view = StateView(store.snapshot(ns))
        out = run_device(p, view, [Observation(m.ids[t], LAYERS)], MatrixRunner(m.probs, [t]))[0]
        flush(store, ns, view)
        arm = out.context["arm"]
        pulls.append((t + 1, arm, float(m.probs[t, arm - 1].max()) - 0.1 * p.arm_cost(arm, "device")))
        stats = p.stats(StateView(store.snapshot(ns)))
        n, s, v, ticks = reference(pulls, t + 1, **{"discount": 1.0, "window": 0, **settings})
        got = np.array([[stats.number(f"{f}{i}") for i in range(1, LAYERS + 1)] for f in "nsv"])
        assert np.allclose(got, [n, s, v], atol=1e-12), f"after {t + 1} samples"
        assert stats.number("t") == pytest.approx(ticks)
        assert store.snapshot(ns)["t"] == t + 1          # the clock stays all-time


def test_the_combined_sums_are_the_same_mid_batch_as_from_scratch():
    """The per-view running sums (updated with the deltas queued since) equal a full recomputation."""
    m = always_exit_matrix(200, seed=4)
    p = SplitEE(cost=splitee(), num_layers=LAYERS, alpha=0.8, alpha_rule="fixed", discount=0.95, bucket=5)
    fresh = SplitEE(cost=splitee(), num_layers=LAYERS, alpha=0.8, alpha_rule="fixed", discount=0.95, bucket=5)
    store, ns = MemoryStore(), p.namespace()
    for start in range(0, 192, 16):
        view = StateView(store.snapshot(ns))
        rows = list(range(start, start + 16))
        for r in rows:
            run_device(p, view, [Observation(m.ids[r], LAYERS)], MatrixRunner(m.probs, [r]))
            a, b = p.stats(view), fresh.stats(view)
            fresh.__dict__.pop("_cache", None)
            assert {k: a.number(k) for k in b} == pytest.approx({k: b.number(k) for k in b})
        flush(store, ns, view)


def test_plain_splitee_is_unchanged_without_discount_or_window():
    plain = build("splitee", cost=splitee(), num_layers=LAYERS)
    assert not plain.bucketed and set(plain.params()).isdisjoint({"discount", "window", "bucket"})
    m = synthetic_matrix(150, layers=LAYERS, seed=5)
    store = MemoryStore()
    stream(plain, m, np.arange(150), store=store)
    assert not any("@" in k for k in store.snapshot(plain.namespace()))
    assert plain.on_drift(StateView()) == {} and plain.stale_fields({"n1": 1.0}) == []
    assert build("splitee", {"discount": "0.99"}, cost=splitee(), num_layers=LAYERS).namespace() != plain.namespace()


def run_shared(workers, m, order, batch=8):
    """Batches dealt round-robin to ``workers`` (policy instances) over one MemoryStore; the offloads of a
    batch get their feedback learned by the *next* worker, one batch later, as the cloud's feedback would."""
    store, ns = MemoryStore(), workers[0].namespace()
    waiting, arms = [], []
    for j, start in enumerate(range(0, len(order), batch)):
        p = workers[j % len(workers)]
        rows = [int(r) for r in order[start:start + batch]]
        view = StateView(store.snapshot(ns))
        outs = run_device(p, view, [Observation(m.ids[r], LAYERS) for r in rows], MatrixRunner(m.probs, rows))
        learn_feedback(p, view, waiting)
        off = [i for i, o in enumerate(outs) if o.offloaded]
        remote = run_remote([outs[i].observation.layer for i in off], [outs[i].action for i in off], LAYERS,
                            MatrixRunner(m.probs, [rows[i] for i in off]))
        waiting = [feedback_event(outs[i].observation.sample_id, outs[i].context, remote_trace(outs[i].trace, rem),
                                  rem.feedback()) for i, rem in zip(off, remote)]
        keyed = view.take_keyed()
        for key, delta in keyed:
            store.apply(ns, delta, dedup=f"{ns}:{key}")
        for key, delta in keyed:                        # a redelivered batch changes nothing
            assert not store.apply(ns, delta, dedup=f"{ns}:{key}")
        arms += [o.context["arm"] for o in outs]
    view = StateView(store.snapshot(ns))       # the feedback still in flight at the end
    learn_feedback(workers[0], view, waiting)
    flush(store, ns, view)
    return store.snapshot(ns), arms


@pytest.mark.parametrize("name", ["splitee-drift", "splitee-s-drift"])
def test_two_workers_sharing_one_store_learn_what_one_worker_learns(name):
    m = synthetic_matrix(400, layers=LAYERS, seed=6)
    order = np.random.default_rng(1).permutation(400)
    make = lambda: build(name, {"bucket": "20", "discount": "0.99"}, cost=splitee(), num_layers=LAYERS)  # noqa: E731
    one, arms_one = run_shared([make()], m, order)
    two, arms_two = run_shared([make(), make()], m, order)
    assert arms_one == arms_two
    assert one.keys() == two.keys() and any("@" in k for k in one)
    for key in one:
        assert np.allclose(one[key], two[key]), key
    assert all(abs(one[f"p{i}"]) < 1e-9 for i in range(1, LAYERS + 1) if f"p{i}" in one)  # nothing left in flight


def test_a_drift_cut_forgets_older_buckets_once_even_if_applied_twice():
    p = SplitEE(cost=splitee(), num_layers=LAYERS, alpha=0.8, alpha_rule="fixed", window=100, bucket=10)
    state = {"t": 35.0, "n1@1": 5.0, "s1@1": 4.0, "n1@3": 1.0, "s1@3": 0.5, "n2@2": 2.0, "s2@2": 1.0}
    before = p.stats(StateView(state))
    assert before.number("n1") == 6.0 and before.number("n2") == 2.0
    store = MemoryStore()
    store.apply("ns", state)
    cut = p.on_drift(StateView(state))
    assert cut == {"cut@3": 1.0, "cuts": 1.0}
    store.apply("ns", cut, dedup="drift:a")
    once = p.stats(StateView(store.snapshot("ns")))
    store.apply("ns", p.on_drift(StateView(store.snapshot("ns"))), dedup="drift:b")   # a second worker's signal
    twice = p.stats(StateView(store.snapshot("ns")))
    assert once.number("n1") == twice.number("n1") == 1.0 and once.number("n2") == twice.number("n2") == 0.0
    assert once.number("t") == 5.0                     # only bucket 3's pulls count in the bonus now
    assert p.index(StateView(store.snapshot("ns")))[1] == math.inf   # arm 2 is played again
    assert set(p.stale_fields(store.snapshot("ns"))) == {"n1@1", "s1@1", "n2@2", "s2@2"}


def test_stale_fields_are_those_no_read_uses():
    p = SplitEE(cost=splitee(), num_layers=LAYERS, alpha=0.8, alpha_rule="fixed", window=20, bucket=10)
    state = {"t": 45.0, "n1@1": 1.0, "n1@2": 1.0, "n1@3": 1.0, "n1@4": 1.0, "s1@1": 0.5, "p1": 0.0}
    stale = p.stale_fields(state)
    assert stale == ["n1@1", "n1@2", "s1@1"]
    kept = {k: v for k, v in state.items() if k not in stale}
    assert p.index(StateView(kept)) == p.index(StateView(state))


def test_drift_presets_take_every_setting_of_their_base():
    classes = registry()
    for drift, base in (("splitee-drift", "splitee"), ("splitee-s-drift", "splitee-s")):
        assert set(parameters(classes[drift])) == set(parameters(classes[base]))
        p = build(drift, {"alpha": "0.7", "alpha_rule": "fixed", "window": "300"}, cost=splitee(), num_layers=LAYERS)
        assert p.alpha == 0.7 and p.window == 300 and p.bucketed
    d = SplitEEDrift(cost=splitee(), num_layers=LAYERS)
    assert (d.discount, d.window, d.bucket) == (0.9998, 0, 100) and d.horizon == 231


def test_settings_are_checked():
    from stream.errors import ConfigError
    with pytest.raises(ConfigError, match="discount must be in"):
        build("splitee", {"discount": "0"}, cost=splitee(), num_layers=LAYERS)
    with pytest.raises(ConfigError, match="bucket must be in"):
        build("splitee-drift", {"bucket": "0"}, cost=splitee(), num_layers=LAYERS)
