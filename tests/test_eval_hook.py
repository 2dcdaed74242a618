"""`exitflow eval --drift-hook`: the device worker's drift hook run offline beside a policy.

The segments' input embeddings sit near one reference centroid (A) and then far from it (B), so the
detector has something to find; each segment's arms are those of tests/test_eval_ordered.py.
"""

import json

import numpy as np
import pytest

from arm_segments import arm_segment
from monitoring.drift import HookSettings
from stream.cli import main
from stream.costs import splitee
from stream.errors import ConfigError
from stream.matrix import ConfidenceMatrix

from policies.evaluate import DriftHook, concat_segments, evaluate_ordered, stream
from policies.registry import build
from policies.state import MemoryStore

LAYERS, DIM = 4, 8
CENTROIDS = np.zeros((2, DIM), np.float32)
CENTROIDS[1, 0] = 1.0


def segment(n, good, seed, shift):
    return arm_segment(n, good, seed, layers=LAYERS, shift=shift, dim=DIM)


@pytest.fixture(scope="module")
def shifted():
    """Arm 1 best and in-domain embeddings for 800 samples, then arm 3 and embeddings moved by 1.5."""
    return concat_segments([("A", segment(800, 1, 0, 0.0)), ("B", segment(900, 3, 1, 1.5))])


def policy(name="splitee", **kw):
    return build(name, {"alpha": "0.8", "alpha_rule": "fixed", **kw}, cost=splitee(offload=5.0), num_layers=LAYERS)


def hook(**settings):
    return DriftHook(HookSettings.from_dict(settings), CENTROIDS)


def test_a_detection_starts_an_epoch_once_the_batch_is_committed(shifted):
    m, bounds = shifted
    p, store = policy(), MemoryStore()
    res = stream(p, m, np.arange(m.num_samples), batch_size=32, store=store, hook=hook())
    assert len(res.detections) == 1, res.detections
    at = res.detections[0]
    assert 800 <= at < 800 + 120, at                      # after the boundary, not in the stationary segment
    assert store.epoch(p.base_namespace()) == 1 and p.namespace().endswith("@1")
    # reset: the new epoch learned only the samples decided after the detecting batch
    batch_end = (at // 32 + 1) * 32
    assert store.snapshot(p.namespace())["t"] == m.num_samples - batch_end
    assert store.snapshot(p.base_namespace())["t"] == batch_end  # the old epoch stays readable
    event = store.epochs(p.base_namespace())[0]
    assert (event["at"], event["position"], event["mode"]) == (m.ids[at], at, "reset")


def test_decay_keeps_a_share_of_the_old_epoch(shifted):
    m, _ = shifted
    p, store = policy(), MemoryStore()
    res = stream(p, m, np.arange(m.num_samples), store=store, hook=hook(mode="decay", factor="0.5"))
    batch_end = (res.detections[0] // 32 + 1) * 32
    assert store.snapshot(p.namespace())["t"] == pytest.approx(0.5 * batch_end + m.num_samples - batch_end)


def test_the_hook_lets_plain_splitee_leave_the_stale_arm(shifted):
    m, bounds = shifted
    plain = evaluate_ordered(policy(), m, bounds, runs=3)
    hooked = evaluate_ordered(policy(), m, bounds, runs=3, hook=hook())
    assert "drift_hook" not in plain and hooked["drift_hook"] == "adwin(delta=0.02, warmup=200) -> reset"
    a, b = hooked["segments"]
    assert a["epochs"] == 0 and b["epochs"] >= 1 and b["detection_delay"] < 120
    assert plain["segments"][1]["epochs"] == 0 and plain["segments"][1]["detection_delay"] is None
    assert b["best_fixed_arm"] == b["most_played_arm"] == 3
    assert b["regret_first_500"] < plain["segments"][1]["regret_first_500"]


def test_a_turned_off_hook_starts_nothing(shifted):
    m, bounds = shifted
    r = evaluate_ordered(policy(), m, bounds, runs=1, hook=hook(enabled="off"))
    assert r["epochs_per_run"] == 0


def test_the_hook_needs_embeddings_of_the_reference_width(shifted):
    m, _ = shifted
    bare = ConfidenceMatrix(probs=m.probs, labels=m.labels, ids=m.ids)
    with pytest.raises(ConfigError, match="the matrix has none"):
        stream(policy(), bare, np.arange(10), hook=hook())
    with pytest.raises(ConfigError, match="dimension 3, the matrix's embeddings 8"):
        stream(policy(), m, np.arange(10), hook=DriftHook(HookSettings(), np.zeros((2, 3))))


def test_exitflow_eval_drift_hook_cli(tmp_path, capsys, shifted):
    m, bounds = shifted
    (a_lo, a_hi), (b_lo, b_hi) = [(s, e) for _, s, e in bounds]
    paths = []
    for name, lo, hi in (("a", a_lo, a_hi), ("b", b_lo, b_hi)):
        part = m.subset(np.arange(lo, hi))
        part.ids = [i.split(":", 1)[1] for i in part.ids]
        paths.append(tmp_path / f"{name}.npz")
        part.save(paths[-1])
    ref = tmp_path / "ref.npz"
    ref_emb = np.concatenate([CENTROIDS[:1].repeat(5, 0), CENTROIDS[1:].repeat(5, 0)])
    ConfidenceMatrix(probs=m.probs[:10], labels=np.repeat([0, 1], 5).astype(np.int64), embeddings=ref_emb,
                     ids=[str(i) for i in range(10)]).save(ref)
    out = tmp_path / "r.json"
    argv = ["eval", "--matrix", str(paths[0]), "--matrix", str(paths[1]), "--in-order", "--policy", "splitee",
            "--set", "alpha=0.8", "--set", "alpha_rule=fixed", "--offload-cost", "5", "--runs", "2",
            "--drift-hook", "mode=decay,factor=0.2", "--reference", str(ref), "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "epochs" in text and "delay" in text
    report = json.loads(out.read_text())
    assert report["drift_hook"] == "adwin(delta=0.02, warmup=200) -> decay x0.2"
    assert report["reports"][0]["segments"][1]["epochs"] >= 1
    assert main(argv[:-4] + ["--drift-hook", "colour=red", "--reference", str(ref)]) == 1
    assert "drift hook: unknown setting(s) ['colour']" in capsys.readouterr().err
    assert main(argv[:argv.index("--drift-hook")] + ["--drift-hook"]) == 1
    assert "--drift-hook needs --reference" in capsys.readouterr().err


@pytest.mark.parametrize("name,mode", [("splitee-drift", "reset"), ("splitee", "decay")])
def test_pulls_in_flight_at_a_new_epoch_resolve_where_they_were_decided(shifted, name, mode):
    """Under a feedback delay, offloads decided before the epoch began are learned by the old epoch: the
    new one neither copies their pending counts nor receives their feedback, so every count ends at 0."""
    m, _ = shifted
    p, store = policy(name), MemoryStore()
    res = stream(p, m, np.arange(m.num_samples), store=store, feedback_delay=4,
                 hook=hook(mode=mode, factor="0.5"))
    assert len(res.detections) == 1
    for ns in (p.base_namespace(), p.namespace()):
        state = store.snapshot(ns)
        assert all(state.get(f"p{i}", 0.0) == pytest.approx(0.0) for i in range(1, LAYERS + 1)), (ns, state)
    old = store.snapshot(p.base_namespace())
    assert sum(old.get(f"n{i}", 0.0) + sum(v for k, v in old.items() if k.startswith(f"n{i}@")) for i in range(1, LAYERS + 1)) > 0
