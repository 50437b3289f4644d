"""The triage example as a real subprocess, and the chat stand-in it replies to."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
from examples.triage.receiver import ChatReceiver

from loopback import UvicornThread, loopback_socket

ROOT = Path(__file__).resolve().parents[2]
GITHUB_SECRET = "e2e-github-secret"
CHAT_SECRET = "whsec_" + base64.b64encode(b"e2e-chat-signing-secret-32bytes!").decode()
ADMIN_TOKEN = "e2e-admin-token-0123456789"


def free_port() -> int:
    with loopback_socket() as sock:
        return int(sock.getsockname()[1])


def app_env() -> dict[str, str]:
    """The app's environment: the secrets it seals, a sealing key (no PBKDF2 wait), no
    model API key (the scripted model decides)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "MISTRAL_API_KEY")
    }
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        GITHUB_WEBHOOK_SECRET=GITHUB_SECRET,
        CHAT_SIGNING_SECRET=CHAT_SECRET,
        TRIAGE_AGENT_KEY=base64.b64encode(b"a" * 32).decode(),  # one agent, every process
        TRIAGE_SECRETS_KEY=base64.b64encode(b"k" * 32).decode(),
        TRIAGE_ADMIN_TOKEN=ADMIN_TOKEN,
        PYTHONUNBUFFERED="1",
    )
    return env


class Chat:
    """The chat stand-in served from a thread of this process (it outlives the app)."""

    def __init__(self) -> None:
        self.app = ChatReceiver(CHAT_SECRET)
        self.server = UvicornThread(self.app, name="chat").start()
        self.url = f"{self.server.url}/messages"

    def by_issue(self) -> dict[int, set[str]]:
        """Idempotency keys of the replies kept, per issue number."""
        out: dict[int, set[str]] = {}
        for key, body in list(self.app.messages.items()):
            out.setdefault(int(body["issue"]), set()).add(key)
        return out

    def stop(self) -> None:
        self.server.stop()


class TriageProcess:
    """``python -m examples.triage`` on ``port`` with its data in ``workdir``.

    ``role="agents"`` serves no HTTP: it counts as started once it printed its banner.
    """

    def __init__(
        self,
        workdir: Path,
        port: int,
        chat_url: str,
        *,
        backend: str = "asyncio",
        log: str = "",
        store: str | None = None,
        role: str = "all",
        options: Sequence[str] = (),
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir / f"app{log}.log"
        data = workdir / f"data{log}" if role == "agents" else workdir / "data"
        command = [
            sys.executable,
            "-m",
            "examples.triage",
            "--dir",
            str(data),
            "--port",
            str(port),
            "--receiver-url",
            chat_url,
            "--issues",
            "0",
            "--model-delay",
            "0.02",
            "--lease-sec",
            "2",
            "--claim-idle-sec",
            "2",
            "--backend",
            backend,
            "--role",
            role,
        ]
        if store is not None:
            command += ["--store", store]
        command += options  # later options win: --model-delay 0.3, ...
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(
            command, cwd=workdir, stdout=self._log_file, stderr=subprocess.STDOUT, env=app_env()
        )
        deadline = time.monotonic() + 20
        while not self._ready(role):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("the triage app did not start:\n" + self.log.read_text())
            time.sleep(0.05)

    def _ready(self, role: str) -> bool:
        if role == "agents":
            return "  backend " in self.log.read_text()
        try:
            return httpx.get(f"{self.url}/readyz", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL (no cleanup of any kind)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._log_file.close()

    def stop(self) -> int:
        """SIGTERM, and the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        code = self.process.wait()
        self._log_file.close()
        return code
