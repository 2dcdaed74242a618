"""The epochs the drift hook begins, as the monitor serves them: JSON, Prometheus, and the dashboard in
headless Chromium (fixtures of test_monitoring_service: real broker, real Redis, synthetic results)."""

from __future__ import annotations

import re
import subprocess
import tempfile
import time

import pytest

from test_monitoring_service import CHROMIUM, NS, get, monitor, stack, wait_for  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration


@pytest.fixture()
def epoch(stack):
    from policies.state import EpochStart, RedisStore
    info = {"policy": "splitee", "version": 1, "at": "imdb-7", "seq": 200, "source": "imdb", "time": time.time(),
            "reason": "drift:distance/adwin", "mode": "reset", "factor": None}
    assert RedisStore(stack["redis"]).start_epoch(EpochStart(NS, 0, "reset", 0.0, "imdb-7", info=info)) == 1
    return info


def test_the_monitor_serves_the_epochs(monitor, epoch):
    s = wait_for(monitor, lambda s: s["epochs"]["total"] == 1)
    [event] = s["epochs"]["events"]
    assert (event["at"], event["epoch"], event["from"], event["ns"]) == ("imdb-7", 1, 0, NS)
    assert s["epochs"]["current"] == {"splitee": 1}
    assert 'exitflow_policy_epoch{policy="splitee"} 1.0' in get(monitor.url + "metrics")[2].decode()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: apt-get install chromium")
def test_dashboard_renders_the_epoch_in_headless_chromium(monitor, epoch):
    wait_for(monitor, lambda s: s["epochs"]["total"] == 1 and s["samples"] > 0)
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1600,1300", "--virtual-time-budget=5000",
             "--dump-dom", monitor.url],
            capture_output=True, timeout=120)
    dom = proc.stdout.decode()
    assert 'data-loaded="1"' in dom, proc.stderr.decode()[-2000:]
    assert re.search(r'id="kpi-epochs"[^>]*data-value="1"', dom), "the epochs KPI shows no epoch"
    row = re.search(r'<table id="epochs">.*?</table>', dom, re.S).group(0)
    for text in ("splitee", '<td class="epoch">1</td>', "imdb-7", "200", "imdb", "drift:distance/adwin", "reset"):
        assert text in row, (text, row)
    assert "last: splitee epoch 1 at seq 200" in dom
