"""Integration: bad offloads and bad feedback reach the dead-letter topic through real workers.

Real offload and feedback messages come from a device and a cloud worker on the embedded broker and
Redis; each bad variant is one of them with one field broken, so every check is reached on its own.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from stream import kafka as K
from stream import messages
from stream.config import Topics, data_dir

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    not (data_dir() / "SST-2" / "dev.tsv").is_file(),
    reason="replays SST-2 dev from the shared datasets folder, not found (set EXITFLOW_DATA)")]

MAX_LEN = 32


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from stream.model import MultiExitModel
    path = tmp_path_factory.mktemp("model")
    MultiExitModel.from_backbone("random:L=4,H=32,A=2,I=64", 2, seed=3).save(path)
    return MultiExitModel.load(path)


def _config(broker, redis_server, prefix):
    from consumers.worker import WorkerConfig
    return WorkerConfig(bootstrap=broker.bootstrap, redis_url=redis_server.url, topic_prefix=prefix,
                        batch_size=8, idle_exit_s=3.0)


def _read(broker, topic, kind):
    return [messages.decode(kind, r.value) for r in K.read_all(broker.bootstrap, topic)]


def _send(broker, topic, items):
    producer = K.producer(broker.bootstrap)
    for key, value in items:
        producer.send(topic, key=key.encode(), value=value)
    producer.flush()
    producer.close()


@pytest.fixture()
def offloaded(broker, redis_server, topic_prefix, tiny_model):
    """Six SST-2 samples through a device worker whose policy offloads every sample after layer 1 or 2."""
    from consumers.device import DeviceWorker
    from policies.control import ActiveSpec
    from producers.replay import replay, single
    topics = Topics(topic_prefix)
    K.create_topics(broker.bootstrap, topics.all(), partitions=1)
    replay(single("sst2", "dev", 6, shuffle=True, seed=1), broker.bootstrap, topics, progress=False)
    # α = 1 with a fixed rule: no exit is confident enough, so every split arm but the last offloads
    spec = ActiveSpec("splitee", {"alpha": "1.0", "alpha_rule": "fixed", "probe": "0"}, "splitee")
    DeviceWorker(_config(broker, redis_server, topic_prefix), tiny_model, spec, max_len=MAX_LEN).run()
    offloads = [m for m in _read(broker, topics.offload_cloud, "offload") if m["resume_layer"] > 0]
    assert offloads, "the device offloaded no hidden state"
    return topics, offloads


def _variant(msg, name, change):
    bad = copy.deepcopy(msg)
    bad["id"] = f"bad-{name}"
    change(bad)
    return bad


def _hidden(array):
    return messages.pack_tensor(array)


def test_cloud_worker_sends_each_bad_offload_to_the_dlq_and_finishes_the_good(broker, redis_server, topic_prefix,
                                                                              tiny_model, offloaded):
    from consumers.remote import RemoteWorker
    topics, offloads = offloaded
    good = offloads[0]
    hidden = messages.unpack_tensor(good["hidden"], where="test")
    L = tiny_model.num_layers
    variants = {
        "resume-out-of-range": lambda m: m.update(resume_layer=L, run_to=L),
        "run-to-past-the-model": lambda m: m.update(run_to=L + 1),
        "float32": lambda m: m.update(hidden=_hidden(hidden.astype(np.float32))),
        "over-max-len": lambda m: m.update(hidden=_hidden(np.zeros((MAX_LEN + 1, hidden.shape[1]), np.float16))),
        "tier-mismatch": lambda m: m["trace"].update(tier="edge"),
        "inf": lambda m: m.update(hidden=_hidden(np.where(np.arange(hidden.size).reshape(hidden.shape) == 3,
                                                          np.float16(np.inf), hidden))),
        "ndim-3": lambda m: m.update(hidden=_hidden(hidden[None])),
        "wrong-width": lambda m: m.update(hidden=_hidden(hidden[:, :-1])),
        "no-text-at-layer-0": lambda m: m.update(resume_layer=0, text=""),
        "bad-threshold": lambda m: m.update(threshold=1.5),
        "bad-cost-model": lambda m: m["policy"].update(cost="nope"),
    }
    bad = [_variant(good, name, change) for name, change in variants.items()]
    _send(broker, topics.offload_cloud, [(m["id"], messages.encode("offload", m)) for m in bad])
    RemoteWorker(_config(broker, redis_server, topic_prefix), tiny_model, "cloud", max_len=MAX_LEN).run()

    results = {r["id"] for r in _read(broker, topics.results, "result")}
    assert {m["id"] for m in offloads} <= results, "a good offload lost its result"
    assert not any(r.startswith("bad-") for r in results)
    dlq = {d["key"]: d for d in _read(broker, topics.dlq, "dlq")}
    reasons = {k: d["reason"] for k, d in dlq.items() if k.startswith("bad-")}
    expected = {
        "resume-out-of-range": "resume_layer < run_to", "run-to-past-the-model": f"run_to <= {L}",
        "float32": "float16", "over-max-len": f"over max_len {MAX_LEN}", "tier-mismatch": "tier 'edge'",
        "inf": "NaN or inf", "ndim-3": "2-d tensor", "wrong-width": f"last dimension {hidden.shape[1]}",
        "no-text-at-layer-0": "no raw text", "bad-threshold": "threshold must be", "bad-cost-model": "cost model",
    }
    assert set(reasons) == {f"bad-{name}" for name in expected}
    for name, needle in expected.items():
        reason = reasons[f"bad-{name}"]
        assert needle in reason, (name, reason)
        assert f"'bad-{name}'" in reason, f"the reason names the sample id: {reason}"
    assert all(dlq[k]["topic"] == topics.offload_cloud and dlq[k]["stage"] == "cloud" for k in reasons)


def test_device_worker_sends_bad_feedback_to_the_dlq_and_applies_the_good(broker, redis_server, topic_prefix,
                                                                          tiny_model, offloaded):
    """Feedback naming an unknown policy, with a broken payload or not fitting its policy goes to the DLQ;
    the good feedback of the same batch is learned (every pending pull of the policy gets its reward)."""
    from consumers.device import DeviceWorker
    from consumers.remote import RemoteWorker
    from policies.control import ActiveSpec, PolicyControl
    from stream.checkpoint import Checkpointer
    topics, offloads = offloaded
    RemoteWorker(_config(broker, redis_server, topic_prefix), tiny_model, "cloud", max_len=MAX_LEN).run()
    feedback = _read(broker, topics.feedback, "feedback")
    assert len(feedback) == len(offloads)
    good = feedback[0]
    unknown = _variant(good, "unknown-policy", lambda m: m["policy"].update(name="no-such-policy"))
    bad_param = _variant(good, "param", lambda m: m["policy"].update(params={"alpha": "not-a-number"}))
    misfit = _variant(good, "misfit", lambda m: m.update(probs=[1.0]))
    deep = _variant(good, "deep", lambda m: m.update(exit_layer=tiny_model.num_layers + 1))
    _send(broker, topics.feedback, [(m["id"], messages.encode("feedback", m)) for m in (unknown, bad_param, misfit, deep)]
          + [("bad-bytes", b"\x00 not msgpack"),
             ("bad-fields", messages.encode("feedback", {"id": "bad-fields", "policy": good["policy"]}))])

    spec = ActiveSpec("splitee", {"alpha": "1.0", "alpha_rule": "fixed", "probe": "0"}, "splitee")
    DeviceWorker(_config(broker, redis_server, topic_prefix), tiny_model, spec, max_len=MAX_LEN).run()

    reasons = {d["key"]: d["reason"] for d in _read(broker, topics.dlq, "dlq")}
    assert "policy of feedback cannot be built" in reasons["bad-unknown-policy"], reasons
    assert "no-such-policy" in reasons["bad-unknown-policy"]
    assert "alpha" in reasons["bad-param"], reasons
    assert "needs 2 probabilities" in reasons["bad-misfit"], reasons
    assert f"exit layer in 1..{tiny_model.num_layers}" in reasons["bad-deep"], reasons
    assert "could not decode" in reasons["bad-bytes"], reasons
    assert "lacks required field" in reasons["bad-fields"], reasons
    client = redis_server.client()
    (ns,) = PolicyControl(client).namespaces()
    state = Checkpointer(client, "x").state(ns)
    assert sum(v for k, v in state.items() if k.startswith("p") and k[1:].isdigit()) == 0, state
    assert sum(v for k, v in state.items() if k.startswith("n") and k[1:].isdigit()) == 6, state


def test_device_expires_pulls_whose_feedback_never_came(broker, redis_server, topic_prefix, tiny_model, offloaded,
                                                        monkeypatch):
    """Offloads whose cloud never ran: past the pending timeout the device undoes their pending counts
    once (while busy and while idle); when their feedback does arrive afterwards, it is dead-lettered as a
    duplicate, not learned."""
    import consumers.device as device_mod
    from consumers.device import DeviceWorker
    from consumers.remote import RemoteWorker
    from policies.control import ActiveSpec, PolicyControl
    from producers.replay import iter_samples, single
    from stream.checkpoint import Checkpointer
    topics, offloads = offloaded
    client = redis_server.client()
    (ns,) = PolicyControl(client).namespaces()
    checkpoint = Checkpointer(client, "x")

    def pending():
        return sum(v for k, v in checkpoint.state(ns).items() if k[:1] == "p" and k[1:].isdigit())

    assert pending() == len(offloads) == client.zcard(f"exitflow:pending:{ns}")
    monkeypatch.setattr(device_mod, "SWEEP_EVERY_S", 0.0)
    extra = [s for s, _ in iter_samples(single("sst2", "dev", 7, shuffle=True, seed=1))][-1]
    import time
    extra["ts"] = time.time()
    _send(broker, topics.samples, [(extra["id"], messages.encode("sample", extra))])
    spec = ActiveSpec("splitee", {"alpha": "1.0", "alpha_rule": "fixed", "probe": "0"}, "splitee")
    DeviceWorker(_config(broker, redis_server, topic_prefix), tiny_model, spec, max_len=MAX_LEN,
                 pending_timeout_s=0.5).run()
    # the worker idles 3 s before it stops, past the timeout: the new sample's pull expires as well
    expired = len(offloads) + 1
    assert checkpoint.expired() == {ns: expired}
    assert pending() == 0
    learned = sum(v for k, v in checkpoint.state(ns).items() if k[:1] == "n" and k[1:].isdigit())

    RemoteWorker(_config(broker, redis_server, topic_prefix), tiny_model, "cloud", max_len=MAX_LEN).run()
    DeviceWorker(_config(broker, redis_server, topic_prefix), tiny_model, spec, max_len=MAX_LEN,
                 pending_timeout_s=0.0).run()
    state = checkpoint.state(ns)
    assert pending() == 0, state
    assert sum(v for k, v in state.items() if k[:1] == "n" and k[1:].isdigit()) == learned, \
        "a feedback arriving after its pull expired was learned"
    reasons = [d["reason"] for d in _read(broker, topics.dlq, "dlq") if d["topic"] == topics.feedback]
    assert len(reasons) == expired and all("duplicate" in r for r in reasons), reasons
