"""The route store on a real 3-node MariaDB Galera cluster (harness/galera.py), with
Postern instances attached to DIFFERENT nodes: a fenced move, the first-login race
(certification conflicts retried), and an evacuation during which one node is
SIGKILLed and then rejoins by IST.

Every test here is in one xdist group, so a single worker starts the cluster once
(session fixture `galera`) and runs them one after the other. Each test gets its own
database. Outcomes and counts are asserted, never durations; every wait is bounded."""

import re
import subprocess
import threading
import time

import pytest

from conftest import USERS
from harness.net import read_all
from harness.postern import binary
from test_routing import eventually_on, idle_session, login_backend

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"

pytestmark = pytest.mark.xdist_group("galera")

# Logged by SqlStore::open when reads wait for the cluster (wsrep_sync_wait).
SYNC_WAIT_LINE = r"route store: Galera node; reads wait for the cluster's earlier commits"
CONFLICT_LINE = "route store write conflict; retrying"


@pytest.fixture
def galera_db(galera, request):
    """A fresh database on the cluster for one test (created through node 1, so it
    exists on every node)."""
    name = "g_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:50].lower()
    galera.new_database(name)
    return name


def on_node(node, db, **routing):
    """A config edit: routes in `db` through `node` (no sync_wait key: Postern must
    find out by itself that the server is a Galera node)."""

    def edit(c):
        c["routing"]["sql"] = {"url": node.url(db), "query_timeout": "2s", "connect_timeout": "2s"}
        c["routing"].update(routing)

    return edit


def rows_on(node, db) -> dict[str, tuple[str, str]]:
    """user -> (backend, moving_to) as this node has them (read with wsrep_sync_wait)."""
    out = node.sql("SELECT username, backend, COALESCE(moving_to, '-') FROM routes", db)
    return {u: (b, m) for u, b, m in (line.split("\t") for line in out.splitlines())}


def conflicts(*instances) -> int:
    return sum(p.log().count(CONFLICT_LINE) for p in instances)


def test_a_fenced_move_through_one_node_kicks_the_user_on_instances_of_every_node(
    galera, galera_db, make_postern, certs
):
    # One instance per node: each reads and writes through its own node only.
    a, b, c = (make_postern(on_node(n, galera_db), seed=False) for n in galera.nodes)
    for p in (a, b, c):
        p.wait_log(SYNC_WAIT_LINE)
    # Pinned through node 1; the sessions are opened through nodes 1, 2 and 3 right
    # after. Reads wait for the cluster, so nodes 2 and 3 see the pin at once.
    assert a.cli("route", "pin", ALICE, "b1").returncode == 0
    assert b.cli("route", "pin", BOB, "b2").returncode == 0
    sessions = [idle_session(p, ALICE, certs) for p in (a, b, c)]
    bystander = idle_session(c, BOB, certs)

    # The move is written through node 2; the confirmations come through all three.
    r = b.cli("route", "move", ALICE, "b2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "moved from b1 to b2" in r.stdout and "3 instance(s)" in r.stdout, r.stdout
    for raw in sessions:
        read_all(raw.sock, timeout=10)  # ended by its instance (EOF), before the pin switched
    assert b"c OK" in bystander.cmd(b"c NOOP\r\n", b"c")
    for p in (a, b, c):
        assert login_backend(p, ALICE, certs) == "b2"
        p.wait_log("kick: ending the user's sessions")
    # Every node holds the same finished move.
    for node in galera.nodes:
        assert rows_on(node, galera_db)[ALICE] == ("b2", "-"), node.name


def test_sync_wait_follows_the_server_unless_configured(
    galera, galera_db, mariadb, make_postern, certs
):
    """Unset, `routing.sql.sync_wait` is on for a Galera node only: not for a MariaDB
    without Galera (wsrep_on is 0 there), and `false` turns it off on Galera too."""
    name = mariadb.new_database("g_sync_wait_plain")

    def plain(c):
        c["routing"]["sql"] = {"url": mariadb.url(name)}

    def off(c):
        on_node(galera.nodes[1], galera_db)(c)
        c["routing"]["sql"]["sync_wait"] = False

    for edit in (plain, off):
        p = make_postern(edit, seed=False)
        # Started (listening) means the store was opened and would have said it.
        assert p.cli("route", "pin", ALICE, "b1").returncode == 0
        assert login_backend(p, ALICE, certs) == "b1"
        assert not re.search(SYNC_WAIT_LINE, p.log()), p.log()[-2000:]


def test_concurrent_first_logins_through_two_nodes_end_with_one_pin(
    galera, galera_db, make_postern, certs
):
    """The first-login race of test_routing, with the two inserts certified by Galera:
    the loser's commit fails (1213), is retried, and reads the winner's pin back."""
    node1, node2, node3 = galera.nodes

    def prefer(node, w1, w2):
        def edit(c):
            on_node(node, galera_db, unknown_users="assign", assign_policy="least-loaded")(c)
            c["backends"]["b1"]["weight"] = w1
            c["backends"]["b2"]["weight"] = w2

        return edit

    # Opposite weights: the two instances would each pick a different backend.
    a = make_postern(prefer(node1, 100, 1), seed=False)
    b = make_postern(prefer(node2, 1, 100), seed=False)
    users = [f"new{i:02}@example.test" for i in range(2, 14)]
    seen: dict[tuple[str, str], str] = {}
    errors = []

    def login(instance, tag, user, barrier):
        try:
            barrier.wait(timeout=30)
            seen[(user, tag)] = login_backend(instance, user, certs)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{tag} {user}: {e!r}")

    for user in users:
        barrier = threading.Barrier(2)
        threads = [
            threading.Thread(target=login, args=(inst, tag, user, barrier))
            for inst, tag in ((a, "a"), (b, "b"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), f"a login of {user} hung"
    assert not errors, errors

    # The same pins on every node, one per user, all confirmed (no reservation left).
    views = [rows_on(n, galera_db) for n in galera.nodes]
    assert views[0] == views[1] == views[2]
    rows = views[0]
    assert sorted(rows) == users
    for user in users:
        assert seen[(user, "a")] == seen[(user, "b")] == rows[user][0], (user, seen, rows)
    unconfirmed = node3.sql("SELECT COUNT(*) FROM routes WHERE tentative_until IS NOT NULL", galera_db)
    assert unconfirmed.strip() == "0"
    # Conflicts, if the two commits collided, were retried: none became an error above.
    retried = conflicts(a, b)
    kinds = sorted({m for p in (a, b) for m in re.findall(CONFLICT_LINE + r".*?error=(.{0,60})", p.log())})
    print(f"galera first-login race: {len(users)} users, {retried} write conflict(s) retried: {kinds}")


def test_evacuation_with_a_node_killed_mid_way_and_rejoined(
    galera, galera_db, make_postern, certs
):
    node1, node2, node3 = galera.nodes
    shared = {"default": {"mode": "shared", "failover": "repin"}}

    def edit_for(node):
        def edit(c):
            on_node(node, galera_db)(c)
            c["pools"] = shared

        return edit

    a, b, c = (make_postern(edit_for(n), seed=False) for n in galera.nodes)
    # Sessions to end: alice through instance a (node 1), carol through b (node 2),
    # new14 through c (node 3, the one that will be killed); many more pinned users
    # that only need moving, so the kill lands in the middle of the evacuation.
    sessioned = {ALICE: a, CAROL: b, "new14@example.test": c}
    extra = [f"evac{i:02}@example.test" for i in range(40)]
    values = ", ".join(f"('{u}', 'b1')" for u in [*sessioned, *extra])
    node1.sql(f"INSERT INTO routes (username, backend) VALUES {values}", galera_db)
    node1.sql(f"INSERT INTO routes (username, backend) VALUES ('{BOB}', 'b2')", galera_db)
    sessions = {u: idle_session(p, u, certs) for u, p in sessioned.items()}
    bystanders = [idle_session(p, BOB, certs) for p in (a, b)]

    # Evacuate through node 1, in small batches: each waits for every live instance.
    a.write_config()
    mover = subprocess.Popen(
        [str(binary()), "-c", str(a.config_path), "backend", "evacuate", "b1", "--batch", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Mid-way: once some users, but far from all, are on b2.
        deadline = time.monotonic() + 60
        while True:
            moved = int(node1.sql("SELECT COUNT(*) FROM routes WHERE backend = 'b2'", galera_db)) - 1
            if moved >= 6:
                break
            assert mover.poll() is None, mover.communicate()
            assert time.monotonic() < deadline, "the evacuation did not start"
            time.sleep(0.1)
        node3.kill()
        killed_after = moved
        # Still running after the kill: the node died in the middle of the evacuation.
        mid_way = mover.poll() is None
        out, err = mover.communicate(timeout=90)
    finally:
        if mover.poll() is None:
            mover.kill()
            mover.wait()
    everyone = [*sessioned, *extra]
    assert mover.returncode == 0, out + err
    assert f"{len(everyone)} user(s) moved, 0 rolled back" in out, out
    assert mid_way and killed_after < len(everyone)

    try:
        # The survivors agree: every user on b2, none left on b1 or half-moved.
        for node in (node1, node2):
            rows = rows_on(node, galera_db)
            assert {u: rows[u] for u in everyone} == {u: ("b2", "-") for u in everyone}
        # Sessions through instances of the surviving nodes were ended; bob's were not.
        for user in (ALICE, CAROL):
            read_all(sessions[user].sock, timeout=10)
        for raw in bystanders:
            assert b"c OK" in raw.cmd(b"c NOOP\r\n", b"c")
        # Instances of the surviving nodes keep working: evacuated users land on b2,
        # bob on b2, through both.
        for p in (a, b):
            eventually_on(p, ALICE, certs, "b2")
            assert login_backend(p, CAROL, certs) == "b2"
            assert login_backend(p, BOB, certs) == "b2"
        # The instance of the dead node lost its store: the movers stopped waiting for
        # it (it no longer heartbeat), and it says so in its log.
        c.wait_log("route store unreachable")
    finally:
        # Rejoin from its own datadir: an IST of the writes it missed.
        began = time.monotonic()
        galera.restart(node3)
        rejoin = time.monotonic() - began
    assert node3.joined_by() == "IST"
    # Node 3 has caught up, and so has its instance: it reads the change log it
    # missed, ends new14's session on b1 (a Pin to b2 ends sessions elsewhere), and
    # routes everyone to b2.
    rows = rows_on(node3, galera_db)
    assert {u: rows[u] for u in everyone} == {u: ("b2", "-") for u in everyone}
    read_all(sessions["new14@example.test"].sock, timeout=30)
    eventually_on(c, "new14@example.test", certs, "b2", timeout=30)
    assert login_backend(c, ALICE, certs) == "b2"
    print(
        f"galera evacuation: {len(everyone)} users, node3 killed after {killed_after} moved, "
        f"rejoined by {node3.joined_by()} in {rejoin:.1f}s; cluster started in {galera.started_in:.1f}s; "
        f"{conflicts(a, b, c)} write conflict(s) retried"
    )
    assert not re.search(r"panicked", a.log() + b.log() + c.log())
