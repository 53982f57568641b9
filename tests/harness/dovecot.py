"""Real Dovecot backends, each in its own directory with its own ports.

The configuration comes from fixtures/dovecot/dovecot.conf.in, the same template the
quickstart renders. Several instances can share one mail root: the stand-in for the
operator's NFS-mounted store.
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from . import REPO
from .net import free_port

RENDER = REPO / "scripts" / "dovecot-conf.sh"


class Dovecot:
    def __init__(
        self,
        name: str,
        directory: Path,
        mailroot: Path,
        users: dict[str, str],
        address: str = "127.0.0.1",
        extra=None,
    ):
        """`extra(dovecot) -> str` adds settings (rendered after the ports are chosen);
        `haproxy_port` is a spare port for a PROXY-protocol listener."""
        self.name = name
        self.dir = directory
        self.mailroot = mailroot
        self.users = users
        self.address = address
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.imap_port = self.pop3_port = self.lmtp_port = self.haproxy_port = 0
        self.auth_port = 0

    @property
    def log_path(self) -> Path:
        return self.dir / "dovecot.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logins(self) -> list[str]:
        """The user names of the successful logins this backend logged."""
        return re.findall(r"-login: Info: Login: user=<([^>]*)>", self.log())

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """Waits until the log holds `text` (see wait_login for why); returns the log."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log or time.monotonic() > deadline:
                return log
            time.sleep(0.05)

    def wait_login(self, user: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        """Waits until this backend logged `count` logins of `user`; returns all logins.

        Dovecot's log process writes a login line a moment after the client saw OK, so a
        check made right after LOGOUT can read the log before the line is there.
        """
        deadline = time.monotonic() + timeout
        while True:
            seen = self.logins()
            if seen.count(user) >= count or time.monotonic() > deadline:
                return seen
            time.sleep(0.05)

    def _render(self) -> Path:
        out = subprocess.run(
            [str(RENDER), self.name, str(self.dir), str(self.mailroot),
             str(self.imap_port), str(self.pop3_port), str(self.lmtp_port),
             str(self.auth_port), self.address],
            check=True, capture_output=True, text=True,
        )
        (self.dir / "extra.conf").write_text(self.extra(self) if self.extra else "")
        (self.dir / "users").write_text(
            "".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self.users.items())
        )
        return Path(out.stdout.strip())

    def start(self, attempts: int = 5) -> "Dovecot":
        # A restart (after kill or stop) keeps its ports: Postern's configuration names
        # them, and a backend that came back elsewhere would look like one that never did.
        restart = bool(self.imap_port)
        for _ in range(attempts):
            if not self.imap_port:
                self.imap_port, self.pop3_port, self.lmtp_port = (
                    free_port(self.address),
                    free_port(self.address),
                    free_port(self.address),
                )
                self.haproxy_port, self.auth_port = free_port(self.address), free_port(self.address)
            conf = self._render()
            self.proc = subprocess.Popen(
                ["dovecot", "-F", "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=open(self.dir / "stderr.log", "ab"),
                start_new_session=True,
            )
            if self._wait_ready():
                return self
            self.stop()
            if restart:
                time.sleep(1)  # the same ports again, once the one holding them lets go
            else:
                self.imap_port = 0  # a port was taken: try fresh ones
        raise RuntimeError(f"dovecot {self.name} did not start:\n{self.log()[-2000:]}")

    def _wait_ready(self, timeout: float = 15.0) -> bool:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.address, self.imap_port), timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(200).startswith(b"* OK"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stops Dovecot and every process it started."""
        if self.proc is None:
            return
        pid = self.proc.pid
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        self._reap_group(pid)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the whole process group: a backend dying hard."""
        if self.proc is None:
            return
        pid = self.proc.pid
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self._reap_group(pid)
        self.proc = None

    @staticmethod
    def _reap_group(pid: int) -> None:
        # Children (login processes) exit when their master goes; wait until they have
        # released the ports, so a restart can bind them again.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


class Cluster:
    """Backends b1, b2, ... sharing one mail root, with the same users."""

    def __init__(self, root: Path, users: dict[str, str], count: int = 2, extra=None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        self.mailroot = root / "mail"
        self.backends = {
            f"b{i}": Dovecot(f"b{i}", root / f"b{i}", self.mailroot, users, extra=extra)
            for i in range(1, count + 1)
        }

    def start(self) -> "Cluster":
        for b in self.backends.values():
            b.start()
        return self

    def stop(self) -> None:
        for b in self.backends.values():
            b.stop()

    def __getitem__(self, name: str) -> Dovecot:
        return self.backends[name]
