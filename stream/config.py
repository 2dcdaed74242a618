"""Shared settings: where things live (home, default model), which topics, how to reach Kafka and Redis."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

TOPIC_NAMES = ("samples", "labels", "offload.edge", "offload.cloud", "results", "feedback", "dlq")


def home() -> Path:
    """Where exitflow keeps models and state: $EXITFLOW_HOME, else ~/.cache/exitflow."""
    return Path(os.environ.get("EXITFLOW_HOME", Path.home() / ".cache" / "exitflow"))


def default_model_dir() -> Path:
    """The default model: MiniLM-L6 with six exits, fine-tuned on SST-2 by `exitflow model prepare`."""
    return Path(os.environ.get("EXITFLOW_MODEL", home() / "models" / "minilm-sst2"))


def data_dir() -> Path:
    """The shared datasets folder: $EXITFLOW_DATA, else ../shared/data next to the checkout."""
    env = os.environ.get("EXITFLOW_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "shared" / "data", here.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return here.parent / "shared" / "data"


@dataclasses.dataclass(frozen=True)
class Topics:
    """Topic names, all under one prefix (default `exitflow.`)."""

    prefix: str = "exitflow."

    def name(self, short: str) -> str:
        if short not in TOPIC_NAMES:
            raise KeyError(f"unknown topic {short!r}; expected one of {', '.join(TOPIC_NAMES)}")
        return self.prefix + short

    @property
    def samples(self) -> str:
        return self.name("samples")

    @property
    def labels(self) -> str:
        return self.name("labels")

    @property
    def offload_edge(self) -> str:
        return self.name("offload.edge")

    @property
    def offload_cloud(self) -> str:
        return self.name("offload.cloud")

    @property
    def results(self) -> str:
        return self.name("results")

    @property
    def feedback(self) -> str:
        return self.name("feedback")

    @property
    def dlq(self) -> str:
        return self.name("dlq")

    def all(self) -> list[str]:
        return [self.name(t) for t in TOPIC_NAMES]
