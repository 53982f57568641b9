"""Sticky routing on real MariaDB and PostgreSQL: pins, the operator-query mode,
normalization, race-safe assignment by two instances, the route cache across a
database outage, and fenced moves and kicks across instances. Every test runs against
both databases (the `database` fixture), each in a fresh database."""

import imaplib
import json
import signal
import subprocess
import threading
import urllib.request
import time

import pytest

from conftest import USERS
from harness.databases import MariaDB, Postgres
from imap_client import Raw, SourceIMAP4_SSL, backend_id
from harness.net import read_all
from harness.postern import binary

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"


def on_database(url, **routing):
    """A config edit: routes in `url`, plus `routing` keys."""

    def edit(c):
        c["routing"]["sql"] = {"url": url, "query_timeout": "2s", "connect_timeout": "2s"}
        c["routing"].update(routing)

    return edit


def login_backend(p, user, certs, listener="imaps"):
    """Logs `user` in through Postern; returns the backend that answered."""
    m = SourceIMAP4_SSL(*p.addr(listener), ssl_context=certs.client_context())
    m.login(user, USERS[user.strip().lower()] if "@" in user else USERS[f"{user.strip().lower()}@example.test"])
    name = backend_id(m)
    m.logout()
    return name.split('"')[-2].rsplit("-", 1)[-1]


def eventually_on(p, user, certs, want, timeout=15):
    """Logs `user` in until it lands on `want`: right after a database outage or a
    pin change a login may get the temporary failure, or be ended by the change."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if login_backend(p, user, certs) == want:
                return
        except (imaplib.IMAP4.error, imaplib.IMAP4.abort) as e:
            assert "UNAVAILABLE" in str(e), e
        assert time.monotonic() < deadline, f"{user} never landed on {want}"
        time.sleep(0.2)


def test_pins_in_the_database_route_logins(database, make_postern, certs):
    server, db = database
    p = make_postern(on_database(server.url(db)), seed=False, start=False)
    assert p.cli("db", "migrate").returncode == 0
    assert p.cli("route", "pin", "Alice", "b1").returncode == 0
    r = p.cli("route", "pin", "bob@example.test", "b2")
    assert r.returncode == 0 and "bob@example.test pinned to b2" in r.stdout
    assert p.cli("route", "pin", "bob", "nowhere").returncode != 0
    p.start()
    assert login_backend(p, ALICE, certs) == "b1"
    assert login_backend(p, BOB, certs) == "b2"
    rows = server.sql("SELECT username, backend FROM routes ORDER BY username", db)
    assert rows.split() == [ALICE, "b1", BOB, "b2"]
    listed = p.cli("route", "list", "--backend", "b2").stdout
    assert listed.split() == [BOB, "b2"]


def test_tls_to_the_database(mariadb, make_postern, certs):
    db = mariadb.new_database("t_tls_required")
    url = mariadb.url(db, **{"ssl-mode": "VERIFY_IDENTITY", "ssl-ca": str(certs.ca)})
    p = make_postern(on_database(url), seed=False, start=False)
    assert p.cli("route", "pin", ALICE, "b2").returncode == 0
    p.start()
    assert login_backend(p, ALICE, certs) == "b2"
    # The server really saw a TLS session from Postern.
    assert mariadb.sql("SHOW GLOBAL STATUS LIKE 'Ssl_accepts'").split()[1] != "0"


def test_operator_query_over_an_existing_user_table(database, make_postern, certs):
    server, db = database
    flag = "(active = 0)"
    param = "$1" if server.kind == "postgres" else "?"
    server.sql(
        "CREATE TABLE virtual_users (email VARCHAR(255) PRIMARY KEY, mailhost VARCHAR(64), "
        "pw VARCHAR(128), active INT);"
        f"INSERT INTO virtual_users VALUES ('{ALICE}', '127.0.0.1', '{{PLAIN}}x', 1);"
        f"INSERT INTO virtual_users VALUES ('{BOB}', 'localhost', '{{PLAIN}}x', 1);"
        f"INSERT INTO virtual_users VALUES ('{CAROL}', '127.0.0.1', '{{PLAIN}}x', 0);",
        db,
    )
    query = (
        f"SELECT mailhost AS host, pw AS password, {flag} AS disabled "
        f"FROM virtual_users WHERE email = {param}"
    )

    def edit(c):
        on_database(server.url(db))(c)
        c["routing"]["sql"]["lookup_query"] = query
        # Two hosts for the same loopback address, so the host column can pick.
        c["backends"]["b2"]["host"] = "localhost"
        c["admin"] = {"bind": "127.0.0.1:0"}

    p = make_postern(edit, seed=False)
    assert login_backend(p, ALICE, certs) == "b1"
    assert login_backend(p, BOB, certs) == "b2"
    # Where the pin comes from is said, and what can be counted is counted: Postern's
    # routes table is empty, the operator's query cannot be counted.
    shown = p.cli("route", ALICE).stdout
    assert "pinned by routing.sql.lookup_query" in shown, shown
    with urllib.request.urlopen(p.admin_url + "/api/backends", timeout=30) as r:
        listed = {b["name"]: b for b in json.loads(r.read())["backends"]}
    assert listed["b1"]["pinned_users"] == 0, listed["b1"]
    assert "lookup_query" in listed["b1"]["pinned_users_counted"]
    m = SourceIMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        m.login(CAROL, USERS[CAROL])
    p.wait_log("account disabled")
    # A pin written by Postern overrides the operator's host, and reaches the running
    # instance through the change log (its cached route is dropped).
    assert p.cli("route", "pin", ALICE, "b2").returncode == 0
    # A login that raced the change may land on b1 under the old route; the pin event
    # then ends it ([UNAVAILABLE]), because the user now belongs to b2.
    eventually_on(p, ALICE, certs, "b2", timeout=5)
    assert "pinned by Postern's routes table" in p.cli("route", ALICE).stdout


def test_spellings_of_one_user_share_one_pin(database, make_postern, certs):
    server, db = database
    p = make_postern(on_database(server.url(db), unknown_users="assign"), seed=False)
    first = login_backend(p, "New01@Example.TEST", certs)
    for spelling in ("new01", "new01@EXAMPLE.test", "NEW01"):
        assert login_backend(p, spelling, certs) == first
    rows = server.sql("SELECT username, backend FROM routes", db).split()
    assert rows == ["new01@example.test", first]


def test_only_a_login_the_backend_accepts_creates_a_pin(database, make_postern, certs):
    """A name that never logs in leaves no pin: anyone could otherwise fill the routes
    table with guesses. The reservation a first login writes is deleted when Dovecot
    refuses the login, and kept when it accepts."""
    server, db = database
    p = make_postern(on_database(server.url(db), unknown_users="assign"), seed=False)
    for user, password in [("ghost@example.test", "anything"), ("new03@example.test", "wrong")]:
        m = SourceIMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            m.login(user, password)
        m.logout()
    assert server.sql("SELECT username FROM routes", db).split() == []
    backend = login_backend(p, "new03", certs)
    # The confirmed pin, with no reservation mark left.
    rows = server.sql("SELECT username, backend FROM routes WHERE tentative_until IS NULL", db)
    assert rows.split() == ["new03@example.test", backend]
    p.wait_log("first login: user pinned")


def test_concurrent_first_logins_on_two_instances_end_with_one_pin(
    database, make_postern, certs
):
    server, db = database

    def prefer(b1, b2):
        def edit(c):
            on_database(server.url(db), unknown_users="assign", assign_policy="least-loaded")(c)
            c["backends"]["b1"]["weight"] = b1
            c["backends"]["b2"]["weight"] = b2

        return edit

    # The two instances would each pick a different backend for every new user.
    a = make_postern(prefer(100, 1), seed=False)
    b = make_postern(prefer(1, 100), seed=False)
    users = [f"new{i:02}@example.test" for i in range(2, 14)]
    seen: dict[tuple[str, str], str] = {}
    errors = []

    def login(instance, tag, user, barrier):
        try:
            barrier.wait(timeout=30)
            seen[(user, tag)] = login_backend(instance, user, certs)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

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
    assert not errors, errors
    rows = dict(
        line.split("\t") for line in server.sql("SELECT username, backend FROM routes", db).splitlines()
    )
    for user in users:
        assert seen[(user, "a")] == seen[(user, "b")] == rows[user], (user, seen, rows)
    assert len(rows) == len(users)


@pytest.mark.parametrize("kind", ["mysql", "postgres"])
def test_cached_routes_survive_a_database_outage(kind, workdir, make_postern, certs, mariadb):
    server = (MariaDB(workdir / "db", certs) if kind == "mysql" else Postgres(workdir / "db")).start()
    try:

        def edit(c):
            on_database(server.url())(c)
            c["routing"]["cache"] = {"ttl": "1s", "negative_ttl": "1s", "stale_if_error": "1h"}

        p = make_postern(edit, seed=False, start=False)
        assert p.cli("route", "pin", ALICE, "b2").returncode == 0
        assert p.cli("route", "pin", BOB, "b1").returncode == 0
        p.start()
        assert login_backend(p, ALICE, certs) == "b2"
        # A reload keeps what the cache knows (the backends did not change).
        p.proc.send_signal(signal.SIGHUP)
        p.wait_log(r"configuration reloaded.*kept_routes=1\b")

        server.stop()
        time.sleep(1.5)  # past the TTL: the cache must ask the (dead) database
        assert login_backend(p, ALICE, certs) == "b2"  # cached: still THAT backend
        m = SourceIMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
        with pytest.raises(imaplib.IMAP4.error, match=r"UNAVAILABLE"):
            m.login(BOB, USERS[BOB])  # never cached: a temporary failure, not a guess
        p.wait_log("serving the cached route")
        # A database that refuses connections is not asked by every lookup: the store
        # fails fast between probes (so cached users do not wait for the pool's timeout).
        p.wait_log("route store unreachable; failing lookups fast")
        assert login_backend(p, ALICE, certs) == "b2"
        p.wait_log("failing fast")

        server.start()  # same port, same data
        deadline = time.monotonic() + 20
        while True:
            try:
                assert login_backend(p, BOB, certs) == "b1"
                break
            except imaplib.IMAP4.error:
                assert time.monotonic() < deadline, "no recovery after the database returned"
                time.sleep(0.5)
    finally:
        server.stop()


def two_instances(server, db, make_postern, **routing):
    edit = on_database(server.url(db), **routing)
    return make_postern(edit, seed=False), make_postern(edit, seed=False)


def idle_session(p, user, certs):
    raw = Raw(p.addr("imaps"), certs.client_context())
    out = raw.cmd(f"a LOGIN {user} {USERS[user]}\r\n".encode(), b"a")
    assert out.startswith(b"a OK"), out
    assert b"b OK" in raw.cmd(b"b SELECT INBOX\r\n", b"b")
    return raw


def test_move_kicks_the_user_on_every_instance(database, make_postern, certs):
    server, db = database
    a, b = two_instances(server, db, make_postern)
    assert a.cli("route", "pin", ALICE, "b1").returncode == 0
    on_a, on_b = idle_session(a, ALICE, certs), idle_session(b, ALICE, certs)
    bystander = idle_session(a, BOB, certs) if a.cli("route", "pin", BOB, "b2").returncode == 0 else None

    started = time.monotonic()
    r = a.cli("route", "move", "Alice", "b2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "moved from b1 to b2" in r.stdout and "2 instance(s)" in r.stdout
    assert time.monotonic() - started < 10
    # Both live sessions were ended by their instances.
    for raw in (on_a, on_b):
        read_all(raw.sock, timeout=10)
    # The bystander's session is untouched.
    assert b"c OK" in bystander.cmd(b"c NOOP\r\n", b"c")
    # New logins land on the new backend, on both instances.
    assert login_backend(a, ALICE, certs) == "b2"
    assert login_backend(b, ALICE, certs) == "b2"
    assert server.sql(f"SELECT backend, moving_to FROM routes WHERE username = '{ALICE}'", db).split() == [
        "b2",
        "NULL" if server.kind == "mysql" else "",
    ][: 1 if server.kind == "postgres" else 2]
    a.wait_log("kick: ending the user's sessions")
    b.wait_log("kick: ending the user's sessions")


def test_a_move_right_after_a_reload_is_applied_by_the_reloaded_instance(
    database, make_postern, certs
):
    """SIGHUP to an instance, then a move within the next moments: the reloaded
    instance keeps its id and its place in the change log, so it applies the kick (its
    IDLE session on the old backend ends) and only then counts as confirming."""
    server, db = database
    a, b = two_instances(server, db, make_postern)
    assert a.cli("route", "pin", ALICE, "b1").returncode == 0
    for trial in range(3):
        old, new = ("b1", "b2") if trial % 2 == 0 else ("b2", "b1")
        on_b = idle_session(b, ALICE, certs)
        b.proc.send_signal(signal.SIGHUP)
        r = a.cli("route", "move", ALICE, new)
        assert r.returncode == 0 and "2 instance(s)" in r.stdout, r.stdout + r.stderr
        # The session on the old backend was ended by the reloaded instance.
        assert b"* BYE" in read_all(on_b.sock, timeout=10)
        assert login_backend(b, ALICE, certs) == new, old
    rows = server.sql("SELECT COUNT(*) FROM instances", db).split()
    assert rows == ["2"], f"reloads added instance rows: {rows}"


def test_a_crashed_instance_stops_blocking_moves_and_a_clean_exit_leaves_at_once(
    database, make_postern, certs
):
    server, db = database
    a, b = two_instances(server, db, make_postern)
    assert a.cli("route", "pin", ALICE, "b1").returncode == 0

    def instances(n):
        deadline = time.monotonic() + 15
        while server.sql("SELECT COUNT(*) FROM instances", db).split() != [str(n)]:
            assert time.monotonic() < deadline, f"never {n} instance rows"
            time.sleep(0.1)

    instances(2)
    # A clean exit removes the instance's row (checked at once: nobody waits for it).
    b.stop()
    assert server.sql("SELECT COUNT(*) FROM instances", db).split() == ["1"]
    # A crash leaves the row; once its heartbeat is older than live_within (5 s), the
    # instance is presumed dead and moves no longer wait for it.
    c = make_postern(on_database(server.url(db)), seed=False)
    instances(2)
    c.proc.kill()
    c.proc.wait()
    deadline = time.monotonic() + 30
    while True:
        stale = server.sql(
            "SELECT COUNT(*) FROM instances WHERE heartbeat_at < "
            f"{int(time.time()) - 6}", db).split()
        if stale == ["1"]:
            break
        assert time.monotonic() < deadline, "the crashed instance's heartbeat never aged"
        time.sleep(0.5)
    r = a.cli("route", "move", ALICE, "b2")
    assert r.returncode == 0 and "1 instance(s)" in r.stdout, r.stdout + r.stderr
    assert login_backend(a, ALICE, certs) == "b2"


def test_a_frozen_instance_presumed_dead_catches_up_before_it_serves(
    database, make_postern, certs
):
    """Instance B frozen (SIGSTOP) past live_within while A moves a user B had cached
    and served: the move goes on without B (presumed dead) and finishes. When B wakes
    up, it ends its session on the old backend and sends no login there: until it has
    read the change log, logins get the temporary failure."""
    server, db = database
    a, b = two_instances(server, db, make_postern)
    assert a.cli("route", "pin", ALICE, "b1").returncode == 0
    eventually_on(b, ALICE, certs, "b1")  # B caches alice -> b1
    on_b = idle_session(b, ALICE, certs)
    b.proc.send_signal(signal.SIGSTOP)
    try:
        r = a.cli("route", "move", ALICE, "b2")
        assert r.returncode == 0 and "1 instance(s)" in r.stdout, r.stdout + r.stderr
    finally:
        b.proc.send_signal(signal.SIGCONT)
    landed = []
    for _ in range(20):
        try:
            landed.append(login_backend(b, ALICE, certs))
        except (imaplib.IMAP4.error, imaplib.IMAP4.abort) as e:
            assert "UNAVAILABLE" in str(e), e
            landed.append("refused")
        if landed[-1] == "b2":
            break
        time.sleep(0.1)
    assert "b1" not in landed and landed[-1] == "b2", landed
    assert b"* BYE" in read_all(on_b.sock, timeout=10)
    b.wait_log("stood still")


def test_kick_ends_sessions_everywhere(database, make_postern, certs):
    server, db = database
    a, b = two_instances(server, db, make_postern)
    assert a.cli("route", "pin", BOB, "b2").returncode == 0
    sessions = [idle_session(a, BOB, certs), idle_session(b, BOB, certs)]
    r = b.cli("route", "kick", "bob")
    assert r.returncode == 0 and "confirmed by 2 instance(s)" in r.stdout, r.stdout
    for raw in sessions:
        read_all(raw.sock, timeout=10)
    assert login_backend(a, BOB, certs) == "b2"


def test_a_move_without_every_confirmation_is_rolled_back(database, make_postern, certs):
    """A live instance that never confirms the kick: the move is rolled back (the pin
    stays, the hold is cleared), so the user logs in to the old backend again at once
    instead of being locked out until the hold ends."""
    server, db = database

    def edit(c):
        on_database(server.url(db))(c)
        c["routing"]["moves"] = {"hold": "60s", "ack_timeout": "2s"}

    p = make_postern(edit, seed=False)
    assert p.cli("route", "pin", ALICE, "b1").returncode == 0
    # An instance that is alive (recent heartbeat) but never applies the kick.
    now = int(time.time())
    server.sql(f"INSERT INTO instances VALUES ('stuck-instance', {now + 3600}, 0)", db)
    r = p.cli("route", "move", ALICE, "b2")
    assert r.returncode == 1 and "NOT moved" in r.stderr and "stuck-instance" in r.stderr
    assert "rolled back" in r.stderr, r.stderr
    assert server.sql("SELECT backend, moving_to FROM routes", db).split() in (
        ["b1", "NULL"], ["b1"])
    assert login_backend(p, ALICE, certs) == "b1"
    assert "a move is in progress" not in p.cli("route", "show", ALICE).stdout
    r = p.cli("route", "move", ALICE, "b2", "--force")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 5
    while True:
        try:
            assert login_backend(p, ALICE, certs) == "b2"
            break
        except (imaplib.IMAP4.error, AssertionError):
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_a_move_cut_off_by_the_database_says_what_it_left_and_resumes_or_aborts(
    workdir, make_postern, certs
):
    """MariaDB frozen (SIGSTOP) while a move waits for confirmations: the CLI says
    exactly what is written and how to finish; `--abort` rolls it back, `--resume`
    finishes it, and a plain move refuses to start over an interrupted one."""
    server = MariaDB(workdir / "db-move", certs).start()
    try:

        def edit(c):
            on_database(server.url())(c)
            c["routing"]["moves"] = {"hold": "120s", "ack_timeout": "60s",
                                     "store_patience": "2s"}

        p = make_postern(edit, seed=False)
        assert p.cli("route", "pin", ALICE, "b1").returncode == 0
        assert p.cli("route", "pin", BOB, "b2").returncode == 0

        def interrupted_move(user, to):
            # A live instance that never confirms keeps the move waiting...
            now = int(time.time())
            server.sql(f"REPLACE INTO instances VALUES ('stuck', {now + 3600}, 0)")
            mover = subprocess.Popen(
                [str(binary()), "-c", str(p.config_path), "route", "move", user, to],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 20
            while "NULL" in server.sql(f"SELECT COALESCE(moving_to, 'NULL') FROM routes "
                                       f"WHERE username = '{user}'"):
                assert time.monotonic() < deadline, "the move never began"
                time.sleep(0.1)
            # ...until the database stops answering.
            server.proc.send_signal(signal.SIGSTOP)
            try:
                out, err = mover.communicate(timeout=60)
            finally:
                server.proc.send_signal(signal.SIGCONT)
            # The first statements after SIGCONT may meet connections the server is
            # still waking up to: bounded retries.
            for attempt in range(20):
                try:
                    server.sql("DELETE FROM instances WHERE id = 'stuck'")
                    break
                except subprocess.CalledProcessError as e:
                    assert attempt < 19, e.stderr
                    time.sleep(0.5)
            assert mover.returncode == 1, (out, err)
            return err

        err = interrupted_move(ALICE, "b2")
        assert "move interrupted" in err and "the hold and the kick are written" in err, err
        assert "--resume" in err and "--abort" in err and "stays on b1" in err, err
        r = p.cli("route", "move", ALICE, "b2")
        assert r.returncode == 1 and "--resume" in r.stderr, r.stderr
        r = p.cli("route", "move", ALICE, "b2", "--abort")
        assert r.returncode == 0 and "rolled back" in r.stdout, r.stderr
        eventually_on(p, ALICE, certs, "b1")

        err = interrupted_move(BOB, "b1")
        assert "move interrupted" in err, err
        r = p.cli("route", "move", BOB, "b1", "--resume")
        assert r.returncode == 0 and "moved from b2 to b1" in r.stdout, (r.stdout, r.stderr)
        eventually_on(p, BOB, certs, "b1")
    finally:
        server.stop()


def test_a_hung_database_does_not_hang_the_admin_api(workdir, make_postern, certs):
    """MariaDB frozen (SIGSTOP): the backend list answers from memory (the last counts,
    marked stale), and cached users still log in."""
    server = MariaDB(workdir / "db-hung", certs).start()
    try:

        def edit(c):
            on_database(server.url())(c)
            c["admin"] = {"bind": "127.0.0.1:0"}

        p = make_postern(edit, seed=False, start=False)
        assert p.cli("route", "pin", ALICE, "b2").returncode == 0
        p.start()
        assert login_backend(p, ALICE, certs) == "b2"

        def backends():
            with urllib.request.urlopen(p.admin_url + "/api/backends", timeout=30) as r:
                return {b["name"]: b for b in json.loads(r.read())["backends"]}

        assert backends()["b2"]["pinned_users"] == 1
        assert backends()["b2"]["pinned_users_fresh"] is True
        server.freeze()
        try:
            hung = backends()
            assert hung["b2"]["pinned_users"] == 1, hung["b2"]
            assert hung["b2"]["pinned_users_fresh"] is False, hung["b2"]
            assert login_backend(p, ALICE, certs) == "b2"  # the cached route
        finally:
            server.proc.send_signal(signal.SIGCONT)
    finally:
        server.stop()
