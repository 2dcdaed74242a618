"""docker-compose.yml is valid (checked offline: no image can be pulled here)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose not installed (Debian package docker-compose; .ci/run installs it)")
def test_compose_file_is_valid():
    out = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for service in ("kafka", "redis", "device", "edge", "cloud", "replay"):
        assert f"  {service}:" in out.stdout
    assert "apache/kafka" in out.stdout and "appendonly" in out.stdout
