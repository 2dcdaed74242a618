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
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from stream import datasets, messages
from stream import kafka as K
from stream.config import Topics
from stream.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Segment:
    """One dataset slice of a stream."""

    dataset: str
    split: str | None = None
    limit: int | None = None
    shuffle: bool = False
    seed: int = 0
    labels: bool = True
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or (f"{self.dataset}-{self.split}" if self.split else self.dataset)


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
    fields = {f.name for f in dataclasses.fields(Segment)}
    segments = []
    for i, raw in enumerate(data["segments"], 1):
        if not isinstance(raw, dict) or "dataset" not in raw:
            raise ConfigError(f"{path}: segment {i} must be a mapping with a 'dataset', got {raw!r}")
        unknown = set(raw) - fields
        if unknown:
            raise ConfigError(f"{path}: segment {i} has unknown key(s) {sorted(unknown)}; expected {sorted(fields)}")
        segments.append(Segment(**{"seed": seed, **raw}))
    return Scenario(str(data.get("name", path.stem)), tuple(segments), float(data.get("rate", 0.0)),
                    bool(data.get("loop", False)))


def iter_samples(scenario: Scenario, max_samples: int | None = None) -> Iterator[tuple[dict, dict | None]]:
    """(sample, label-or-None) messages in stream order; ids are unique across segments and loops."""
    seq = 0
    loaded = [datasets.shuffle_limit(datasets.load(s.dataset, s.split), s.shuffle, s.seed, s.limit)
              for s in scenario.segments]
    round_ = 0
    while True:
        for segment, ds in zip(scenario.segments, loaded):
            for i in range(len(ds)):
                if max_samples is not None and seq >= max_samples:
                    return
                sid = f"{segment.label}-{ds.ids[i]}" + (f"-r{round_}" if round_ else "")
                sample = {"id": sid, "text": ds.texts[i], "source": segment.label, "seq": seq, "ts": 0.0}
                if ds.text_pairs is not None:
                    sample["text_pair"] = ds.text_pairs[i]
                label = None
                if segment.labels and ds.labels is not None:
                    label = {"id": sid, "label": int(ds.labels[i]), "source": segment.label, "seq": seq}
                yield sample, label
                seq += 1
        round_ += 1
        if not scenario.loop:
            return


def replay(scenario: Scenario, bootstrap: str, topics: Topics, limit: int | None = None,
           progress: bool = True, window: int = 2000) -> int:
    """Send the scenario to Kafka at its rate; returns the number of samples sent."""
    from tqdm import tqdm
    total = limit
    if total is None and not scenario.loop:
        total = sum(len(datasets.shuffle_limit(datasets.load(s.dataset, s.split), s.shuffle, s.seed, s.limit))
                    for s in scenario.segments)
    producer = K.producer(bootstrap)
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
            producer.send(topics.samples, key=key, value=messages.encode("sample", sample))
            if label is not None:
                producer.send(topics.labels, key=key, value=messages.encode("label", label))
            sent += 1
            bar.update(1)
            if sent % window == 0:
                producer.flush()
        producer.flush()
    finally:
        bar.close()
        producer.close()
    log.info("replayed %d samples of %s in %.1fs", sent, scenario.name, time.monotonic() - started)
    return sent


def single(dataset: str, split: str | None = None, limit: int | None = None, shuffle: bool = False,
           seed: int = 0, rate: float = 0.0, loop: bool = False, labels: bool = True) -> Scenario:
    """A one-segment scenario for `exitflow replay DATASET`."""
    segment = Segment(dataset, split, None if loop else limit, shuffle, seed, labels)
    return Scenario(segment.label, (segment,), rate, loop)
