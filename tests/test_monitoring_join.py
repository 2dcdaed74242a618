"""The label join (late, early and missing labels, bounded memory) and the monitor's aggregate."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitoring.aggregate import Aggregate
from monitoring.join import LabelJoin
from monitoring.synthetic import records


def test_late_and_early_labels_both_join():
    j = LabelJoin(capacity=10, max_age_s=60)
    assert j.add_result("late", {"prediction": 1}, now=0) == []
    assert j.add_label("early", 0, now=1) == []
    (pair,) = j.add_label("late", 1, now=30)
    assert pair.sample_id == "late" and pair.correct
    (pair,) = j.add_result("early", {"prediction": 1}, now=31)
    assert pair.label == 0 and not pair.correct
    assert (j.joined, j.missing, j.orphans, len(j)) == (2, 0, 0, 0)


def test_missing_labels_expire_by_age():
    j = LabelJoin(capacity=100, max_age_s=10)
    j.add_result("never", {"prediction": 0}, now=0)
    j.add_label("no-result", 1, now=5)
    j.expire(now=12)
    assert (j.missing, j.orphans, len(j)) == (1, 0, 1)
    j.expire(now=16)
    assert (j.missing, j.orphans, len(j)) == (1, 1, 0)
    assert j.add_label("never", 0, now=17) == []  # too late: it was forgotten, and it waits itself now


def test_capacity_evicts_the_oldest():
    j = LabelJoin(capacity=3, max_age_s=1e9)
    for i in range(10):
        j.add_result(str(i), {"prediction": 0}, now=i)
    assert j.pending_results == 3 and j.missing == 7
    assert j.add_label("0", 0, now=11) == [] and len(j.add_label("9", 0, now=11)) == 1


def test_duplicates_are_counted_not_joined_twice():
    j = LabelJoin()
    j.add_result("a", {"prediction": 1}, now=0)
    j.add_result("a", {"prediction": 1}, now=0)
    assert j.duplicates == 1 and len(j.add_label("a", 1, now=1)) == 1 and len(j) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["result", "label", "tick"]), st.integers(0, 30), st.floats(0, 5)),
                max_size=300),
       st.integers(1, 8))
def test_memory_stays_bounded_and_everything_is_accounted(ops, capacity):
    j = LabelJoin(capacity=capacity, max_age_s=20)
    now = 0.0
    results = labels = 0
    for kind, key, dt in ops:
        now += dt
        if kind == "result":
            results += 1
            j.add_result(f"r{key}", {"prediction": key % 2}, now)
        elif kind == "label":
            labels += 1
            j.add_label(f"r{key}", key % 2, now)
        else:
            j.expire(now)
        assert j.pending_results <= capacity and j.pending_labels <= capacity
    # every record is joined (counted on both sides), waiting, dropped, or a duplicate
    assert results + labels == 2 * j.joined + j.pending_results + j.pending_labels + j.missing + j.orphans + j.duplicates


def test_aggregate_totals_equal_the_records():
    pairs = records(500, shift_at=300, swap_at=250, seed=5)
    agg = Aggregate(windows=(100,))
    for res, label in pairs[:400]:
        agg.add_result(res, now=0)
    agg.add_result(pairs[0][0], now=0)  # a redelivered result is not counted twice
    for res, label in pairs:
        agg.add_label(label, now=1)
    for res, label in pairs[400:]:  # results after their labels
        agg.add_result(res, now=2)
    s = agg.snapshot(series_s=900)
    results = [r for r, _ in pairs]
    assert s["samples"] == 500 and s["duplicates"] == 1
    assert s["cost"]["total"] == pytest.approx(sum(r["cost"]["total"] for r in results))
    assert s["cost"]["offload"] == pytest.approx(sum(r["cost"]["offload"] for r in results))
    assert s["offloads"] == sum(r["tier"] != "device" for r in results)
    assert s["bytes_offloaded"] == sum(r["bytes_offloaded"] for r in results)
    for tier in ("device", "edge", "cloud"):
        expected = {}
        for r in results:
            if r["tier"] == tier:
                expected[str(r["exit_layer"])] = expected.get(str(r["exit_layer"]), 0) + 1
        assert s["exits"][tier] == expected
    correct = [r["prediction"] == lab["label"] for r, lab in pairs]
    assert s["accuracy"]["labelled"] == 500 and s["accuracy"]["correct"] == sum(correct)
    assert s["accuracy"]["last_100"] == pytest.approx(sum(correct[400:]) / 100)  # the last 100 joined
    assert sum(b["n"] for b in s["series"]) == 500
    assert [(w["version"], w["seq"]) for w in s["policy"]["swaps"]] == [(1, 0), (2, 250)]
    assert s["drift"]["total"] > 0 and all(e["seq"] >= 300 for e in s["drift"]["events"])


def test_series_memory_is_bounded():
    agg = Aggregate(series_s=60)
    for res, _ in records(2000, rate=5.0):  # 400 s of records
        agg.add_result(res, now=0)
    assert len(agg._series) <= 61
    assert agg.samples == 2000
