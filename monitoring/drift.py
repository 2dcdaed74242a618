"""Drift detection (river) over the signals a result carries, without labels, and over errors once joined.

Signals: ``confidence`` (max class probability at the exit where the policy decided), ``offload``
(1 when the sample left the device), ``distance`` (DIMEE distance to the nearest centroid, when the
policy reports it) and ``error`` (1 when the prediction missed the label; evaluation only).

Each detector sees one signal. Page-Hinkley (and KSWIN, when configured) get the signal standardised
with the mean and standard deviation of a warm-up window, so one threshold (in standard deviations)
suits signals of any scale; after a detection the warm-up starts again on the new regime. ADWIN reads the raw [0, 1]
signals and the distance scaled to the warm-up's range. A detector that fired stays quiet for
``cooldown`` observations, so one shift yields one event per detector rather than a burst.

>>> import random
>>> rng = random.Random(7)
>>> mon = DriftMonitor()
>>> stream = [rng.gauss(0.9, 0.05) for _ in range(2000)] + [rng.gauss(0.7, 0.1) for _ in range(1000)]
>>> hits = [e for i, x in enumerate(stream) for e in mon.update("confidence", x, seq=i)]
>>> sorted({e.detector for e in hits}), all(e.seq >= 2000 for e in hits)
(['adwin', 'page_hinkley'], True)
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time as _time
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter

SIGNALS = ("confidence", "offload", "distance", "error")
Scale = Literal["none", "z", "unit"]


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    """One detector: river ``kind`` with ``params``, how the signal is scaled, and its warm-up."""

    kind: Literal["adwin", "page_hinkley", "kswin"]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    scale: Scale = "none"
    warmup: int = 0
    min_std: float = 0.02
    cooldown: int = 300
    every: int = 1  # feed every n-th value only (KSWIN's test costs ≈ 0.2 ms per update)

    def build(self):
        from river import drift
        cls = {"adwin": drift.ADWIN, "page_hinkley": drift.PageHinkley, "kswin": drift.KSWIN}[self.kind]
        return cls(**self.params)


def _ph(threshold: float = 30.0, delta: float = 0.25, warmup: int = 200, min_std: float = 0.02) -> DetectorSpec:
    return DetectorSpec("page_hinkley", {"min_instances": 30, "delta": delta, "threshold": threshold,
                                         "alpha": 1 - 1e-4, "mode": "both"}, "z", warmup, min_std)


def _adwin(scale: Scale = "none") -> DetectorSpec:
    return DetectorSpec("adwin", {"delta": 0.002}, scale, 200 if scale != "none" else 0)


def kswin(alpha: float = 1e-5, window: int = 400, every: int = 1) -> DetectorSpec:
    """KSWIN on a standardised signal. Not in the defaults: on the replays below it was no faster than
    Page-Hinkley and its KS test costs ≈ 0.2 ms per update (scipy), ≈ 100× ADWIN and Page-Hinkley."""
    return DetectorSpec("kswin", {"alpha": alpha, "window_size": window, "stat_size": window // 4, "seed": 7},
                        "z", 200, every=every)


# Tuned on SST-2 dev → IMDb → AG News replays of confidence matrices through static-maxprob
# (python -m bench.monitoring drift): Page-Hinkley thresholds are in standard deviations of a
# warm-up window; binary signals get a floor on that deviation so rare events do not explode it.
DEFAULT_DETECTORS: dict[str, tuple[DetectorSpec, ...]] = {
    "confidence": (_adwin(), _ph(threshold=30, delta=0.25, warmup=100)),   # per stratum: shorter warm-up
    "offload": (_adwin(), _ph(threshold=40, delta=0.1, warmup=100, min_std=0.3)),
    "distance": (_adwin("unit"), _ph(threshold=30, delta=0.25)),
    "error": (_adwin(), _ph(threshold=40, delta=0.1, min_std=0.3)),
}


class Detector:
    """A river detector on one signal, fed through the scaling its spec asks for."""

    def __init__(self, spec: DetectorSpec) -> None:
        self.spec = spec
        self._river = spec.build()
        self._buffer: list[float] | None = [] if spec.scale != "none" and spec.warmup > 0 else None
        self._shift, self._scale = 0.0, 1.0
        self._quiet = 0
        self._skip = 0

    @property
    def name(self) -> str:
        return self.spec.kind

    def update(self, x: float) -> bool:
        """Feed one value; True when this value completes a detection (outside the cooldown)."""
        if self.spec.every > 1:
            self._skip = (self._skip + 1) % self.spec.every
            if self._skip:
                return False
        if self._buffer is not None:
            self._buffer.append(x)
            if len(self._buffer) < self.spec.warmup:
                return False
            values, self._buffer = self._buffer, None
            self._fit(values)
            fired = False
            for v in values:
                if self._buffer is not None:  # a detection inside the warm-up started a new one
                    self._buffer.append(v)
                else:
                    fired = self._feed(v) or fired
            return fired
        return self._feed(x)

    def _fit(self, values: list[float]) -> None:
        n = len(values)
        if self.spec.scale == "z":
            mean = sum(values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1))
            self._shift, self._scale = mean, max(std, self.spec.min_std)
        else:  # unit: the warm-up's range maps to [0, 1]
            lo, hi = min(values), max(values)
            self._shift, self._scale = lo, max(hi - lo, 1e-9)

    def _feed(self, x: float) -> bool:
        self._river.update((x - self._shift) / self._scale)
        if self._quiet:
            self._quiet -= 1
        if not self._river.drift_detected:
            return False
        if self.spec.scale != "none" and self.spec.warmup > 0:
            self._river = self.spec.build()  # the next regime gets its own warm-up
            self._buffer = []
        if self._quiet:
            return False
        self._quiet = self.spec.cooldown
        return True


@dataclasses.dataclass(frozen=True)
class DriftEvent:
    """One detection: when, on which signal (and stratum), by which detector, at which stream position."""

    time: float
    signal: str
    detector: str
    seq: int | None
    source: str | None
    index: int  # how many values of this signal the monitor had seen, this one included
    stratum: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DriftMonitor:
    """Runs the detectors of every signal, counts detections and keeps the latest events.

    A signal can be split into strata, each with its own detectors: the confidence and offload signals
    depend on where the policy decides, so they are watched per (policy version, decision layer). A
    bandit moving its split layer, or a hot swap, then starts fresh strata instead of looking like a
    shift of the data. Only the ``max_strata`` most recently created strata are kept.
    """

    def __init__(self, detectors: dict[str, tuple[DetectorSpec, ...]] | None = None,
                 registry: CollectorRegistry | None = None, max_events: int = 500, max_strata: int = 64) -> None:
        self.specs = DEFAULT_DETECTORS if detectors is None else detectors
        unknown = set(self.specs) - set(SIGNALS)
        if unknown:
            raise ValueError(f"unknown drift signal(s) {sorted(unknown)}; expected some of {SIGNALS}")
        self._detectors: collections.OrderedDict[tuple[str, str | None], list[Detector]] = collections.OrderedDict()
        self.max_strata = max_strata
        self._seen = collections.Counter()
        self.events: collections.deque[DriftEvent] = collections.deque(maxlen=max_events)
        self.total = 0
        self._counter = None
        if registry is not None:
            self._counter = Counter("exitflow_drift_detections", "Drift detections by signal and detector",
                                    ["signal", "detector"], registry=registry)
            for signal, group in self.specs.items():
                for spec in group:
                    self._counter.labels(signal, spec.kind)

    def _group(self, signal: str, stratum: str | None) -> list[Detector] | None:
        key = (signal, stratum)
        group = self._detectors.get(key)
        if group is None:
            specs = self.specs.get(signal)
            if specs is None:
                return None
            group = self._detectors[key] = [Detector(s) for s in specs]
            while len(self._detectors) > self.max_strata:
                self._detectors.popitem(last=False)
        return group

    def update(self, signal: str, value: float, *, seq: int | None = None, source: str | None = None,
               time: float | None = None, stratum: str | None = None) -> list[DriftEvent]:
        """Feed one value of ``signal`` (in ``stratum``); returns the detections it completed (usually none)."""
        group = self._group(signal, stratum)
        if group is None:
            return []
        self._seen[signal] += 1
        fired = []
        for det in group:
            if det.update(float(value)):
                event = DriftEvent(_time.time() if time is None else time, signal, det.name, seq, source,
                                   self._seen[signal], stratum)
                fired.append(event)
                self.events.append(event)
                self.total += 1
                if self._counter is not None:
                    self._counter.labels(signal, det.name).inc()
        return fired

    def observe_result(self, record: dict[str, Any], time: float | None = None) -> list[DriftEvent]:
        """The label-free signals of one result record."""
        where = dict(seq=record.get("seq"), source=record.get("source"), time=time or record.get("ts"))
        decision = record.get("decision") or {}
        stratum = f"v{(record.get('policy') or {}).get('version')}:L{decision.get('layer')}"
        fired = []
        conf = decision.get("confidence")
        if conf is not None:
            fired += self.update("confidence", conf, stratum=stratum, **where)
        fired += self.update("offload", 0.0 if record.get("tier") == "device" else 1.0, stratum=stratum, **where)
        distance = record.get("embedding_distance")
        if distance is not None:
            fired += self.update("distance", distance, **where)
        return fired

    def observe_error(self, wrong: bool, record: dict[str, Any], time: float | None = None) -> list[DriftEvent]:
        """The error indicator of a result whose label arrived (evaluation only), per policy version."""
        version = record.get("version", (record.get("policy") or {}).get("version"))
        return self.update("error", 1.0 if wrong else 0.0, seq=record.get("seq"), source=record.get("source"),
                           time=time or record.get("ts"), stratum=f"v{version}")


# -- the device worker's drift hook (consumers/device.py): one detector on the distance signal -------------

HookKind = Literal["page_hinkley", "adwin"]
HookMode = Literal["reset", "decay"]
#: Per-kind defaults of ``delta``: Page-Hinkley's tolerated drift (in warm-up standard deviations), ADWIN's
#: confidence.
HOOK_DELTA = {"page_hinkley": 0.25, "adwin": 0.02}
#: ADWIN tests for a cut every this many values (river's default: 32, which rounds delays up to it).
ADWIN_CLOCK = 4


@dataclasses.dataclass(frozen=True)
class HookSettings:
    """What the device worker's drift hook runs and does on a detection.

    ``kind`` watches the distance of each input embedding to the nearest in-domain class centroid:
    ``page_hinkley`` on the signal standardised by a ``warmup`` window (``threshold`` and ``delta`` in its
    standard deviations), or ``adwin`` (``delta`` its confidence) on the signal scaled to the warm-up's
    range. On a detection the active policy's learned state starts a new epoch: ``reset`` (empty) or
    ``decay`` (``factor`` × the old epoch's additive fields). ``cooldown``: samples after a detection
    during which the detector stays quiet (its warm-up restarts at once).

    Defaults measured by ``python -m bench drift_hook`` (SST-2 dev reference centroids, 504k stationary
    samples of SST-2 dev/train, IMDb, AG News): ADWIN δ = 0.02 raised no false alarm (Page-Hinkley at
    threshold 30: 0.71 per 10k) and detects SST-2 → IMDb after 41 samples (median) and IMDb → AG News after 19.

    >>> HookSettings().describe()
    'adwin(delta=0.02, warmup=200) -> reset'
    >>> HookSettings.from_dict({"mode": "decay", "factor": "0.3"}).factor
    0.3
    """

    enabled: bool = True
    kind: HookKind = "adwin"
    threshold: float = 30.0
    delta: float | None = None
    warmup: int = 200
    cooldown: int = 300
    mode: HookMode = "reset"
    factor: float = 0.5

    def __post_init__(self) -> None:
        from stream.errors import ConfigError
        if self.kind not in HOOK_DELTA:
            raise ConfigError(f"drift hook: kind must be one of {sorted(HOOK_DELTA)}, got {self.kind!r}")
        if self.mode not in ("reset", "decay"):
            raise ConfigError(f"drift hook: mode must be reset or decay, got {self.mode!r}")
        if not 0.0 <= self.factor < 1.0:
            raise ConfigError(f"drift hook: factor must be in [0, 1), got {self.factor!r}")
        if self.threshold <= 0 or self.warmup < 30 or self.cooldown < 0:
            raise ConfigError(f"drift hook: need threshold > 0, warmup >= 30, cooldown >= 0; got "
                              f"threshold={self.threshold!r}, warmup={self.warmup!r}, cooldown={self.cooldown!r}")
        if self.delta is None:
            object.__setattr__(self, "delta", HOOK_DELTA[self.kind])

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "HookSettings":
        """From strings or JSON values (``exitflow policy drift --set``, the Redis hash); errors name the key."""
        from stream.errors import ConfigError
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(kinds)
        if unknown:
            raise ConfigError(f"drift hook: unknown setting(s) {sorted(unknown)}; expected {sorted(kinds)}")
        out: dict[str, Any] = {}
        for key, value in raw.items():
            try:
                if key == "enabled":
                    out[key] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "on", "yes")
                elif key in ("warmup", "cooldown"):
                    out[key] = int(value)
                elif key in ("threshold", "factor", "delta"):
                    out[key] = None if value in (None, "", "none") else float(value)
                else:
                    out[key] = str(value)
            except (TypeError, ValueError):
                raise ConfigError(f"drift hook: {key} must be a number, got {value!r}") from None
        return cls(**out)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        knobs = f"threshold={self.threshold:g}, delta={self.delta:g}" if self.kind == "page_hinkley" else \
            f"delta={self.delta:g}"
        action = "reset" if self.mode == "reset" else f"decay x{self.factor:g}"
        return f"{self.kind}({knobs}, warmup={self.warmup}) -> {action}"

    def spec(self) -> DetectorSpec:
        if self.kind == "adwin":
            return dataclasses.replace(_adwin("unit"), params={"delta": self.delta, "clock": ADWIN_CLOCK}, warmup=self.warmup,
                                       cooldown=self.cooldown)
        return dataclasses.replace(_ph(threshold=self.threshold, delta=self.delta, warmup=self.warmup),
                                   cooldown=self.cooldown)


class HookDetector:
    """The hook's detector: :class:`Detector` on the distance signal, restartable when an epoch begins.

    >>> import random
    >>> rng = random.Random(3)
    >>> det = HookDetector(HookSettings())
    >>> stream = [rng.gauss(1.0, 0.1) for _ in range(1500)] + [rng.gauss(1.6, 0.1) for _ in range(500)]
    >>> [i for i, x in enumerate(stream) if det.update(x)]
    [1511]
    """

    def __init__(self, settings: HookSettings) -> None:
        self.settings = settings
        self.restart()

    def restart(self) -> None:
        """Forget the regime: the next values start a new warm-up (another worker began an epoch)."""
        self._det = Detector(self.settings.spec())

    def update(self, distance: float) -> bool:
        return self.settings.enabled and self._det.update(float(distance))


def reference_centroids(source):
    """Per-class centroids ``[C, H]`` of the input embeddings of a labelled matrix (e.g. the SST-2 dev
    calibration): a :class:`~stream.matrix.ConfidenceMatrix` or the path of one."""
    import numpy as np

    from stream.errors import DataError
    from stream.matrix import ConfidenceMatrix
    matrix = source if isinstance(source, ConfidenceMatrix) else ConfidenceMatrix.load(source)
    if matrix.embeddings is None or matrix.labels is None:
        where = matrix.meta.get("path", "the reference matrix") if source is matrix else source
        raise DataError(f"{where}: a reference matrix needs embeddings and labels")
    return np.stack([matrix.embeddings[matrix.labels == c].mean(0) for c in np.unique(matrix.labels)])


def reference_distance(embeddings, centroids) -> list[float | None]:
    """Distance of each input embedding to its nearest reference centroid: the unsupervised drift signal."""
    import numpy as np

    if centroids is None:
        return [None] * len(embeddings)
    d = np.linalg.norm(embeddings[:, None, :] - centroids[None, :, :], axis=-1).min(1)
    return [float(x) for x in d]
