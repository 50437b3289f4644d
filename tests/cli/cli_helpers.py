"""A real ``converge gateway`` process, on a free loopback port, for the CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx

import converge
from loopback import UvicornThread, read_request, serve_lifespan
from redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "gateway.toml"
# The example's outbound target, as the file names it; tests never send there: they
# rewrite it to a server they started (see example_config).
EXAMPLE_TARGET = tomllib.loads(EXAMPLE.read_text())["targets"]["app"]["url"]
# Subprocesses import the converge these tests imported, whatever their working directory.
SRC = str(Path(converge.__file__).resolve().parents[1])


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``converge`` subprocess: this converge first on the path."""
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def converge_cli(
    *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m converge ARGV`` as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "converge", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(env),
    )


class Recorder:
    """A target the tests start themselves: records every request, answers 200."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        headers, body = await read_request(scope, receive)
        with self.lock:
            self.requests.append((scope["path"], headers, body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def received(self) -> list[tuple[str, dict[str, str], bytes]]:
        with self.lock:
            return list(self.requests)


def example_config(directory: Path, target_url: str) -> Path:
    """examples/gateway.toml with its target pointed at ``target_url`` (a test server)."""
    text = EXAMPLE.read_text()
    path = directory / "gateway.toml"
    path.write_text(text.replace(EXAMPLE_TARGET, target_url))
    return path


def serve_recorder() -> tuple[Recorder, UvicornThread]:
    """A :class:`Recorder` served on a free loopback port."""
    recorder = Recorder()
    return recorder, UvicornThread(recorder, name="recorder").start()


class GatewayProcess:
    """``converge gateway --config ...`` as a subprocess on a free loopback port."""

    def __init__(
        self,
        config: Path,
        cwd: Path,
        env: dict[str, str] | None = None,
        *,
        open_files: int | None = None,
    ) -> None:
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
            preexec_fn=None if open_files is None else _limit_open_files(open_files),
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


def _limit_open_files(count: int) -> Any:
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))

    return limit
