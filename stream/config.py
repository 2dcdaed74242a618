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


def add_connection_args(parser, redis: bool = True, kafka: bool = True) -> None:
    """--bootstrap / --redis-url / --prefix, defaulting to $EXITFLOW_BOOTSTRAP / $EXITFLOW_REDIS_URL.

    Secrets stay out of the command line (and so out of logs and `ps`): a Redis password comes from
    $EXITFLOW_REDIS_URL, $EXITFLOW_REDIS_PASSWORD or --redis-url-file.
    """
    if kafka:
        parser.add_argument("--bootstrap", default=os.environ.get("EXITFLOW_BOOTSTRAP", "127.0.0.1:9092"),
                            help="Kafka bootstrap servers (env EXITFLOW_BOOTSTRAP)")
        parser.add_argument("--prefix", default=os.environ.get("EXITFLOW_TOPIC_PREFIX", "exitflow."),
                            help="topic name prefix")
    if redis:
        parser.add_argument("--redis-url", default=None,
                            help="Redis URL without a password (env EXITFLOW_REDIS_URL; default redis://127.0.0.1:6379/0)")
        parser.add_argument("--redis-url-file", type=Path, default=None,
                            help="read the Redis URL (may hold a password) from this file")
        parser.add_argument("--redis-prefix", default="exitflow:", help="key prefix of exitflow's Redis keys")


def redis_url(args) -> str:
    """The Redis URL from --redis-url-file, --redis-url, $EXITFLOW_REDIS_URL, plus $EXITFLOW_REDIS_PASSWORD."""
    if getattr(args, "redis_url_file", None):
        url = Path(args.redis_url_file).read_text().strip()
    else:
        url = args.redis_url or os.environ.get("EXITFLOW_REDIS_URL", "redis://127.0.0.1:6379/0")
    password = os.environ.get("EXITFLOW_REDIS_PASSWORD")
    if password and "@" not in url:
        scheme, rest = url.split("://", 1)
        url = f"{scheme}://:{password}@{rest}"
    return url
