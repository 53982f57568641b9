"""A real Postern process, configured by the test, on ports the kernel picks."""

import copy
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from . import REPO, toml
from .certs import Certs
from .dovecot import Cluster

LISTENING = re.compile(r"listening listener=(\S+) proto=\S+ addr=(\S+):(\d+)")
ADMIN_LISTENING = re.compile(r"admin listener addr=(\S+):(\d+)")


def binary() -> Path:
    path = Path(os.environ.get("POSTERN_BIN", REPO / "target" / "debug" / "postern"))
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run `cargo build -p postern` (scripts/test.sh does)")
    return path


def base_config(cluster: Cluster, certs: Certs, workdir: Path, admin: dict | bool = False) -> dict:
    """Postern in front of the cluster: routes in SQLite seeded from fixtures/; IMAP with
    STARTTLS, IMAPS, a plaintext IMAP listener that opts out of the TLS requirement,
    POP3 with STLS and POP3S, all on port 0. `admin` (True, or a dict of [admin] keys
    such as a token) adds the admin HTTP listener on a free loopback port."""
    config = _base_config(cluster, certs, workdir)
    if admin:
        config["admin"] = {"bind": "127.0.0.1:0", **(admin if isinstance(admin, dict) else {})}
    return config


def _base_config(cluster: Cluster, certs: Certs, workdir: Path) -> dict:
    return {
        "log": {"level": "info,postern_server=debug"},
        "tls": {"cert": str(certs.cert), "key": str(certs.key)},
        # The tests' own address is an operator host: many connections, failures on
        # purpose. Abuse control is tested from other loopback addresses.
        "limits": {"trusted_networks": ["127.0.0.1"]},
        "routing": {
            "unknown_users": "reject",
            "watch_interval": "200ms",
            "normalize": {"default_domain": "example.test"},
            "sql": {"url": f"sqlite:{workdir / 'routes.db'}"},
        },
        "backends": {
            name: {
                "host": "127.0.0.1",
                "imap": {"port": b.imap_port, "forward_client": "id"},
                "pop3": {"port": b.pop3_port, "forward_client": "xclient"},
            }
            for name, b in cluster.backends.items()
        },
        "listeners": [
            {"name": "imap", "protocol": "imap", "bind": "127.0.0.1:0", "tls": "starttls"},
            {"name": "imaps", "protocol": "imap", "bind": "127.0.0.1:0", "tls": "implicit"},
            {
                "name": "imap-plain",
                "protocol": "imap",
                "bind": "127.0.0.1:0",
                "tls": "none",
                "insecure_plaintext_auth": True,
            },
            {"name": "pop3", "protocol": "pop3", "bind": "127.0.0.1:0", "tls": "starttls"},
            {"name": "pop3s", "protocol": "pop3", "bind": "127.0.0.1:0", "tls": "implicit"},
        ],
    }


class Postern:
    def __init__(self, workdir: Path, config: dict):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = copy.deepcopy(config)
        self.config_path = self.dir / "postern.toml"
        self.log_path = self.dir / "postern.log"
        self.proc: subprocess.Popen | None = None
        self.addrs: dict[str, tuple[str, int]] = {}
        # The admin listener's base URL, once started with an [admin] section.
        self.admin_url: str | None = None

    def write_config(self) -> Path:
        self.config_path.write_text(toml.dumps(self.config))
        return self.config_path

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        """Runs `postern -c CONFIG ARGS...` and returns its output."""
        self.write_config()
        r = subprocess.run(
            [str(binary()), "-c", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"postern {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
        return r

    def seed(self, sql: Path = REPO / "fixtures" / "sqlite" / "seed.sql") -> None:
        self.cli("db", "seed", str(sql), check=True)

    def start(self, timeout: float = 20.0) -> "Postern":
        self.write_config()
        log = open(self.log_path, "ab")
        env = dict(os.environ, RUST_LOG=self.config.get("log", {}).get("level", "info"))
        self.proc = subprocess.Popen(
            [str(binary()), "-c", str(self.config_path), "run"],
            stdout=log,
            stderr=log,
            env=env,
        )
        want = len(self.config["listeners"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.addrs = {
                name: (host, int(port)) for name, host, port in LISTENING.findall(self.log())
            }
            admin = ADMIN_LISTENING.search(self.log()) if "admin" in self.config else None
            if admin:
                self.admin_url = f"http://{admin.group(1)}:{admin.group(2)}"
            if len(self.addrs) >= want and (admin or "admin" not in self.config):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"postern exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.02)
        raise TimeoutError(f"postern did not start listening:\n{self.log()}")

    def addr(self, listener: str) -> tuple[str, int]:
        return self.addrs[listener]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.log())
            if m:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"no log line matching {pattern!r}:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code


def smtp_config(cluster: Cluster, postfixes: dict, certs: Certs, workdir: Path) -> dict:
    """`base_config` plus the SMTP family: each backend's Postfix for submission (XCLIENT
    login) and MX, its Dovecot for LMTP; listeners for submission (STARTTLS), submission
    over implicit TLS (465-style), MX and LMTP."""
    config = base_config(cluster, certs, workdir)
    for name, pf in postfixes.items():
        b = config["backends"][name]
        b["submission"] = {"port": pf.submission_port, "login": "xclient"}
        b["smtp"] = {"port": pf.smtp_port}
        b["lmtp"] = {"port": cluster[name].lmtp_port}
    config["server"] = {"hostname": "postern.example.test"}
    config["listeners"] += [
        {"name": "submission", "protocol": "submission", "bind": "127.0.0.1:0", "tls": "starttls"},
        {"name": "submissions", "protocol": "submission", "bind": "127.0.0.1:0", "tls": "implicit"},
        {"name": "mx", "protocol": "smtp", "bind": "127.0.0.1:0", "tls": "starttls"},
        {"name": "lmtp", "protocol": "lmtp", "bind": "127.0.0.1:0", "tls": "none"},
    ]
    return config
