"""A real ``converge gateway`` process, on a free loopback port, for the CLI tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

import converge

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "gateway.toml"
# Subprocesses import the converge these tests imported, whatever their working directory.
SRC = str(Path(converge.__file__).resolve().parents[1])


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``converge`` subprocess: this converge first on the path."""
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GatewayProcess:
    """``converge gateway --config ...`` as a subprocess on a free loopback port."""

    def __init__(self, config: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cwd / "gateway.log"
        command = [
            sys.executable,
            "-m",
            "converge.cli",
            "gateway",
            "--config",
            str(config),
            "--port",
            str(self.port),
        ]
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=subprocess_env(env),
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("gateway did not start:\n" + self.log.read_text())
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
