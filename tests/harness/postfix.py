"""Private Postfix instances (root only): each runs its own master in a temporary
directory, rendered from fixtures/postfix/ by scripts/postfix-conf.sh, on free ports."""

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from . import REPO
from .net import free_port

RENDER = REPO / "scripts" / "postfix-conf.sh"
MASTER = "/usr/lib/postfix/sbin/master"


class Postfix:
    def __init__(self, name: str, directory: Path, lmtp_target: str, sasl_target: str):
        self.name = name
        self.dir = directory
        self.lmtp_target = lmtp_target
        self.sasl_target = sasl_target
        self.smtp_port = self.submission_port = 0
        self.proc: subprocess.Popen | None = None

    def log(self) -> str:
        try:
            return (self.dir / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 20.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.log())
            if m:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"postfix {self.name}: no {pattern!r}:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def start(self) -> "Postfix":
        """Starts Postfix; started again after a kill, it keeps its ports."""
        if not self.smtp_port:
            self.smtp_port, self.submission_port = free_port(), free_port()
        subprocess.run(
            [str(RENDER), self.name, str(self.dir), str(self.smtp_port),
             str(self.submission_port), self.lmtp_target, self.sasl_target],
            check=True, capture_output=True, text=True,
        )
        self.proc = subprocess.Popen(
            [MASTER, "-c", str(self.dir), "-d"],
            stdout=open(self.dir / "maillog", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postfix {self.name} exited:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1) as s:
                    s.settimeout(5)
                    if s.recv(100).startswith(b"220"):
                        return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"postfix {self.name} did not start:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL the whole process group: Postfix dying hard, its queue on disk."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
