"""Fixtures: a throwaway CA, a pair of real Dovecot backends sharing a mail root, and a
factory for Postern processes in front of them."""

import shutil
import tempfile
from pathlib import Path

import pytest

from harness import certs as certs_mod
from harness.dovecot import Cluster
from harness.postern import Postern, base_config

# Distinctive passwords, so a test can prove none of them ever reaches a log.
USERS = {
    "alice@example.test": "alice-Secret-7Q",
    "bob@example.test": "bob-Secret-9Z",
    "carol@example.test": "carol-Secret-3X",
}


@pytest.fixture(scope="session")
def workroot():
    # Not pytest's tmp_path: Dovecot's unprivileged processes must be able to traverse
    # it, and pytest's base directory is private to the test user.
    root = Path(tempfile.mkdtemp(prefix="postern-tests-"))
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


@pytest.fixture
def workdir(workroot, request):
    d = Path(tempfile.mkdtemp(prefix=request.node.name[:40] + "-", dir=workroot))
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
