"""Fixtures: a throwaway CA, a pair of real Dovecot backends sharing a mail root, and a
factory for Postern processes in front of them."""

import shutil
import tempfile
from pathlib import Path

import pytest

from harness import certs as certs_mod
from harness.databases import MariaDB, Postgres
from harness.galera import Galera
from harness.dovecot import Cluster
from harness.postfix import Postfix
from harness.postern import Postern, base_config

# Distinctive passwords, so a test can prove none of them ever reaches a log.
USERS = {
    "alice@example.test": "alice-Secret-7Q",
    "bob@example.test": "bob-Secret-9Z",
    "carol@example.test": "carol-Secret-3X",
    # Long passwords: nginx cuts POP3 lines at 128 bytes; Postern must not.
    "longpw@example.test": "L" * 2048,
    "longerpw@example.test": "M" * 4500,
    # Never pinned by the fixtures: first logins, assignment races.
    **{f"new{i:02}@example.test": f"new{i:02}-Secret-5W" for i in range(1, 21)},
}


@pytest.fixture(scope="session")
def workroot():
    # Not pytest's tmp_path: Dovecot's unprivileged processes must be able to traverse
    # it, and pytest's base directory is private to the test user.
    # Short: Dovecot's unix sockets live below it, and socket paths max out at 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="pt-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def certs(workroot):
    return certs_mod.make(workroot / "tls")


@pytest.fixture(scope="session")
def cluster(workroot):
    c = Cluster(workroot / "cluster", USERS).start()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def postfixes(cluster, workroot):
    """A Postfix next to each Dovecot of the cluster (same backend name), delivering to
    that Dovecot over LMTP and authenticating submission clients against it."""
    started = {}
    try:
        for name, d in cluster.backends.items():
            started[name] = Postfix(
                name,
                workroot / f"pf-{name}",
                lmtp_target=f"inet:127.0.0.1:{d.lmtp_port}",
                sasl_target=f"inet:127.0.0.1:{d.auth_port}",
            ).start()
        yield started
    finally:
        for p in started.values():
            p.stop()


@pytest.fixture(scope="session")
def mariadb(workroot, certs):
    db = MariaDB(workroot / "mariadb", certs).start()
    yield db
    db.stop()


@pytest.fixture(scope="session")
def galera(workroot):
    """A 3-node MariaDB Galera cluster, started once per test process: tests that use
    it are in one xdist group (test_galera.py), so one worker starts it."""
    c = Galera(workroot / "galera").start()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def postgres(workroot):
    db = Postgres(workroot / "postgres").start()
    yield db
    db.stop()


@pytest.fixture(params=["mysql", "postgres"])
def database(request):
    """Each routing test runs against both real databases, in a fresh database."""
    server = request.getfixturevalue("mariadb" if request.param == "mysql" else "postgres")
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:50].lower()
    name = f"{name}_{abs(hash(request.node.nodeid)) % 100000}"
    server.new_database(name)
    return server, name


@pytest.fixture
def workdir(workroot, request):
    d = Path(tempfile.mkdtemp(prefix=request.node.name[5:21] + "-", dir=workroot))
    d.chmod(0o755)
    return d


@pytest.fixture
def make_postern(cluster, certs, workdir):
    """Builds a Postern in front of `cluster`. Call with a function that edits the
    default config (a dict), get a started process with alice->b1 and bob->b2 pinned."""
    started = []

    def make(edit=None, seed=True, start=True) -> Postern:
        config = base_config(cluster, certs, workdir)
        if edit:
            edit(config)
        p = Postern(workdir / f"postern{len(started)}", config)
        if seed:
            p.seed()
        if start:
            p.start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture
def postern(make_postern):
    return make_postern()
