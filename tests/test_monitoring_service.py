"""The monitor service against the real embedded broker and Redis: the JSON API equals the records, the
endpoints pass promtool, the dashboard renders the same numbers in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from monitoring.synthetic import records
from stream import kafka as K
from stream import messages
from stream.config import Topics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
PROMTOOL = shutil.which("promtool")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
N = 300
NS = "splitee:0123456789ab"


def get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.headers, resp.read()


def summary(mon) -> dict:
    return json.loads(get(mon.url + "api/summary")[2])


def wait_for(mon, pred, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = summary(mon)
        if pred(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


@pytest.fixture()
def stack(broker, redis_server, topic_prefix):
    """Topics with 2 partitions holding N results; labels: most before, some after the results, some missing."""
    topics = Topics(topic_prefix)
    K.create_topics(broker.bootstrap, [topics.results, topics.labels], partitions=2)
    pairs = records(N, shift_at=200, swap_at=150, ns=NS, seed=1)
    missing = {r["id"] for r, _ in pairs[::50]}          # 6 samples never get a label
    late = {r["id"] for r, _ in pairs[1::7]}             # labels published after every result
    producer = K.producer(broker.bootstrap)
    for res, label in pairs:
        if res["id"] not in missing | late:
            producer.send(topics.labels, key=res["id"].encode(), value=messages.encode("label", label))
    for res, _ in pairs:
        producer.send(topics.results, key=res["id"].encode(), value=messages.encode("result", res))
    producer.send(topics.results, key=b"bad", value=b"not msgpack")
    producer.flush()
    for res, label in pairs:
        if res["id"] in late - missing:
            producer.send(topics.labels, key=res["id"].encode(), value=messages.encode("label", label))
    producer.flush()
    producer.close()
    client = redis_server.client()
    from policies.control import PolicyControl
    PolicyControl(client).use("static-maxprob", {"threshold": 0.85})
    client.hset(f"exitflow:state:{NS}", mapping={"t": 45, "n1": 10, "s1": 5.5, "n2": 30, "s2": 24.0, "n3": 4, "s3": 1.0,
                                                 "p3": 1})
    return {"topics": topics, "pairs": pairs, "missing": missing, "redis": client}


@pytest.fixture()
def monitor(broker, redis_server, stack, topic_prefix):
    from monitoring.service import Monitor
    mon = Monitor.attach(broker, redis_server, prefix=topic_prefix, port=0, metrics_port=0).start()
    yield mon
    mon.stop()


def expected_numbers(pairs, missing):
    results = [r for r, _ in pairs]
    exits: dict[str, dict[str, int]] = {"device": {}, "edge": {}, "cloud": {}}
    for r in results:
        exits[r["tier"]][str(r["exit_layer"])] = exits[r["tier"]].get(str(r["exit_layer"]), 0) + 1
    labelled = [(r, lab) for r, lab in pairs if r["id"] not in missing]
    return {
        "cost": {k: sum(r["cost"][k] for r in results) for k in ("device", "edge", "offload", "fee", "total")},
        "offloads": sum(r["tier"] != "device" for r in results),
        "tiers": {t: sum(r["tier"] == t for r in results) for t in ("device", "edge", "cloud")},
        "exits": exits,
        "bytes": sum(r["bytes_offloaded"] for r in results),
        "labelled": len(labelled),
        "correct": sum(r["prediction"] == lab["label"] for r, lab in labelled),
    }


def test_api_numbers_equal_the_records(monitor, stack):
    exp = expected_numbers(stack["pairs"], stack["missing"])
    s = wait_for(monitor, lambda s: s["samples"] == N and s["accuracy"]["labelled"] == exp["labelled"]
                 and s["arms"] and s["policy"]["active"])
    assert s["samples"] == N and s["decode_errors"] == {"result": 1}
    for k, v in exp["cost"].items():
        assert s["cost"][k] == pytest.approx(v)
    assert s["cost_per_sample"] == pytest.approx(exp["cost"]["total"] / N)
    assert s["offloads"] == exp["offloads"] and s["tiers"] == exp["tiers"]
    assert s["offload_rate"] == pytest.approx(exp["offloads"] / N)
    assert s["exits"] == exp["exits"]
    assert s["bytes_offloaded"] == exp["bytes"]
    acc = s["accuracy"]
    assert acc["labelled"] == exp["labelled"] and acc["correct"] == exp["correct"]
    assert acc["overall"] == pytest.approx(exp["correct"] / exp["labelled"])
    assert acc["pending_results"] == len(stack["missing"]) and acc["pending_labels"] == 0
    assert s["sources"] == {"sst2": 200, "imdb": 100}
    assert s["policy"]["active"]["name"] == "static-maxprob" and s["policy"]["active"]["version"] == 1
    assert [(w["version"], w["seq"]) for w in s["policy"]["swaps"]] == [(1, 0), (2, 150)]
    assert s["arms"] == {"policy": "splitee", "ns": NS, "arms": [
        {"arm": "1", "pulls": 10.0, "pending": 0.0, "value": 0.55},
        {"arm": "2", "pulls": 30.0, "pending": 0.0, "value": 0.8},
        {"arm": "3", "pulls": 4.0, "pending": 1.0, "value": 0.25}]}
    assert s["kafka"]["connected"] and s["redis"]["connected"]
    assert sum(p["n"] for p in s["series"]) == N
    # the shift at seq 200 is seen by the distance detectors, and nothing fires before it (confidence and
    # offloads are watched per policy version and decision layer: the swap at 150 leaves them too few samples)
    events = s["drift"]["events"]
    assert "distance" in {e["signal"] for e in events}
    assert all(e["seq"] >= 200 for e in events), events
    assert json.loads(get(monitor.url + "api/events")[2])["total"] == s["drift"]["total"]


def test_metrics_endpoints_and_read_only_http(monitor, stack):
    wait_for(monitor, lambda s: s["samples"] == N and s["arms"])
    time.sleep(1.2)  # one more Redis poll: the arm gauges follow the arms panel
    _, headers, body = get(monitor.url + "metrics")
    text = body.decode()
    assert f"exitflow_monitor_results_total {float(N)}" in text
    assert re.search(r'exitflow_drift_detections_total\{detector="\w+",signal="distance"\} [1-9]', text)
    assert 'exitflow_arm_pulls{arm="2",policy="splitee",stage="monitor"} 30.0' in text
    second = get(f"http://127.0.0.1:{monitor._metrics_server.port}/metrics")[2]
    assert b"exitflow_monitor_joined_total" in second
    if PROMTOOL:
        for exposition in (body, second):
            proc = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, timeout=30)
            assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
    status, headers, page = get(monitor.url)
    assert status == 200 and b"/static/dashboard.js" in page
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert b"://" not in get(monitor.url + "static/dashboard.js")[2] and b"://" not in page  # nothing remote
    for bad in ("static/../service.py", "static/%2e%2e/service.py", "nope"):
        with pytest.raises(urllib.error.HTTPError) as err:
            get(monitor.url + bad)
        assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(monitor.url + "api/summary", data=b"{}", method="POST"), timeout=5)
    assert err.value.code == 405


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed: apt-get install prometheus")
def test_promtool_is_present_for_the_checks_above():
    assert subprocess.run([PROMTOOL, "--version"], capture_output=True).returncode == 0


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: apt-get install chromium")
def test_dashboard_renders_the_numbers_in_headless_chromium(monitor, stack):
    exp = expected_numbers(stack["pairs"], stack["missing"])
    wait_for(monitor, lambda s: s["samples"] == N and s["accuracy"]["labelled"] == exp["labelled"] and s["arms"])
    out = ROOT / "artifacts"
    out.mkdir(exist_ok=True)
    shot = out / "monitor-dashboard.png"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1600,1300", "--virtual-time-budget=5000",
             f"--screenshot={shot}", "--dump-dom", monitor.url],
            capture_output=True, timeout=120)
    dom = proc.stdout.decode()
    assert 'data-loaded="1"' in dom, proc.stderr.decode()[-2000:]

    def value(element_id: str) -> float:
        m = re.search(rf'id="{element_id}"[^>]*data-value="([^"]+)"', dom) or \
            re.search(rf'data-value="([^"]+)"[^>]*id="{element_id}"', dom)
        assert m, f"#{element_id} has no value in the rendered page"
        return float(m.group(1))

    assert value("kpi-samples") == N
    assert value("kpi-cost") == pytest.approx(exp["cost"]["total"] / N)
    assert value("kpi-cost-sub") == pytest.approx(exp["cost"]["total"])
    assert value("kpi-offload") == pytest.approx(exp["offloads"] / N)
    assert value("kpi-offload-sub") == exp["offloads"]
    assert value("kpi-bytes") == exp["bytes"]
    assert value("kpi-drift") > 0
    assert "static-maxprob v1" in dom and NS in dom
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_cli_serves_until_sigterm(broker, redis_server, stack, topic_prefix, tmp_path):
    url_file = tmp_path / "url"
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "monitor", "--bootstrap", broker.bootstrap,
                             "--redis-url", redis_server.url, "--prefix", topic_prefix, "--port", "0",
                             "--url-file", str(url_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 30
        while not url_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        url = url_file.read_text().strip()
        assert url.startswith("http://127.0.0.1:")
        deadline = time.monotonic() + 30
        while json.loads(get(url + "api/summary")[2])["samples"] < N and time.monotonic() < deadline:
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while not json.loads(get(url + "api/summary")[2])["arms"] and time.monotonic() < deadline:
            time.sleep(0.2)
        s = json.loads(get(url + "api/summary")[2])
        assert s["samples"] == N and s["arms"]["ns"] == NS and s["policy"]["active"]["name"] == "static-maxprob"
        assert json.loads(get(url + "healthz")[2])["ok"]
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
    assert b"dashboard at http://127.0.0.1:" in out


def test_an_unreachable_broker_is_reported_not_fatal():
    from monitoring.service import Monitor
    from stream.infra import free_port
    with Monitor(f"127.0.0.1:{free_port()}", port=0) as mon:
        s = wait_for(mon, lambda s: s["kafka"]["error"], timeout=20)
        assert not s["kafka"]["connected"] and "unreachable" in s["kafka"]["error"]
        assert mon.registry.get_sample_value("exitflow_broker_up", {"stage": "monitor"}) == 0
        assert get(mon.url + "healthz")[0] == 200
