"""One contract for every registered policy (river's check_estimator habit).

Through the real decision loop (run_device / run_remote) on a random matrix: every decision is valid,
``decide`` never changes the state, ``learn`` returns only additive float / ndarray deltas, the context
is JSON-able, and the namespace is stable and depends on the settings.
"""

import copy
import json

import numpy as np
import pytest

from stream.costs import dimee, splitee

from policies.base import Observation, StateView
from policies.compare import Calibrator, EXTRA_SPECS
from policies.engine import feedback_event, learn_feedback, remote_trace, run_device, run_remote
from policies.evaluate import MatrixRunner, synthetic_matrix
from policies.registry import registry

SPECS = sorted(registry()) + list(EXTRA_SPECS)


@pytest.fixture(scope="module")
def matrix():
    return synthetic_matrix(120, layers=4, classes=3, dim=5, seed=21)


@pytest.fixture(scope="module")
def calibrator():
    return Calibrator(synthetic_matrix(150, layers=4, classes=3, dim=5, seed=22))


class Recording:
    """Delegates to a policy and checks every call it gets from the engine."""

    def __init__(self, policy):
        self._policy = policy
        self.deltas = []

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def decide(self, obs, state):
        before = (copy.deepcopy(dict(state)), len(state.pending))
        action = self._policy.decide(obs, state)
        after = (dict(state), len(state.pending))
        assert before[1] == after[1] and before[0].keys() == after[0].keys()
        for key in before[0]:
            assert np.array_equal(before[0][key], after[0][key]), f"decide changed state {key!r}"
        return action

    def learn(self, event, state):
        delta = self._policy.learn(event, state)
        assert isinstance(delta, dict)
        for key, value in delta.items():
            assert isinstance(key, str)
            assert isinstance(value, (float, np.ndarray)) and not isinstance(value, bool), (key, type(value))
            assert np.all(np.isfinite(value))
        self.deltas.append(delta)
        return delta


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("cost", [splitee(offload=3.0), dimee()], ids=["splitee", "dimee"])
def test_policy_contract(spec, cost, matrix, calibrator):
    policy = calibrator.build(spec, {"epochs": "100"}, cost, matrix.num_layers, matrix.num_classes, strict=False)
    assert policy.namespace() == calibrator.build(spec, {"epochs": "100"}, cost, 4, 3, strict=False).namespace()
    assert policy.namespace().startswith(policy.name + ":")
    rec = Recording(policy)
    state = StateView()
    for start in range(0, matrix.num_samples, 40):
        rows = list(range(start, start + 40))
        obs = [Observation(matrix.ids[r], 4, embedding=matrix.embeddings[r],
                           hindsight=matrix.probs[r] if policy.offline_only else None,
                           label=int(matrix.labels[r]) if policy.offline_only else None) for r in rows]
        outcomes = run_device(rec, state, obs, MatrixRunner(matrix.probs, rows))
        assert len(outcomes) == len(rows)
        off = [i for i, o in enumerate(outcomes) if o.offloaded]
        remote = run_remote([outcomes[i].observation.layer for i in off], [outcomes[i].action for i in off], 4,
                            MatrixRunner(matrix.probs, [rows[i] for i in off]))
        for i, o in enumerate(outcomes):
            json.dumps(o.context)                                   # carried on the offload topic
            assert o.context["ns"] == policy.namespace()
            assert 1 <= (o.observation.layer if not o.offloaded else 1) <= 4
        events = [feedback_event(outcomes[i].observation.sample_id, outcomes[i].context,
                                 remote_trace(outcomes[i].trace, rem), rem.feedback()) for i, rem in zip(off, remote)]
        for rem in remote:
            assert 1 <= rem.exit_layer <= 4
        learn_feedback(rec, state, events)
    assert policy.describe(dict(state)) is not None


def test_namespace_depends_on_settings(calibrator):
    a = calibrator.build("splitee[alpha=0.8]", {}, splitee(), 4, 3)
    b = calibrator.build("splitee[alpha=0.9]", {}, splitee(), 4, 3)
    c = calibrator.build("splitee[alpha=0.8]", {}, splitee(offload=2.0), 4, 3)
    assert len({a.namespace(), b.namespace(), c.namespace()}) == 3
