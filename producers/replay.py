"""Replay datasets and scenarios into the ``samples`` topic (labels go to ``labels`` only).

A scenario chains segments of several datasets to create domain drift on purpose, e.g. SST-2
sentences, then IMDb reviews, then out-of-domain news (AG News, sent without labels to a sentiment
model). Back-pressure: kafka-python 3 has no bounded send buffer, so replay waits for the acks of
every ``window`` samples before sending more; memory stays bounded however fast the source is.

Scenario file (YAML or TOML)::

    name: sst2-imdb-news
    seed: 0
    rate: 0            # samples/s over the whole scenario, 0 = as fast as the broker takes them
    segments:
      - {dataset: sst2, split: dev, shuffle: true}
      - {dataset: imdb, limit: 2000, shuffle: true}
      - {dataset: ag_news, limit: 1000, shuffle: true, labels: false}
      - name: imdb-to-news            # a gradual drift: a mix whose second part's share rises
        length: 1000                  # samples in the segment
        share: [0.0, 1.0]             # share of the second part, linear from the first sample to the last
        mix:
          - {dataset: imdb, shuffle: true, offset: 2000}
          - {dataset: ag_news, shuffle: true, offset: 1000, labels: false}

``offset`` skips that many samples after shuffling (a recurring segment can replay other samples of the
same dataset). A mixed segment draws each sample's part with the scenario's seed; each part is read in
order, without repeats (when one runs out the other continues). Samples keep the label of the part they
come from as ``source``. Ids are ``<source>-<row id>``, suffixed ``-s<k>`` when a source recurs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from stream import datasets, messages
from stream import kafka as K
from stream.config import Topics
from stream.errors import ConfigError, InfraError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Segment:
    """One dataset slice of a stream, or (``mix``) a blend of two whose second share moves along ``share``."""

    dataset: str = ""
    split: str | None = None
    limit: int | None = None
    shuffle: bool = False
    seed: int = 0
    labels: bool = True
    name: str | None = None
    offset: int = 0
    mix: tuple["Segment", ...] = ()
    share: tuple[float, float] = (0.0, 1.0)
    length: int | None = None

    @property
    def label(self) -> str:
        if self.mix:
            return self.name or "+".join(part.label for part in self.mix)
        return self.name or (f"{self.dataset}-{self.split}" if self.split else self.dataset)

    def load(self):
        """This slice of its dataset (not for a mix: see :func:`_rows`)."""
        ds = datasets.shuffle_limit(datasets.load(self.dataset, self.split), self.shuffle, self.seed,
                                    None if self.limit is None else self.offset + self.limit)
        return ds.subset(list(range(self.offset, len(ds)))) if self.offset else ds


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    segments: tuple[Segment, ...]
    rate: float = 0.0
    loop: bool = False


def load_scenario(path: str | Path) -> Scenario:
    """Read a YAML (``.yml``/``.yaml``) or TOML scenario; errors name the file and the segment."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"scenario file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib
        data = tomllib.loads(text)
    else:
        import yaml
        data = yaml.safe_load(text)
    if not isinstance(data, dict) or not isinstance(data.get("segments"), list) or not data["segments"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty 'segments' list")
    seed = int(data.get("seed", 0))
    segments = [_segment(raw, f"{path}: segment {i}", seed) for i, raw in enumerate(data["segments"], 1)]
    return Scenario(str(data.get("name", path.stem)), tuple(segments), float(data.get("rate", 0.0)),
                    bool(data.get("loop", False)))


SEGMENT_FIELDS = {f.name for f in dataclasses.fields(Segment)}


def _segment(raw, where: str, seed: int, nested: bool = False) -> Segment:
    """One segment of a scenario file, checked; ``where`` names the file and segment in errors."""
    if not isinstance(raw, dict) or ("dataset" not in raw and ("mix" not in raw or nested)):
        raise ConfigError(f"{where} must be a mapping with a 'dataset'{'' if nested else ' or a mix'}, got {raw!r}")
    allowed = SEGMENT_FIELDS - {"mix", "share", "length"} if nested else SEGMENT_FIELDS
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {sorted(unknown)}; expected {sorted(allowed)}")
    raw = {"seed": seed, **raw}
    if "mix" in raw:
        if "dataset" in raw:
            raise ConfigError(f"{where}: give either a dataset or a mix, not both")
        parts = raw["mix"]
        if not isinstance(parts, list) or len(parts) != 2:
            raise ConfigError(f"{where}: mix must list two parts, got {parts!r}")
        share = raw.get("share", [0.0, 1.0])
        try:
            share = (float(share[0]), float(share[1]))
        except (TypeError, ValueError, IndexError, KeyError):
            raise ConfigError(f"{where}: share must be [start, end], got {share!r}") from None
        if not all(0.0 <= x <= 1.0 for x in share):
            raise ConfigError(f"{where}: share must be within [0, 1], got {list(share)}")
        length = raw.get("length")
        if not isinstance(length, int) or length < 1:
            raise ConfigError(f"{where}: a mix needs length (samples, >= 1), got {length!r}")
        raw["mix"] = tuple(_segment(part, f"{where}, mix part {k}", raw["seed"], nested=True)
                           for k, part in enumerate(parts, 1))
        raw["share"] = share
    try:
        return Segment(**raw)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _rows(segment: Segment, loaded: dict) -> Iterator[tuple[Segment, object, int]]:
    """(part, dataset, row) of each sample of ``segment`` in stream order; a mix draws its part per sample."""
    if not segment.mix:
        ds = loaded[segment]
        for i in range(len(ds)):
            yield segment, ds, i
        return
    import numpy as np
    parts = [(part, loaded[part]) for part in segment.mix]
    pos = [0, 0]
    rng = np.random.default_rng(segment.seed)
    n = segment.length
    for k in range(n):
        share = segment.share[0] + (segment.share[1] - segment.share[0]) * (k / (n - 1) if n > 1 else 1.0)
        pick = int(rng.random() < share)
        if pos[pick] >= len(parts[pick][1]):
            pick = 1 - pick
            if pos[pick] >= len(parts[pick][1]):
                return
        part, ds = parts[pick]
        yield part, ds, pos[pick]
        pos[pick] += 1


def _load_all(scenario: Scenario) -> dict:
    loaded = {}
    for segment in scenario.segments:
        for part in segment.mix or (segment,):
            if part not in loaded:
                loaded[part] = part.load()
    return loaded


def iter_samples(scenario: Scenario, max_samples: int | None = None) -> Iterator[tuple[dict, dict | None]]:
    """(sample, label-or-None) messages in stream order; ids are unique across segments and loops."""
    seq = 0
    loaded = _load_all(scenario)
    round_ = 0
    while True:
        seen: dict[str, int] = {}
        for segment in scenario.segments:
            # a source that recurs (A -> B -> A) gets its ids suffixed, so each sample keeps a unique id
            labels = {part.label for part in segment.mix or (segment,)}
            suffix = {lab: seen.get(lab, 0) for lab in labels}
            for lab in labels:
                seen[lab] = seen.get(lab, 0) + 1
            for part, ds, i in _rows(segment, loaded):
                if max_samples is not None and seq >= max_samples:
                    return
                source = part.label
                sid = f"{source}-{ds.ids[i]}" + (f"-s{suffix[source]}" if suffix[source] else "") + \
                    (f"-r{round_}" if round_ else "")
                sample = {"id": sid, "text": ds.texts[i], "source": source, "seq": seq, "ts": 0.0}
                if ds.text_pairs is not None:
                    sample["text_pair"] = ds.text_pairs[i]
                label = None
                if part.labels and ds.labels is not None:
                    label = {"id": sid, "label": int(ds.labels[i]), "source": source, "seq": seq}
                yield sample, label
                seq += 1
        round_ += 1
        if not scenario.loop:
            return


class _Sender:
    """A producer whose failed sends are sent again, on a fresh producer, before the replay goes on.

    A broker that restarted empty (the embedded one is memory-only) has forgotten the idempotent
    producer: kafka-python then aborts every batch with a fatal InitProducerId error while ``send``
    keeps accepting records, so a replay that only flushes would report samples it never delivered.
    Finished sends are checked as the replay goes; the failed ones are re-sent up to ``tries`` times.
    """

    def __init__(self, bootstrap: str, tries: int = 8) -> None:
        self.bootstrap, self.tries = bootstrap, tries
        self.producer = K.producer(bootstrap)
        self.pending: deque = deque()
        self.resent = 0

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        self.pending.append((self.producer.send(topic, key=key, value=value), topic, key, value))
        failed = []
        while self.pending and self.pending[0][0].is_done:
            fut, *record = self.pending.popleft()
            if fut.failed():
                failed.append((record, fut.exception))
        if failed:
            self._resend(failed)

    def flush(self) -> None:
        self.producer.flush()
        failed = [(record, fut.exception) for fut, *record in self.pending if fut.failed()]
        self.pending.clear()
        if failed:
            self._resend(failed)

    def _resend(self, failed: list) -> None:
        for attempt in range(1, self.tries + 1):
            # the batches sent after a failure fail the same way: take them along
            self.producer.flush()
            failed += [(record, fut.exception) for fut, *record in self.pending if fut.failed()]
            self.pending.clear()
            log.warning("replay: %d records failed to reach Kafka at %s (%s); new producer, attempt %d of %d",
                        len(failed), self.bootstrap, failed[0][1], attempt, self.tries)
            self.producer.close(timeout=1)
            time.sleep(min(0.5 * attempt, 3.0))
            self.producer = K.producer(self.bootstrap)
            futures = [(self.producer.send(t, key=k, value=v), t, k, v) for (t, k, v), _ in failed]
            self.producer.flush()
            self.resent += len(failed)
            failed = [(record, fut.exception) for fut, *record in futures if fut.failed()]
            if not failed:
                return
        raise InfraError(f"replay: {len(failed)} records could not be sent to Kafka at {self.bootstrap} after "
                         f"{self.tries} new producers: {failed[0][1]}")

    def close(self) -> None:
        self.producer.close()


def replay(scenario: Scenario, bootstrap: str, topics: Topics, limit: int | None = None,
           progress: bool = True, window: int = 2000) -> int:
    """Send the scenario to Kafka at its rate; returns the number of samples sent (and acknowledged)."""
    from tqdm import tqdm
    total = limit
    if total is None and not scenario.loop:
        total = sum(1 for _ in iter_samples(scenario))
    producer = _Sender(bootstrap)
    sent = 0
    started = time.monotonic()
    bar = tqdm(total=total, desc=f"replay {scenario.name}", unit="sample", disable=not progress)
    try:
        for sample, label in iter_samples(scenario, limit):
            if scenario.rate > 0:
                delay = started + sent / scenario.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            sample["ts"] = time.time()
            key = sample["id"].encode()
            producer.send(topics.samples, key, messages.encode("sample", sample))
            if label is not None:
                producer.send(topics.labels, key, messages.encode("label", label))
            sent += 1
            bar.update(1)
            if sent % window == 0:
                producer.flush()
        producer.flush()
    finally:
        bar.close()
        producer.close()
    log.info("replayed %d samples of %s in %.1fs%s", sent, scenario.name, time.monotonic() - started,
             f" ({producer.resent} records sent again after a broker failure)" if producer.resent else "")
    return sent


def single(dataset: str, split: str | None = None, limit: int | None = None, shuffle: bool = False,
           seed: int = 0, rate: float = 0.0, loop: bool = False, labels: bool = True) -> Scenario:
    """A one-segment scenario for `exitflow replay DATASET`."""
    segment = Segment(dataset, split, None if loop else limit, shuffle, seed, labels)
    return Scenario(segment.label, (segment,), rate, loop)
