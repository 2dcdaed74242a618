"""Stage metrics: names, labels and values on a fresh registry, bounded labels, the HTTP endpoint."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from monitoring.metrics import StageMetrics, serve
from monitoring.synthetic import records

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`)")


def promtool_check(text: bytes) -> None:
    """`promtool check metrics` must accept the exposition (it also lints names, units and HELP)."""
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()


def result(**over):
    rec = {"id": "a", "tier": "device", "exit_layer": 2, "policy": {"name": "splitee", "version": 3, "ns": "splitee:x"},
           "cost": {"device": 2.0, "edge": 0.0, "offload": 0.0, "fee": 0.0, "total": 2.0}, "bytes_offloaded": 0,
           "decision": {"layer": 2, "confidence": 0.93}, "latency_ms": {"device": 3.0, "remote": 0.0, "total": 12.0},
           "embedding_distance": None}
    rec.update(over)
    return rec


def test_result_counts_samples_exits_cost_and_offloads():
    reg = CollectorRegistry()
    m = StageMetrics("cloud", reg)
    m.result(result())
    m.result(result(tier="cloud", exit_layer=6, bytes_offloaded=4096, embedding_distance=1.25,
                    cost={"device": 2.0, "edge": 0.0, "offload": 5.0, "fee": 0.5, "total": 7.5},
                    decision={"layer": 2, "confidence": 0.61}))
    m.result(result(decision={"layer": 0, "confidence": None}, tier="edge", exit_layer=6, bytes_offloaded=100,
                    cost={"device": 0.0, "edge": 3.0, "offload": 2.5, "fee": 0.0, "total": 5.5}))
    get = reg.get_sample_value
    base = {"stage": "cloud", "policy": "splitee"}
    assert get("exitflow_samples_total", base) == 3
    assert get("exitflow_exits_total", {**base, "tier": "device", "layer": "2"}) == 1
    assert get("exitflow_exits_total", {**base, "tier": "cloud", "layer": "6"}) == 1
    assert get("exitflow_exits_total", {**base, "tier": "edge", "layer": "6"}) == 1
    assert get("exitflow_cost_lambda_total", {**base, "component": "device"}) == 4.0
    assert get("exitflow_cost_lambda_total", {**base, "component": "edge"}) == 3.0
    assert get("exitflow_cost_lambda_total", {**base, "component": "offload"}) == 7.5
    assert get("exitflow_cost_lambda_total", {**base, "component": "fee"}) == 0.5
    assert get("exitflow_offloads_total", {**base, "target": "cloud"}) == 1
    assert get("exitflow_offloads_total", {**base, "target": "edge"}) == 1
    assert get("exitflow_offload_bytes_total", base) == 4196
    # confidence is observed only where the policy decided at an exit (not for layer 0)
    assert get("exitflow_decision_confidence_count", base) == 2
    assert get("exitflow_decision_confidence_bucket", {**base, "le": "0.65"}) == 1
    assert get("exitflow_decision_confidence_bucket", {**base, "le": "0.95"}) == 2
    assert get("exitflow_decision_confidence_sum", base) == pytest.approx(1.54)
    assert get("exitflow_embedding_distance", {"stage": "cloud"}) == 1.25
    assert get("exitflow_result_latency_seconds_count", {"stage": "cloud"}) == 3
    assert get("exitflow_result_latency_seconds_sum", {"stage": "cloud"}) == pytest.approx(0.036)


def test_the_other_methods():
    reg = CollectorRegistry()
    m = StageMetrics("device", reg)
    m.latency(0.004)
    m.policy_info("splitee", 3, "splitee:abc")
    m.policy_info("dimee-adaptive", 4, "dimee-adaptive:def")  # a swap replaces the info
    m.arms("splitee", {1: 10, 3: 4}, {1: 0.5, 3: 0.75})
    m.dlq("decode")
    m.dlq("could_not_decode")   # the workers' longer kinds map onto the short ones
    m.dlq("free text from an exception that must not become a label")
    m.state_write(0.0007)
    m.lag("exitflow.samples", 1, 42)
    m.broker_down(True)
    m.broker_errors.inc()
    m.broker_error()
    m.batch(32)
    get = reg.get_sample_value
    s = {"stage": "device"}
    assert get("exitflow_stage_latency_seconds_count", s) == 1
    assert get("exitflow_stage_latency_seconds_bucket", {**s, "le": "0.005"}) == 1
    assert get("exitflow_policy_info", {**s, "name": "dimee-adaptive", "version": "4",
                                        "namespace": "dimee-adaptive:def"}) == 1
    assert get("exitflow_policy_info", {**s, "name": "splitee", "version": "3", "namespace": "splitee:abc"}) is None
    assert get("exitflow_policy_version", s) == 4
    assert get("exitflow_arm_pulls", {**s, "policy": "splitee", "arm": "3"}) == 4
    assert get("exitflow_arm_value", {**s, "policy": "splitee", "arm": "1"}) == 0.5
    assert get("exitflow_dlq_total", {**s, "reason": "decode"}) == 2
    assert get("exitflow_dlq_total", {**s, "reason": "other"}) == 1
    assert get("exitflow_state_write_seconds_count", s) == 1
    assert get("exitflow_consumer_lag_records", {**s, "topic": "exitflow.samples", "partition": "1"}) == 42
    assert get("exitflow_broker_up", s) == 0
    assert get("exitflow_broker_errors_total", s) == 2
    assert get("exitflow_batch_records_bucket", {**s, "le": "32.0"}) == 1
    m.broker_down(False)
    assert get("exitflow_broker_up", s) == 1


def test_stages_share_a_registry_and_labels_stay_bounded():
    reg = CollectorRegistry()
    device, edge = StageMetrics("device", reg), StageMetrics("edge", reg)
    device.result(result())
    edge.result(result(tier="edge", exit_layer=999))
    for i in range(40):
        device.result(result(policy={"name": f"p{i}", "version": 1, "ns": "x"}))
    get = reg.get_sample_value
    assert get("exitflow_samples_total", {"stage": "edge", "policy": "splitee"}) == 1
    assert get("exitflow_exits_total", {"stage": "edge", "policy": "splitee", "tier": "edge", "layer": "other"}) == 1
    policies = {s.labels["policy"] for metric in reg.collect() if metric.name == "exitflow_samples"
                for s in metric.samples}
    assert len(policies) <= 33 and "other" in policies
    assert get("exitflow_samples_total", {"stage": "device", "policy": "other"}) == 40 - 31


def test_own_registry_has_process_metrics():
    m = StageMetrics("device")
    assert m.registry.get_sample_value("process_cpu_seconds_total") is not None


@needs_promtool
def test_stage_endpoint_passes_promtool():
    reg = CollectorRegistry()
    m = StageMetrics("device", reg)
    for r, _ in records(50, shift_at=25):
        m.result(r)
    m.latency(0.003)
    m.policy_info("splitee", 1, "splitee:x")
    m.arms("splitee", {1: 3}, {1: 0.5})
    m.dlq("schema")
    m.state_write(0.001)
    m.lag("t", 0, 3)
    m.batch(8)
    server = serve(reg, 0)
    try:
        body = urllib.request.urlopen(server.url, timeout=5).read()
    finally:
        server.stop()
    assert b"exitflow_samples_total" in body
    promtool_check(body)
    promtool_check(generate_latest(StageMetrics("edge").registry))  # with process/platform collectors
