"""A real 3-node MariaDB Galera cluster on loopback, for the route-store tests against a
cluster (tests/test_galera.py). Debian's `mariadb-server` + `galera-4`; every node has
its own temporary datadir, socket, SQL port and wsrep (group communication), IST and SST
ports, all free loopback ports; nothing of the machine's own MariaDB is used.

Node 1 bootstraps the cluster (`--wsrep-new-cluster`), the others join it and receive
the data by SST with rsync (`wsrep_sst_rsync`: needs only rsync and iproute2's `ss`,
unlike mariabackup, which is a separate package and needs SST credentials). A node
killed with SIGKILL rejoins from its own datadir: Galera sends it the writes it missed
by IST (or a full SST if the donor's cache no longer holds them)."""

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .databases import ROOT, install_db
from .net import free_port

PROVIDER = "/usr/lib/galera/libgalera_smm.so"

# Bounds on waiting for a node: an SST of the small datadirs takes a few seconds, but
# two cores are shared with the rest of the suite.
START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


def _wait(check, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} within {timeout}s")


class GaleraNode:
    """One mariadbd of the cluster."""

    kind = "mysql"

    def __init__(self, cluster: "Galera", index: int):
        self.cluster = cluster
        self.index = index
        self.name = f"node{index}"
        self.dir = cluster.dir / self.name
        self.data = self.dir / "data"
        self.sock = self.dir / "mysqld.sock"
        self.cnf = self.dir / "my.cnf"
        self.error_log = self.dir / "error.log"
        self.port = free_port()
        self.gcomm_port = free_port()
        self.ist_port = free_port()
        self.sst_port = free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, database: str = "postern", **params) -> str:
        q = "&".join(f"{k}={v}" for k, v in params.items())
        return f"mysql://postern:postern-pw@127.0.0.1:{self.port}/{database}" + (
            f"?{q}" if q else ""
        )

    def write_config(self) -> None:
        """A defaults file rather than command-line options: the SST script
        (wsrep_sst_rsync) reads the node's settings from it too."""
        peers = ",".join(f"127.0.0.1:{n.gcomm_port}" for n in self.cluster.nodes)
        provider_options = ";".join(
            [
                f"gmcast.listen_addr=tcp://127.0.0.1:{self.gcomm_port}",
                f"ist.recv_addr=127.0.0.1:{self.ist_port}",
                # Room for the writes a killed node misses, so its rejoin is an IST.
                "gcache.size=64M",
                # Loopback: a dead peer is declared dead in ~3 s instead of ~5 s, so the
                # survivors keep a primary component quickly after a SIGKILL.
                "evs.suspect_timeout=PT3S",
                "evs.inactive_timeout=PT6S",
                "pc.wait_prim_timeout=PT60S",
            ]
        )
        lines = [
            "[mariadbd]",
            f"datadir={self.data}",
            f"socket={self.sock}",
            f"pid-file={self.dir / 'mysqld.pid'}",
            f"log-error={self.error_log}",
            "bind-address=127.0.0.1",
            f"port={self.port}",
            "skip-name-resolve",
            "innodb-buffer-pool-size=32M",
            "innodb-log-file-size=16M",
            "innodb-flush-log-at-trx-commit=2",
            # What Galera requires of every node.
            "binlog_format=ROW",
            "default_storage_engine=InnoDB",
            "innodb_autoinc_lock_mode=2",
            "wsrep_on=ON",
            f"wsrep_provider={PROVIDER}",
            f"wsrep_cluster_name=postern-test-{self.cluster.dir.name}",
            f"wsrep_cluster_address=gcomm://{peers}",
            f"wsrep_node_name={self.name}",
            "wsrep_node_address=127.0.0.1",
            f"wsrep_provider_options={provider_options}",
            "wsrep_sst_method=rsync",
            f"wsrep_sst_receive_address=127.0.0.1:{self.sst_port}",
            "wsrep_slave_threads=2",
        ]
        if ROOT:
            # Not root, unlike the single MariaDB of databases.py: the joiner's rsync
            # daemon, started as root with the SST script's config (no `uid =`), would
            # drop to `nobody` and could not write the datadir. As `mysql` (the
            # package's system user) it never switches users.
            lines.append("user=mysql")
        self.cnf.write_text("\n".join(lines) + "\n")

    def start(self, bootstrap: bool = False) -> "GaleraNode":
        self.dir.mkdir(parents=True, exist_ok=True)
        if ROOT:
            shutil.chown(self.dir, "mysql", "mysql")
        self.write_config()
        if bootstrap and not self.data.exists():
            cmd = ["mariadb-install-db", f"--defaults-file={self.cnf}",
                   "--auth-root-authentication-method=normal", "--skip-test-db"]
            install_db(cmd, self.data)
        # A joiner starts with an empty datadir and receives everything by SST.
        self.data.mkdir(exist_ok=True)
        if ROOT:
            shutil.chown(self.data, "mysql", "mysql")
        cmd = ["mariadbd", f"--defaults-file={self.cnf}"]
        if bootstrap:
            cmd.append("--wsrep-new-cluster")
        position = self.recovered_position()
        if position:
            cmd.append(f"--wsrep-start-position={position}")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def recovered_position(self) -> str | None:
        """After a SIGKILL grastate.dat says seqno -1: the node does not know how far
        it got, and would ask for a full SST. `--wsrep-recover` reads the position from
        InnoDB (what Debian's galera_recovery does before a systemd start), so the
        rejoin can be an IST of just the missed writes."""
        grastate = self.data / "grastate.dat"
        if not (self.data / "ibdata1").exists() or not grastate.exists():
            return None  # a fresh node: nothing to recover (a joiner gets an SST)
        if "seqno:   -1" not in grastate.read_text(errors="replace"):
            return None  # a clean stop wrote the position itself
        log = self.dir / "recover.log"
        subprocess.run(
            ["mariadbd", f"--defaults-file={self.cnf}", "--wsrep-recover",
             f"--log-error={log}"],
            capture_output=True, timeout=120,
        )
        found = re.findall(r"WSREP: Recovered position: (\S+:-?\d+)", log.read_text(errors="replace"))
        return found[-1] if found else None

    def wait_synced(self, size: int, timeout: float = START_TIMEOUT) -> None:
        """Until the node is part of a primary component of `size` nodes and ready
        (wsrep_ready ON, local state Synced)."""

        def ready() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            s = self.status()
            return (
                s.get("wsrep_ready") == "ON"
                and s.get("wsrep_local_state_comment") == "Synced"
                and s.get("wsrep_cluster_size") == str(size)
                and s.get("wsrep_cluster_status") == "Primary"
            )

        _wait(ready, f"{self.name} was not synced in a cluster of {size}", timeout)

    def status(self) -> dict[str, str]:
        r = subprocess.run(
            ["mariadb", "--no-defaults", "-S", str(self.sock), "-u", "root", "-N", "-B",
             "-e", "SHOW GLOBAL STATUS LIKE 'wsrep_%'"],
            capture_output=True, text=True, timeout=10,
        )
        if r.returncode != 0:
            return {}
        return dict(line.split("\t", 1) for line in r.stdout.splitlines() if "\t" in line)

    def sql(self, sql: str, database: str = "postern") -> str:
        """Runs SQL on this node as root; returns tab-separated output. wsrep_sync_wait
        so that a check made through one node sees what was committed through another."""
        r = subprocess.run(
            ["mariadb", "--no-defaults", "-S", str(self.sock), "-u", "root", "-N", "-B",
             database, "-e", f"SET SESSION wsrep_sync_wait = 1; {sql}"],
            capture_output=True, text=True, check=True, timeout=30,
        )
        return r.stdout

    def kill(self) -> None:
        """SIGKILL: no clean leave; the others see the node vanish."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.error_log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no error log)"

    def joined_by(self) -> str:
        """How the node got the cluster's data at its last start: "SST" (a full copy
        from a donor), "IST" (only the writes it missed) or "bootstrap"."""
        text = self.error_log.read_text(errors="replace")
        tail = text[text.rfind("Starting MariaDB"):]
        # The rsync script runs on every join; it says which transfer the donor chose
        # (an IST join "bypasses" the copy, and Galera still logs "SST received").
        if "rsync IST completed on joiner" in tail:
            return "IST"
        if "rsync SST completed on joiner" in tail:
            return "SST"
        return "bootstrap"


class Galera:
    """The cluster: `start()` bootstraps node 1 and joins nodes 2 and 3 one after the
    other (two SSTs at once from one donor would only queue)."""

    def __init__(self, directory: Path, size: int = 3):
        self.dir = directory
        self.nodes = [GaleraNode(self, i + 1) for i in range(size)]
        self.started_in: float = 0.0

    def start(self) -> "Galera":
        began = time.monotonic()
        first, *others = self.nodes
        try:
            first.start(bootstrap=True)
            first.wait_synced(1)
            # Root over the socket only; Postern connects as `postern` over TCP.
            first.sql(
                "CREATE DATABASE postern CHARACTER SET utf8mb4;"
                "CREATE USER 'postern'@'127.0.0.1' IDENTIFIED BY 'postern-pw';"
                "GRANT ALL ON *.* TO 'postern'@'127.0.0.1';",
                database="mysql",
            )
            for n, node in enumerate(others, start=2):
                node.start()
                node.wait_synced(n)
        except Exception:
            self.stop()
            raise
        self.started_in = time.monotonic() - began
        return self

    def new_database(self, name: str) -> str:
        self.nodes[0].sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4", database="mysql")
        return name

    def live(self) -> list[GaleraNode]:
        return [n for n in self.nodes if n.proc is not None]

    def wait_size(self, size: int, timeout: float = START_TIMEOUT) -> None:
        """Until every running node is synced in a primary component of `size`."""
        for node in self.live():
            node.wait_synced(size, timeout)

    def restart(self, node: GaleraNode) -> None:
        """Starts a killed node again from its datadir and waits until it has rejoined
        and caught up (IST, or SST when the donor's cache no longer has the gap)."""
        node.start()
        self.wait_size(len(self.nodes))

    def stop(self) -> None:
        # Joiners first, the bootstrap node last: each clean leave shrinks the cluster
        # instead of leaving the rest without a primary component.
        for node in reversed(self.nodes):
            node.stop()
