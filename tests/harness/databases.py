"""Private MariaDB and PostgreSQL servers for the routing tests: each in its own
temporary directory, on a free loopback port, started and stopped by the test. The
machine's own database services (if any) are never used."""

import glob
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .net import free_port

ROOT = os.geteuid() == 0


def _wait(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not come up within {timeout}s")


def install_db(cmd: list[str], data: Path, tries: int = 3) -> None:
    """mariadb-install-db, retried on a failure: its bootstrap server can die under
    memory or I/O pressure on a loaded two-core machine (seen once in CI, with no
    output kept). A half-made data directory is removed before the next try, and the
    last failure is raised with what the tool printed."""
    for attempt in range(tries):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            return
        shutil.rmtree(data, ignore_errors=True)
        if attempt + 1 == tries:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        time.sleep(1.0)


class MariaDB:
    """mariadbd with a `postern` database and user; TLS enabled with the test CA so a
    test can require it."""

    kind = "mysql"

    def __init__(self, directory: Path, certs=None):
        self.dir = directory
        self.data = directory / "data"
        self.sock = directory / "mysqld.sock"
        self.certs = certs
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def url(self, database: str = "postern", **params) -> str:
        q = "&".join(f"{k}={v}" for k, v in params.items())
        return f"mysql://postern:postern-pw@127.0.0.1:{self.port}/{database}" + (
            f"?{q}" if q else ""
        )

    def new_database(self, name: str) -> str:
        """A fresh, empty database for one test; returns its name."""
        self._sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        return name

    def start(self) -> "MariaDB":
        first = not self.data.exists()
        if first:
            self.dir.mkdir(parents=True, exist_ok=True)
            cmd = ["mariadb-install-db", "--no-defaults", f"--datadir={self.data}",
                   "--auth-root-authentication-method=normal", "--skip-test-db"]
            if ROOT:
                cmd.append("--user=root")
            install_db(cmd, self.data)
        if not self.port:
            self.port = free_port()
        cmd = ["mariadbd", "--no-defaults", f"--datadir={self.data}",
               "--bind-address=127.0.0.1", f"--port={self.port}", f"--socket={self.sock}",
               f"--pid-file={self.dir / 'mysqld.pid'}", f"--log-error={self.dir / 'error.log'}",
               "--skip-log-bin", "--skip-name-resolve", "--innodb-buffer-pool-size=32M",
               "--innodb-flush-log-at-trx-commit=2"]
        if ROOT:
            cmd.append("--user=root")
        if self.certs:
            cmd += [f"--ssl-ca={self.certs.ca}", f"--ssl-cert={self.certs.cert}",
                    f"--ssl-key={self.certs.key}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: self._sql("SELECT 1", check=False).returncode == 0
              or self.proc.poll() is not None, "mariadbd")
        if self.proc.poll() is not None:
            raise RuntimeError("mariadbd exited:\n" + (self.dir / "error.log").read_text())
        if first:
            self._sql(
                "CREATE DATABASE postern CHARACTER SET utf8mb4;"
                "CREATE USER 'postern'@'127.0.0.1' IDENTIFIED BY 'postern-pw';"
                "GRANT ALL ON *.* TO 'postern'@'127.0.0.1';"
            )
        return self

    def _sql(self, sql: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["mariadb", "--no-defaults", "-S", str(self.sock), "-u", "root", "-e", sql],
            capture_output=True, text=True, check=check,
        )

    def sql(self, sql: str, database: str = "postern") -> str:
        """Runs SQL in a database as root; returns tab-separated output."""
        r = subprocess.run(
            ["mariadb", "--no-defaults", "-S", str(self.sock), "-u", "root", "-N", "-B",
             database, "-e", sql],
            capture_output=True, text=True, check=True,
        )
        return r.stdout

    def freeze(self) -> None:
        """SIGSTOP, returning once every thread of mariadbd is stopped: the group stop
        completes asynchronously (a thread in a disk wait stops when the wait ends),
        and a test asserting what a hung database does must not race it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

        def stopped() -> bool:
            states = []
            for stat in glob.glob(f"/proc/{self.proc.pid}/task/*/stat"):
                try:
                    with open(stat) as f:
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
                except (OSError, IndexError):
                    continue
            return bool(states) and all(s in ("T", "t") for s in states)

        _wait(stopped, "mariadbd's SIGSTOP", timeout=10.0)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class Postgres:
    """A PostgreSQL cluster with a `postern` database, trust authentication on
    loopback. PostgreSQL refuses to run as root, so as root it runs as `postgres`."""

    kind = "postgres"

    def __init__(self, directory: Path):
        self.dir = directory
        self.data = directory / "data"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
        if not bins:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.bin = Path(bins[-1])

    def url(self, database: str = "postern", **params) -> str:
        q = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}" + (f"?{q}" if q else "")

    def new_database(self, name: str) -> str:
        """A fresh, empty database for one test; returns its name."""
        self._psql("postgres", f'CREATE DATABASE "{name}"')
        return name

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if ROOT else cmd

    def start(self) -> "Postgres":
        first = not self.data.exists()
        if first:
            self.dir.mkdir(parents=True, exist_ok=True)
            if ROOT:
                shutil.chown(self.dir, "postgres", "postgres")
            subprocess.run(
                self._as_owner([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                                "-A", "trust", "-E", "UTF8", "--no-sync"]),
                check=True, capture_output=True,
            )
        if not self.port:
            self.port = free_port()
        self.proc = subprocess.Popen(
            self._as_owner([str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                            "-h", "127.0.0.1", "-k", str(self.dir), "-c", "fsync=off",
                            "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]),
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "server.log", "ab"),
        )
        _wait(lambda: self._psql("postgres", "SELECT 1", check=False).returncode == 0
              or self.proc.poll() is not None, "postgres")
        if self.proc.poll() is not None:
            raise RuntimeError("postgres exited:\n" + (self.dir / "server.log").read_text())
        if first:
            self._psql("postgres", "CREATE DATABASE postern")
        return self

    def _psql(self, db: str, sql: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", db,
             "-v", "ON_ERROR_STOP=1", "-A", "-t", "-F", "\t", "-c", sql],
            capture_output=True, text=True, check=check,
        )

    def sql(self, sql: str, database: str = "postern") -> str:
        return self._psql(database, sql).stdout

    def stop(self) -> None:
        if self.proc is None:
            return
        # Through pg_ctl: runuser does not pass signals on to the server.
        subprocess.run(
            self._as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                            "-w", "-t", "30", "stop"]),
            capture_output=True,
        )
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
