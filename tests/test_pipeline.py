"""Integration: replay → device → edge/cloud → results on the real embedded broker and Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest

from stream import kafka as K
from stream import messages
from stream.config import Topics, data_dir

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    not (data_dir() / "SST-2" / "dev.tsv").is_file(),
    reason="replays SST-2 dev from the shared datasets folder, not found (set EXITFLOW_DATA)")]

N = 240


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from stream.model import MultiExitModel
    path = tmp_path_factory.mktemp("model")
    MultiExitModel.from_backbone("random:L=4,H=32,A=2,I=64", 2, seed=3).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from stream.model import MultiExitModel
    return MultiExitModel.load(tiny_model_dir)


def _config(broker, redis_server, prefix, **kw):
    from consumers.worker import WorkerConfig
    return WorkerConfig(bootstrap=broker.bootstrap, redis_url=redis_server.url, topic_prefix=prefix,
                        batch_size=16, idle_exit_s=kw.pop("idle_exit_s", None), **kw)


def _replay(broker, prefix, limit=N, dataset="sst2", split="dev"):
    from producers.replay import replay, single
    return replay(single(dataset, split, limit, shuffle=True, seed=1), broker.bootstrap, Topics(prefix),
                  progress=False)


def _results(broker, prefix):
    return [messages.decode("result", r.value) for r in K.read_all(broker.bootstrap, Topics(prefix).results)]


def _start(worker):
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def _policy(name, **params):
    from policies.control import ActiveSpec
    return ActiveSpec(name, {k: str(v) for k, v in params.items()}, "splitee")


def _samples(limit):
    from producers.replay import iter_samples, single
    return [sample for sample, _ in iter_samples(single("sst2", "dev", limit, shuffle=True, seed=1))]


def _send(broker, prefix, samples, rate=0.0):
    """Produce sample messages, paced at ``rate`` per second when given."""
    producer = K.producer(broker.bootstrap)
    for sample in samples:
        sample["ts"] = time.time()
        producer.send(Topics(prefix).samples, key=sample["id"].encode(), value=messages.encode("sample", sample))
        if rate:
            time.sleep(1.0 / rate)
    producer.flush()
    producer.close()


def _stop_when_done(workers, threads, broker, prefix, n):
    results = _wait_results(broker, prefix, n)
    time.sleep(1.0)  # let a (wrong) duplicate show up if there were one
    for w in workers:
        w.stop()
    for t in threads:
        t.join(30)
    return _results(broker, prefix)


def _median_threshold(model, limit=N):
    """The median over the stream of max(C_1, C_2): splits it into exits and offloads."""
    import torch

    from stream import datasets
    ds = datasets.shuffle_limit(datasets.load("sst2", "dev"), True, 1, limit)
    with torch.inference_mode():
        hidden, mask = model.start(model.tokenize(ds.texts, max_len=128))
        _, probs = model.run(hidden, mask, 0, 2, "each")
    conf = torch.maximum(probs[1].max(1).values, probs[2].max(1).values)
    return float(conf.median())


def _wait_results(broker, prefix, n, timeout=90.0):
    deadline = time.monotonic() + timeout
    results = []
    while time.monotonic() < deadline:
        results = _results(broker, prefix)
        if len({r["id"] for r in results}) >= n:
            return results
        time.sleep(1.0)
    return results


def test_replay_device_cloud_results(broker, redis_server, topic_prefix, tiny_model):
    """Every id once in results; offloaded samples resume from the hidden state and equal the full model."""
    from consumers.device import DeviceWorker
    from consumers.remote import RemoteWorker
    from stream import datasets

    K.create_topics(broker.bootstrap, Topics(topic_prefix).all(), partitions=2)
    threshold = _median_threshold(tiny_model)  # about half exit at layer 1-2, the rest offload
    policy = _policy("static-maxprob", threshold=threshold, max_layer=2)
    reference = np.zeros((2, tiny_model.hidden_size))  # distance to the origin: the embedding's norm
    device = DeviceWorker(_config(broker, redis_server, topic_prefix), tiny_model, policy, reference=reference)
    cloud = RemoteWorker(_config(broker, redis_server, topic_prefix), tiny_model, "cloud")
    threads = [_start(device), _start(cloud)]
    assert _replay(broker, topic_prefix) == N
    results = _stop_when_done([device, cloud], threads, broker, topic_prefix, N)
    ids = Counter(r["id"] for r in results)
    assert len(ids) == N and max(ids.values()) == 1, "every sample exactly once"
    tiers = Counter(r["tier"] for r in results)
    assert tiers["device"] > 0 and tiers["cloud"] > 0, tiers
    assert all(isinstance(r["embedding_distance"], float) and r["embedding_distance"] > 0 for r in results)

    # The cloud resumed from the (int8 per token, the default) hidden state: same answer as one uninterrupted pass.
    ds = datasets.shuffle_limit(datasets.load("sst2", "dev"), True, 1, N)
    text = {f"sst2-dev-{i}": t for i, t in zip(ds.ids, ds.texts)}
    import torch
    offloaded = [r for r in results if r["tier"] == "cloud"]
    with torch.inference_mode():
        for r in offloaded[:40]:
            batch = tiny_model.tokenize([text[r["id"]]], max_len=128)
            hidden, mask = tiny_model.start(batch)
            _, probs = tiny_model.run(hidden, mask, 0, tiny_model.num_layers, "last")
            full = probs[tiny_model.num_layers][0].numpy()
            assert r["exit_layer"] == tiny_model.num_layers
            assert r["layers"] == {"device": 2, "edge": 0, "cloud": tiny_model.num_layers - 2}
            assert abs(r["confidence"] - float(full.max())) < 5e-3
            assert r["prediction"] == int(full.argmax()) or abs(full[0] - full[1]) < 1e-2
            assert r["bytes_offloaded"] > (32 + 4) * batch["input_ids"].shape[1]  # int8 hidden state + scales
    # Costs follow the splitee preset at this depth: λ1·2 + λ2·2 device + o = 5λ·L/12 for the offloaded ones.
    from stream.costs import splitee
    for r in offloaded[:5]:
        assert r["cost"]["total"] == pytest.approx(2 * 6 / 7 + 2 * 1 / 7 + 5 * tiny_model.num_layers / 12)


def test_dimee_style_edge_and_raw_input(broker, redis_server, topic_prefix, tiny_model):
    """cloud-only offloads the raw input (nothing ran on the device); the cloud runs every layer."""
    from consumers.device import DeviceWorker
    from consumers.remote import RemoteWorker

    K.create_topics(broker.bootstrap, Topics(topic_prefix).all(), partitions=1)
    device = DeviceWorker(_config(broker, redis_server, topic_prefix), tiny_model, _policy("cloud-only"))
    cloud = RemoteWorker(_config(broker, redis_server, topic_prefix), tiny_model, "cloud")
    threads = [_start(device), _start(cloud)]
    _replay(broker, topic_prefix, limit=60)
    results = _stop_when_done([device, cloud], threads, broker, topic_prefix, 60)
    assert len({r["id"] for r in results}) == 60
    assert all(r["tier"] == "cloud" and r["layers"]["device"] == 0 for r in results)
    assert all(r["layers"]["cloud"] == tiny_model.num_layers for r in results)


def test_bad_input_goes_to_dlq_and_worker_continues(broker, redis_server, topic_prefix, tiny_model):
    from consumers.device import DeviceWorker

    topics = Topics(topic_prefix)
    K.create_topics(broker.bootstrap, topics.all(), partitions=1)
    producer = K.producer(broker.bootstrap)
    good = {"id": "ok-1", "text": "a fine film", "source": "t", "ts": time.time(), "seq": 0}
    producer.send(topics.samples, key=b"bad-1", value=b"\x00not msgpack")
    producer.send(topics.samples, key=b"bad-2", value=messages.encode("sample", {**good, "id": "bad-2", "text": "  "}))
    producer.send(topics.samples, key=b"bad-3", value=b"\x83\xa1v\x07\xa4kind\xa6sample\xa2id\xa5bad-3")
    producer.send(topics.samples, key=b"ok-1", value=messages.encode("sample", good))
    producer.send(topics.samples, key=b"ok-1", value=messages.encode("sample", good))  # duplicate id
    producer.flush()
    device = DeviceWorker(_config(broker, redis_server, topic_prefix, idle_exit_s=3.0), tiny_model,
                          _policy("final-exit"))
    device.run()
    results = _results(broker, topic_prefix)
    assert [r["id"] for r in results] == ["ok-1"]
    dlq = [messages.decode("dlq", r.value) for r in K.read_all(broker.bootstrap, topics.dlq)]
    reasons = {d["key"]: d["reason"] for d in dlq}
    assert set(reasons) == {"bad-1", "bad-2", "bad-3", "ok-1"}
    assert "could not decode" in reasons["bad-1"]
    assert "empty" in reasons["bad-2"]
    assert "schema version" in reasons["bad-3"]
    assert "duplicate" in reasons["ok-1"]
    assert all(d["topic"] == topics.samples and d["offset"] >= 0 for d in dlq)


def _spawn_worker(stage, model_dir, broker, redis_server, prefix, policy_args=()):
    cmd = [sys.executable, "-m", "stream.cli", "worker", stage, "--model", str(model_dir), "--bootstrap",
           broker.bootstrap, "--redis-url", redis_server.url, "--prefix", prefix, "--batch-size", "8",
           *policy_args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_device_restart_loses_and_duplicates_nothing(broker, redis_server, topic_prefix, tiny_model_dir):
    """SIGKILL the device worker mid-stream, start a new one: every id has exactly one result."""
    topics = Topics(topic_prefix)
    K.create_topics(broker.bootstrap, topics.all(), partitions=2)
    from stream.model import MultiExitModel
    threshold = _median_threshold(MultiExitModel.load(tiny_model_dir))
    policy = ["--policy", "static-maxprob", "--set", f"threshold={threshold}", "--set", "max_layer=2"]
    cloud = _spawn_worker("cloud", tiny_model_dir, broker, redis_server, topic_prefix)
    device = _spawn_worker("device", tiny_model_dir, broker, redis_server, topic_prefix, policy)
    try:
        # Warm up (both workers up and deciding), then a paced stream (≈ 4 s): the kill lands mid-stream.
        samples = _samples(N)
        _send(broker, topic_prefix, samples[:16])
        _wait_results(broker, topic_prefix, 16)
        feeder = threading.Thread(target=_send, args=(broker, topic_prefix, samples[16:], 60.0))
        feeder.start()
        deadline = time.monotonic() + 60
        while len(_results(broker, topic_prefix)) < 16 + 40 and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(device.pid, signal.SIGKILL)
        device.wait()
        partial = len(_results(broker, topic_prefix))
        assert partial < N, "killed mid-stream"
        device = _spawn_worker("device", tiny_model_dir, broker, redis_server, topic_prefix, policy)
        feeder.join(60)
        results = _wait_results(broker, topic_prefix, N)
    finally:
        for proc in (device, cloud):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)
    ids = Counter(r["id"] for r in results)
    assert len(ids) == N, f"lost {N - len(ids)} samples"
    assert max(ids.values()) == 1, f"duplicated: {[i for i, c in ids.items() if c > 1][:5]}"


def test_worker_metrics_agree_exactly_with_the_results(broker, redis_server, topic_prefix, tiny_model):
    """The stage workers' Prometheus counters sum to exactly what their records on `results` say."""
    from prometheus_client import CollectorRegistry

    from consumers.device import DeviceWorker
    from consumers.remote import RemoteWorker
    from monitoring.metrics import StageMetrics

    K.create_topics(broker.bootstrap, Topics(topic_prefix).all(), partitions=2)
    registry = CollectorRegistry()
    policy = _policy("static-maxprob", threshold=_median_threshold(tiny_model, 150), max_layer=2)
    device = DeviceWorker(_config(broker, redis_server, topic_prefix), tiny_model, policy,
                          metrics=StageMetrics("device", registry))
    cloud = RemoteWorker(_config(broker, redis_server, topic_prefix), tiny_model, "cloud",
                         metrics=StageMetrics("cloud", registry))
    threads = [_start(device), _start(cloud)]
    _replay(broker, topic_prefix, limit=150)
    results = _stop_when_done([device, cloud], threads, broker, topic_prefix, 150)
    assert len(results) == 150

    def total(name, **labels):
        return sum(s.value for m in registry.collect() for s in m.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert total("exitflow_samples_total") == 150
    for component in ("device", "edge", "offload", "fee"):
        assert total("exitflow_cost_lambda_total", component=component) == \
            pytest.approx(sum(r["cost"][component] for r in results), abs=1e-9)
    exits = Counter((r["tier"], str(r["exit_layer"])) for r in results)
    for (tier, layer), n in exits.items():
        assert total("exitflow_exits_total", tier=tier, layer=layer) == n
    assert total("exitflow_offloads_total", target="cloud") == sum(r["tier"] == "cloud" for r in results)
    assert total("exitflow_offload_bytes_total") == sum(r["bytes_offloaded"] for r in results)
