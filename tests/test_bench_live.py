"""The latency split of bench latency: each stage from the timestamps a result carries."""

from __future__ import annotations

import pytest

from bench.live import breakdown, percentiles


def _result(tier, ts_remote=None, remote_ms=0.0):
    return {"ts_in": 100.0, "ts_device": 100.010, "ts_remote": ts_remote, "tier": tier,
            "layers": {"device": 2, "edge": 0, "cloud": 4 if tier == "cloud" else 0},
            "latency_ms": {"device": 20.0, "remote": remote_ms}}


def test_a_device_exit_splits_into_queue_device_and_publish():
    parts = breakdown(_result("device"), arrived=100.045)
    assert parts == pytest.approx({"total": 45.0, "queue": 10.0, "device": 20.0, "hop": 0.0, "remote": 0.0,
                                   "publish": 15.0})
    assert sum(parts[s] for s in ("queue", "device", "hop", "remote", "publish")) == pytest.approx(parts["total"])


def test_an_offload_adds_the_hop_and_the_remote_compute():
    parts = breakdown(_result("cloud", ts_remote=100.050, remote_ms=30.0), arrived=100.100)
    assert parts == pytest.approx({"total": 100.0, "queue": 10.0, "device": 20.0, "hop": 20.0, "remote": 30.0,
                                   "publish": 20.0})


def test_a_result_without_stage_timestamps_has_only_its_total():
    result = {**_result("device"), "ts_device": None}
    assert breakdown(result, arrived=100.2) == pytest.approx({"total": 200.0})
    assert percentiles([1, 2, 3, 4])["p50"] == pytest.approx(2.5)
