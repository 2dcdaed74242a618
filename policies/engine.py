"""The per-sample decision loop, shared by the live device worker and the offline evaluator.

The loop asks the policy for an action, runs the layers it asks for through a *runner* (the real
model in the device worker, rows of a confidence matrix offline), and repeats until the policy exits
or offloads. Samples of a batch that ask for the same layer range run together. The remote side
(edge/cloud) has no policy: it resumes where the device stopped and exits at ``run_to`` or at the
first layer reaching the offload's threshold.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Protocol

import numpy as np

from stream.costs import Trace
from stream.errors import ConfigError

from policies.base import (Action, Continue, Delta, Event, Exit, ExitMode, Feedback, Observation, Offload,
                           Policy, StateView, merge_deltas)
from policies.state import EpochStart


class LayerRunner(Protocol):
    """Runs layers ``from_layer+1 .. to_layer`` for the samples at ``indices`` of the batch.

    Returns, per sample, the exit probabilities of the layers whose exits were asked for
    (``each``: every layer it ran, ``last``: only ``to_layer``).
    """

    def __call__(self, indices: list[int], from_layer: int, to_layer: int,
                 exits: ExitMode) -> list[dict[int, np.ndarray]]: ...


@dataclasses.dataclass
class DeviceOutcome:
    """How the device stage ended for one sample: exited or offloaded, with what it ran and saw."""

    observation: Observation
    action: Exit | Offload
    trace: Trace
    context: dict[str, Any]
    delta: dict[str, Any] = dataclasses.field(default_factory=dict)  # what start + decision learned

    @property
    def offloaded(self) -> bool:
        return isinstance(self.action, Offload)

    @property
    def probs(self) -> np.ndarray:
        """Probabilities at the device's exit (only meaningful when it exited)."""
        return self.observation.probs[self.observation.layer]


def _check(policy: Policy, obs: Observation, action: Action) -> Action:
    where = f"policy {policy.name!r}, sample {obs.sample_id!r} at layer {obs.layer}"
    if isinstance(action, Continue):
        if not obs.layer < action.to_layer <= obs.num_layers:
            raise ConfigError(f"{where}: Continue(to_layer={action.to_layer}) must be in "
                              f"{obs.layer + 1}..{obs.num_layers}")
    elif isinstance(action, Exit):
        if obs.layer not in obs.probs:
            raise ConfigError(f"{where}: Exit needs the exit of layer {obs.layer} evaluated "
                              f"(continue with exits='last' or 'each' first)")
    elif isinstance(action, Offload):
        run_to = obs.num_layers if action.run_to is None else action.run_to
        if not obs.layer < run_to <= obs.num_layers:
            raise ConfigError(f"{where}: Offload(run_to={action.run_to}) must be in "
                              f"{obs.layer + 1}..{obs.num_layers}")
    else:
        raise ConfigError(f"{where}: decide() returned {action!r}; expected Continue, Exit or Offload")
    return action


def run_device(policy: Policy, state: StateView, observations: list[Observation],
               runner: LayerRunner) -> list[DeviceOutcome]:
    """Decide a batch of samples on the device; learns the ``decision`` stage into ``state``.

    Every sample's first action is learned as a ``start`` event before any layer runs (a pull in flight).
    Each outcome's context is the policy's own plus ``ns`` (the namespace whose state made the decision:
    its feedback must be learned there even if another policy is active by then). Deltas are queued in
    ``state`` under the key ``decision:<sample id>``, and each outcome's ``delta`` holds the sum of its
    start and decision deltas (what a worker commits for that sample, once).
    """
    outcomes: list[DeviceOutcome | None] = [None] * len(observations)
    exits_run = [0] * len(observations)
    started: list[Delta] = [{} for _ in observations]
    active = list(range(len(observations)))
    first = True
    ns = policy.namespace()
    while active:
        groups: dict[tuple[int, int, str], list[int]] = defaultdict(list)
        for i in active:
            obs = observations[i]
            action = _check(policy, obs, policy.decide(obs, state))
            key = f"decision:{obs.sample_id}"
            if first:
                start = Event("start", obs.sample_id, policy.context(obs, action, state), Trace(), obs)
                started[i] = policy.learn(start, state)
                state.add(started[i], key=key)
            if isinstance(action, Continue):
                groups[(obs.layer, action.to_layer, action.exits)].append(i)
                continue
            tier = "device" if isinstance(action, Exit) else action.tier
            trace = Trace(device_layers=obs.layer, device_exits=exits_run[i], tier=tier)
            outcome = DeviceOutcome(obs, action, trace, {**policy.context(obs, action, state), "ns": ns})
            decided = policy.learn(Event("decision", obs.sample_id, outcome.context, trace, obs), state)
            state.add(decided, key=key)
            outcome.delta = merge_deltas([started[i], decided])
            outcomes[i] = outcome
        for (from_layer, to_layer, mode), indices in groups.items():
            for i, probs in zip(indices, runner(indices, from_layer, to_layer, mode)):
                observations[i].probs.update(probs)
                observations[i].layer = to_layer
                exits_run[i] += len(probs)
        active = [i for i in active if outcomes[i] is None]
        first = False
    return outcomes  # type: ignore[return-value]


@dataclasses.dataclass
class RemoteOutcome:
    """How the remote tier finished an offloaded sample."""

    exit_layer: int
    probs: np.ndarray
    layers_run: int
    remote_probs: dict[int, np.ndarray]

    def feedback(self) -> Feedback:
        return Feedback(self.exit_layer, self.probs, self.remote_probs)


def run_remote(starts: list[int], offloads: list[Offload], num_layers: int,
               runner: LayerRunner) -> list[RemoteOutcome]:
    """Finish offloaded samples: resume at ``starts[i]``, exit at ``run_to`` or at the threshold."""
    n = len(starts)
    layer = list(starts)
    seen: list[dict[int, np.ndarray]] = [{} for _ in range(n)]
    done: list[RemoteOutcome | None] = [None] * n
    targets = [num_layers if o.run_to is None else o.run_to for o in offloads]
    active = list(range(n))
    while active:
        groups: dict[tuple[int, int, str], list[int]] = defaultdict(list)
        for i in active:
            # Without a threshold, run straight to the target; with one, step and look at every exit.
            step_to = targets[i] if offloads[i].threshold is None else layer[i] + 1
            groups[(layer[i], step_to, "last")].append(i)
        for (from_layer, to_layer, mode), indices in groups.items():
            for i, probs in zip(indices, runner(indices, from_layer, to_layer, mode)):
                seen[i].update(probs)
                layer[i] = to_layer
                threshold = offloads[i].threshold
                conf = float(np.max(probs[to_layer]))
                if to_layer >= targets[i] or (threshold is not None and conf >= threshold):
                    done[i] = RemoteOutcome(to_layer, probs[to_layer], to_layer - starts[i], seen[i])
        active = [i for i in active if done[i] is None]
    return done  # type: ignore[return-value]


def remote_trace(device: Trace, remote: RemoteOutcome) -> Trace:
    """The full trace of an offloaded sample: the device part plus the layers the remote tier ran."""
    if device.tier == "edge":
        return dataclasses.replace(device, edge_layers=remote.layers_run)
    return dataclasses.replace(device, cloud_layers=remote.layers_run)


def feedback_event(sample_id: str, context: dict[str, Any], trace: Trace, feedback: Feedback) -> Event:
    """The ``feedback`` learning event of an offloaded sample, as the policy's updater sees it."""
    return Event("feedback", sample_id, context, trace, None, feedback)


def learn_feedback(policy: Policy, state: StateView, events: list[Event]) -> None:
    """Learn ``feedback`` events into ``state``, each queued under the key ``feedback:<sample id>``."""
    for event in events:
        if event.stage != "feedback":
            raise ConfigError(f"policy {policy.name!r}, sample {event.sample_id!r}: learn_feedback got a "
                              f"{event.stage!r} event")
        state.add(policy.learn(event, state), key=f"feedback:{event.sample_id}")


def new_epoch(policy: Policy, state: StateView, *, mode: str = "reset", factor: float = 0.0, key: str = "",
              info: dict[str, Any] | None = None) -> EpochStart:
    """The request that begins the next epoch of ``policy``'s learned state (its current one read as ``state``).

    A policy with its own reaction (:meth:`Policy.drift_delta`, e.g. SplitEE's bucket cut) gets a copy of
    the old epoch plus that delta, less the fields its :meth:`~policies.base.Policy.drift_drop` names; any
    other starts empty (``reset``) or at ``factor`` × the old additive fields (``decay``), computed by the store atomically.
    A copy never takes the policy's :meth:`~policies.base.Policy.in_flight_fields`.
    ``key``: the detecting sample's id. Hand it to a
    store's ``start_epoch`` (or, in the device worker, to the batch commit), then read the epoch back.

    >>> from stream.costs import splitee
    >>> from policies.registry import build
    >>> from policies.state import MemoryStore
    >>> p, store = build("splitee", cost=splitee(), num_layers=3), MemoryStore()
    >>> store.apply(p.namespace(), {"t": 10.0, "n1": 4.0, "s1": 2.0})
    True
    >>> store.start_epoch(new_epoch(p, StateView(store.snapshot(p.namespace())), mode="decay", factor=0.5, key="x9"))
    1
    >>> p.epoch = store.epoch(p.base_namespace()); p.namespace().endswith("@1"), store.snapshot(p.namespace())
    (True, {'t': 5.0, 'n1': 2.0, 's1': 1.0})
    >>> store.start_epoch(new_epoch(p, StateView(), key="x9"))   # the same detection again: refused
    0
    """
    own = policy.drift_delta(state)
    info = dict(info or {})
    drop = tuple(policy.in_flight_fields())     # pulls in flight resolve in the epoch that decided them
    if own:
        info["mode"] = "on_drift"
        drop += tuple(policy.drift_drop())
        return EpochStart(policy.base_namespace(), policy.epoch, "decay", 1.0, key, None, info, add=own, drop=drop)
    return EpochStart(policy.base_namespace(), policy.epoch, mode, factor, key, None, info,
                      drop=drop if mode == "decay" else ())
