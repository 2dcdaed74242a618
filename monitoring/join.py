"""Joining results with their labels by sample id, in bounded memory.

Labels and results arrive on two topics in any order, and either may never arrive (a sample sent
to the dead-letter topic has no result; a replay without labels has no label). Whichever side comes
first waits in an insertion-ordered map, bounded by ``capacity`` entries and ``max_age_s`` seconds;
what falls out is counted (``missing``: results whose label never came, ``orphans``: labels whose
result never came) and forgotten. Labels feed evaluation only, never a policy.

>>> j = LabelJoin(capacity=2)
>>> j.add_result("a", {"prediction": 1}, now=0.0)
[]
>>> [(p.sample_id, p.label, p.result["prediction"]) for p in j.add_label("a", 1, now=0.5)]
[('a', 1, 1)]
>>> j.add_label("b", 0, now=1.0), j.add_label("c", 0, now=1.0), j.add_label("d", 1, now=1.0)
([], [], [])
>>> j.orphans, len(j)
(1, 2)
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any


@dataclasses.dataclass(frozen=True)
class Pair:
    sample_id: str
    label: int
    result: dict[str, Any]

    @property
    def correct(self) -> bool:
        return self.result.get("prediction") == self.label


class LabelJoin:
    """Pending results and labels, each at most ``capacity`` entries and ``max_age_s`` old."""

    def __init__(self, capacity: int = 50_000, max_age_s: float = 600.0) -> None:
        if capacity < 1 or max_age_s <= 0:
            raise ValueError(f"LabelJoin needs capacity >= 1 and max_age_s > 0, got {capacity}, {max_age_s}")
        self.capacity = int(capacity)
        self.max_age_s = float(max_age_s)
        self._results: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._labels: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self.joined = 0
        self.missing = 0   # results dropped before their label came
        self.orphans = 0   # labels dropped before their result came
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._results) + len(self._labels)

    @property
    def pending_results(self) -> int:
        return len(self._results)

    @property
    def pending_labels(self) -> int:
        return len(self._labels)

    def add_result(self, sample_id: str, result: dict[str, Any], now: float) -> list[Pair]:
        """A result (keep only what evaluation needs: it stays in memory until its label comes)."""
        pending = self._labels.pop(sample_id, None)
        if pending is not None:
            self.joined += 1
            return [Pair(sample_id, pending[1], result)]
        if sample_id in self._results:
            self.duplicates += 1
            return []
        self._results[sample_id] = (now, result)
        self.missing += self._trim(self._results, now)
        return []

    def add_label(self, sample_id: str, label: int, now: float) -> list[Pair]:
        pending = self._results.pop(sample_id, None)
        if pending is not None:
            self.joined += 1
            return [Pair(sample_id, label, pending[1])]
        if sample_id in self._labels:
            self.duplicates += 1
            return []
        self._labels[sample_id] = (now, label)
        self.orphans += self._trim(self._labels, now)
        return []

    def expire(self, now: float) -> None:
        """Drop what waited longer than ``max_age_s`` (call now and then, e.g. once a second)."""
        self.missing += self._trim(self._results, now)
        self.orphans += self._trim(self._labels, now)

    def _trim(self, pending: OrderedDict, now: float) -> int:
        dropped = 0
        while len(pending) > self.capacity:
            pending.popitem(last=False)
            dropped += 1
        horizon = now - self.max_age_s
        while pending:
            first = next(iter(pending.values()))
            if first[0] >= horizon:
                break
            pending.popitem(last=False)
            dropped += 1
        return dropped
