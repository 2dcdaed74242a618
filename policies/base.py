"""The policy interface: what the device knows about a sample in, a decision out, deltas to the state back.

A policy never holds learned state itself. It reads a :class:`StateView` (a snapshot of the Redis hash
or of an in-memory dict, plus what this batch already learned) and returns additive *deltas*, which the
caller applies atomically (Redis Lua, once per sample id). Additive deltas are what make the state
shareable by several workers and safe to replay: counts and sums merge, overwrites do not.

Learning happens in two explicit stages, because the reward of an offloaded sample is delayed:

* ``stage="decision"``: right after the device has decided the sample (it exited, or it was offloaded);
  what the device saw is known, the remote outcome is not.
* ``stage="feedback"``: when the edge/cloud stage reports back (``feedback`` topic) what the policy needs
  to score the decision, e.g. the final-layer confidence C_L. Only offloaded samples get this stage.

A third, earlier step exists for policies that commit to a plan before any layer ran (a bandit's arm):
``stage="start"`` is learned right after a sample's first action, before the layers it asked for run, so
the next sample of the same batch already sees that pull in flight (SplitEE counts it as pending). Its
deltas are queued under the same key as the sample's ``decision`` (both are applied together, once).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Union

import numpy as np

from stream.costs import CostModel, Tier, Trace
from stream.errors import ConfigError

ExitMode = Literal["last", "each"]
Value = Union[float, np.ndarray]
Delta = dict[str, Value]

log = logging.getLogger(__name__)

#: Separates a namespace from its epoch: ``splitee:ab12cd34ef56@2`` is epoch 2 of ``splitee:ab12cd34ef56``.
EPOCH_SEP = "@"


def epoch_namespace(base: str, epoch: int) -> str:
    """The namespace of ``epoch`` of a policy's state; epoch 0 is the bare namespace (state kept before epochs).

    >>> epoch_namespace("splitee:0123456789ab", 0), epoch_namespace("splitee:0123456789ab", 2)
    ('splitee:0123456789ab', 'splitee:0123456789ab@2')
    """
    return base if epoch == 0 else f"{base}{EPOCH_SEP}{int(epoch)}"


def split_namespace(ns: str) -> tuple[str, int]:
    """``(base namespace, epoch)`` of a namespace written by :func:`epoch_namespace`.

    >>> split_namespace("splitee:0123456789ab@2"), split_namespace("splitee:0123456789ab")
    (('splitee:0123456789ab', 2), ('splitee:0123456789ab', 0))
    """
    base, sep, tail = ns.rpartition(EPOCH_SEP)
    return (base, int(tail)) if sep and tail.isdigit() else (ns, 0)


@dataclasses.dataclass(frozen=True)
class Continue:
    """Run the device forward to ``to_layer`` (1-based), evaluating the exit after each layer or only the last."""

    to_layer: int
    exits: ExitMode = "last"


@dataclasses.dataclass(frozen=True)
class Exit:
    """Stop on the device and predict with the exit of the current layer."""


@dataclasses.dataclass(frozen=True)
class Offload:
    """Hand the sample over: the remote tier resumes at the device's current layer (raw input if none ran).

    It runs up to ``run_to`` (None: the last layer); with a ``threshold`` it exits at the first layer whose
    confidence reaches it (DIMEE's edge), otherwise at ``run_to``. ``probe`` marks a sample the policy would
    have exited but sends on to learn from the answer (exploration, e.g. SplitEE's online α).
    """

    tier: Literal["edge", "cloud"] = "cloud"
    run_to: int | None = None
    threshold: float | None = None
    probe: bool = False


Action = Union[Continue, Exit, Offload]


@dataclasses.dataclass
class Observation:
    """What the device knows about one sample so far. Labels never appear here in the live pipeline.

    ``probs`` maps a 1-based layer to its exit's class probabilities, only for exits that were evaluated.
    ``hindsight`` (every exit's probabilities) and ``label`` are filled by the offline evaluator for
    policies marked ``offline_only`` (the oracle, SplitEE-S with ``side_info=oracle``), never live.
    """

    sample_id: str
    num_layers: int
    layer: int = 0
    probs: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    embedding: np.ndarray | None = None
    hindsight: np.ndarray | None = None
    label: int | None = None

    def confidence(self, layer: int | None = None) -> float:
        """C_i = max_c P_i(c) at ``layer`` (default: the current one)."""
        layer = self.layer if layer is None else layer
        try:
            return float(np.max(self.probs[layer]))
        except KeyError:
            raise ConfigError(f"sample {self.sample_id}: the exit of layer {layer} was not evaluated") from None


@dataclasses.dataclass(frozen=True)
class Feedback:
    """What the remote tier reports for an offloaded sample: its exit layer and that exit's probabilities."""

    exit_layer: int
    probs: np.ndarray
    remote_probs: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def confidence(self) -> float:
        return float(np.max(self.probs))


@dataclasses.dataclass(frozen=True)
class Event:
    """One learning step: what happened to a sample, at ``stage`` ``start``, ``decision`` or ``feedback``."""

    stage: Literal["start", "decision", "feedback"]
    sample_id: str
    context: dict[str, Any]
    trace: Trace
    observation: Observation | None = None
    feedback: Feedback | None = None


class StateView(Mapping):
    """Read-only view of a policy's learned state: a snapshot plus deltas learned since (same batch).

    Values are floats or numpy vectors; a missing key reads as ``default`` (never creates it).
    """

    def __init__(self, snapshot: Mapping[str, Value] | None = None) -> None:
        self._base: dict[str, Value] = dict(snapshot or {})
        self._local: dict[str, Value] = {}
        self.pending: list[Delta] = []
        self._keys: list[str] = []

    def __getitem__(self, key: str) -> Value:
        base = self._base.get(key)
        local = self._local.get(key)
        if base is None and local is None:
            raise KeyError(key)
        if base is None:
            return local
        if local is None:
            return base
        return base + local

    def __iter__(self):
        return iter(set(self._base) | set(self._local))

    def __len__(self) -> int:
        return len(set(self._base) | set(self._local))

    def number(self, key: str, default: float = 0.0) -> float:
        value = self.get(key)
        return default if value is None else float(value)

    def add(self, delta: Delta, key: str = "") -> None:
        """Fold ``delta`` into the local view (visible to the next decision) and queue it for flushing.

        ``key`` names what the delta belongs to (``"decision:<sample id>"``), so a store can apply it
        at most once per key (:meth:`take_keyed`).
        """
        if not delta:
            return
        for name, value in delta.items():
            prev = self._local.get(name)
            self._local[name] = value if prev is None else prev + value
        self.pending.append(delta)
        self._keys.append(key)

    def take_pending(self) -> list[Delta]:
        """The queued deltas in the order they were learned (and forget them)."""
        pending, self.pending, self._keys = self.pending, [], []
        return pending

    def take_keyed(self) -> list[tuple[str, Delta]]:
        """The queued deltas merged per key, in first-seen order (and forget them)."""
        keyed: dict[str, list[Delta]] = {}
        for key, delta in zip(self._keys, self.pending):
            keyed.setdefault(key, []).append(delta)
        self.pending, self._keys = [], []
        return [(key, merge_deltas(deltas)) for key, deltas in keyed.items()]


def merge_deltas(deltas: list[Delta]) -> Delta:
    """Sum a list of additive deltas key by key."""
    out: Delta = {}
    for delta in deltas:
        for key, value in delta.items():
            out[key] = value if key not in out else out[key] + value
    return out


class Policy:
    """Base class: settings are constructor keywords (same names as ``--set k=v``); state lives outside.

    Subclasses set ``name`` and implement :meth:`decide` and, if they learn, :meth:`learn`.
    """

    name: ClassVar[str] = ""
    #: Reads labels or hindsight: allowed in the offline evaluator only, refused by the live pipeline.
    offline_only: ClassVar[bool] = False
    #: Settings every policy accepts besides its own.
    common_params: ClassVar[tuple[str, ...]] = ("seed",)
    #: Which epoch of its learned state the policy reads and writes (0: the first; see :func:`epoch_namespace`).
    epoch: int = 0

    def __init__(self, *, cost: CostModel, num_layers: int, num_classes: int = 2, seed: int = 0) -> None:
        if num_layers < 1:
            raise ConfigError(f"policy {self.name!r}: num_layers must be >= 1, got {num_layers}")
        self.cost = cost
        self.num_layers = num_layers
        self.num_classes = num_classes
        self.seed = int(seed)

    # -- what subclasses implement ---------------------------------------------------------------
    def decide(self, obs: Observation, state: StateView) -> Action:
        """Next action for this sample. Must not change anything (reads never change state)."""
        raise NotImplementedError

    def learn(self, event: Event, state: StateView) -> Delta:
        """Additive deltas for ``event``; the default policy learns nothing."""
        return {}

    def context(self, obs: Observation, action: Action, state: StateView | None = None) -> dict[str, Any]:
        """Small JSON-able record of the decision, carried with an offload and echoed back in feedback.

        ``state`` is the view that :meth:`decide` just read (so a learned threshold can be recorded as used).
        """
        return {}

    def params(self) -> dict[str, Any]:
        """The settings that define this policy's state namespace (override to add your own)."""
        return {"seed": self.seed}

    # -- shared helpers --------------------------------------------------------------------------
    def setting(self, key: str, value: Any, kind: type = float, low: float | None = None,
                high: float | None = None) -> Any:
        """``value`` as ``kind``, checked against [low, high]; errors name the policy, key and bad value."""
        try:
            out = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"policy {self.name!r}: {key} must be a {kind.__name__}, got {value!r}") from None
        if (low is not None and out < low) or (high is not None and out > high):
            bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            raise ConfigError(f"policy {self.name!r}: {key} must be in {bounds}, got {value!r}")
        return out

    def base_namespace(self) -> str:
        """``name:hash(params, cost model, shape)``: what identifies this policy's state across epochs."""
        cached = self.__dict__.get("_base_namespace")
        if cached is None:
            blob = json.dumps({"params": self.params(), "cost": dataclasses.asdict(self.cost),
                               "layers": self.num_layers, "classes": self.num_classes},
                              sort_keys=True, default=str)
            cached = self._base_namespace = f"{self.name}:{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
        return cached

    def namespace(self) -> str:
        """The key under which this policy's state is kept in its current ``epoch`` (see :func:`epoch_namespace`)."""
        return epoch_namespace(self.base_namespace(), self.epoch)

    def expiry(self, delta: Delta) -> Delta:
        """What undoing the in-flight part of a sample's ``delta`` adds, should its feedback never come.

        A policy that counts pulls awaiting feedback (SplitEE's ``p<i>``) returns their negation; the device
        registers it with the offload and applies it once if the pull outlives the pending timeout
        (:meth:`stream.checkpoint.Checkpointer.expire_pending`). Default: nothing is in flight.
        """
        return {}

    def in_flight_fields(self) -> list[str]:
        """Fields that count pulls awaiting feedback (SplitEE's ``p<i>``). A new epoch never copies them
        (decay, or a policy's own reaction): the feedback of a pull is learned by the epoch that decided it,
        so a copy would stay raised forever. Default: none."""
        return []

    def drift_drop(self) -> list[str]:
        """Fields the epoch begun by the policy's own drift reaction (:meth:`drift_delta`) does not copy,
        beside :meth:`in_flight_fields` (e.g. SplitEE's online α vectors). Default: none."""
        return []

    def drift_delta(self, state: "StateView") -> Delta:
        """The policy's own reaction to a detected shift: what ``on_drift(state)`` returns when the policy
        defines it (e.g. a cut that makes its time buckets before now ignored), else ``{}``.

        A new epoch then starts as a copy of the old one plus this delta (the policy forgets by itself);
        with ``{}`` it starts the store's default way, empty (``reset``) or ``factor`` × the old (``decay``).
        """
        hook = getattr(self, "on_drift", None)
        if not callable(hook):
            return {}
        try:
            inspect.signature(hook).bind(state)
        except TypeError:
            log.warning("policy %r: on_drift%s does not take (state); it is not called", self.name,
                        inspect.signature(hook))
            return {}
        return dict(hook(state) or {})

    def describe(self, state: Mapping[str, Value]) -> dict[str, Any]:
        """A readable summary of learned ``state`` (``exitflow policy show``); default: the raw numbers."""
        return {k: (v.round(6).tolist() if isinstance(v, np.ndarray) else round(float(v), 6))
                for k, v in sorted(state.items())}

    def sample_rng(self, sample_id: str) -> np.random.Generator:
        """Randomness per sample: the same sample gets the same draw in every worker and after a restart."""
        digest = hashlib.blake2b(f"{self.seed}:{sample_id}".encode(), digest_size=8).digest()
        return np.random.default_rng(int.from_bytes(digest, "little"))

    def reward_exit(self, confidence: float, trace: Trace) -> float:
        """SplitEE-style reward of a decision: confidence minus μ × the cost of what ran."""
        return confidence - self.cost.mu * self.cost.breakdown(trace).total

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({inner})"
