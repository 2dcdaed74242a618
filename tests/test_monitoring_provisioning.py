"""Prometheus/Grafana provisioning: configs pass promtool, the dashboard only names metrics that exist, and
a real Prometheus scraping a stage endpoint evaluates every dashboard expression to the numbers fed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from monitoring.metrics import StageMetrics, serve
from monitoring.synthetic import records

MON = Path(__file__).resolve().parent.parent / "monitoring"
DASHBOARD = MON / "grafana" / "dashboards" / "exitflow.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in dash["annotations"]["list"]]
    return [e.replace("$__rate_interval", "15s") for e in exprs]


def exported_names() -> set[str]:
    """Every sample name a stage and the monitor export (with _total/_bucket/… suffixes)."""
    from monitoring.service import Monitor
    reg = CollectorRegistry()
    m = StageMetrics("device", reg)
    for r, _ in records(200, shift_at=100):  # the shift brings offloads
        m.result(r)
    m.latency(0.01), m.policy_info("p", 1, "p:x"), m.arms("p", {1: 1}, {1: 1.0}), m.dlq("decode")
    m.state_write(0.001), m.lag("t", 0, 1), m.batch(4)
    mon = Monitor("127.0.0.1:1", port=0)
    for r, label in records(20):
        mon.aggregate.add_result(r, now=0)
        mon.aggregate.add_label(label, now=0)
    text = (generate_latest(reg) + generate_latest(mon.registry)).decode()
    return set(re.findall(r"^(exitflow_\w+)", text, re.M))


def test_dashboard_names_only_exported_metrics():
    names = exported_names()
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["panels"]
    used = {n for e in dashboard_exprs() for n in re.findall(r"\b(exitflow_\w+)", e)}
    assert used - names == set()
    datasource = yaml.safe_load((MON / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == uid for p in dash["panels"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    provider = yaml.safe_load((MON / "grafana/provisioning/dashboards/exitflow.yml").read_text())
    assert provider["providers"][0]["options"]["path"].endswith("/exitflow")


@needs_promtool
def test_prometheus_config_and_rules_pass_promtool():
    for args in (["check", "config", str(MON / "prometheus.yml")], ["check", "rules", str(MON / "rules.yml")]):
        proc = subprocess.run([PROMTOOL, *args], capture_output=True, timeout=30)
        assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (apt-get install "
                    "docker-compose): the override file is checked only by its YAML structure")
def test_compose_override_is_valid():
    """Valid on top of the main compose file (it names that file's kafka and redis services)."""
    proc = subprocess.run(["docker-compose", "-f", str(MON.parent / "docker-compose.yml"),
                           "-f", str(MON / "compose.monitoring.yml"), "config", "-q"],
                          capture_output=True, timeout=60, cwd=MON.parent,
                          env={**os.environ, "GRAFANA_ADMIN_PASSWORD": "test-only"})
    assert proc.returncode == 0, proc.stderr.decode()


def test_compose_override_mounts_files_that_exist():
    compose = yaml.safe_load((MON / "compose.monitoring.yml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (MON.parent / source).exists(), source
            assert service is not None
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{port} would listen beyond loopback"


@pytest.mark.integration
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)")
def test_real_prometheus_evaluates_every_dashboard_expression(tmp_path):
    from stream.infra import free_port
    reg = CollectorRegistry()
    metrics = StageMetrics("device", reg)
    metrics.policy_info("splitee", 2, "splitee:x")
    metrics.arms("splitee", {1: 3, 2: 5}, {1: 0.4, 2: 0.7})
    endpoint = serve(reg, 0)
    feed = records(100_000, rate=1000.0)
    fed = []
    stop = threading.Event()

    def produce():  # a steady stream, so rate() has something to see
        i = 0
        while not stop.is_set():
            for _ in range(20):
                metrics.result(feed[i][0])
                metrics.latency(0.004)
                fed.append(feed[i][0])
                i += 1
            metrics.batch(20)
            time.sleep(0.02)

    port = free_port()
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(MON / "rules.yml")],
              "scrape_configs": [{"job_name": "exitflow-device",
                                  "static_configs": [{"targets": [f"127.0.0.1:{endpoint.port}"]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(expr: str) -> list:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(urllib.request.urlopen(url, timeout=5).read())
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                if query("exitflow:cost_per_sample:rate1m"):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        for expr in dashboard_exprs():
            query(expr)  # every expression parses and evaluates
        snapshot = list(fed)
        cost = sum(r["cost"]["total"] for r in snapshot) / len(snapshot)
        offload = sum(r["tier"] != "device" for r in snapshot) / len(snapshot)
        (row,) = query("exitflow:cost_per_sample:rate1m")
        assert float(row["value"][1]) == pytest.approx(cost, rel=0.15)
        (row,) = query("exitflow:offload_rate:rate1m")
        assert float(row["value"][1]) == pytest.approx(offload, abs=0.08)
        assert float(query(dashboard_exprs()[0])[0]["value"][1]) > 0  # throughput panel sees the stream
        assert {r["metric"]["arm"] for r in query("max by (policy, arm) (exitflow_arm_value)")} == {"1", "2"}
    finally:
        stop.set()
        proc.terminate()
        proc.wait(10)
        endpoint.stop()
