"""The fault suite (issue 16): real Dovecot, Postfix and MariaDB started by the harness,
a real Postern, faults injected with signals. Every loop is bounded by a count, every
wait by a deadline, and every assertion is on counts and outcomes, never on how long
something took.

FAULTS_SCALE (default 1) multiplies the load: the normal suite runs it at 1 (under a
minute on 2 cores), `scripts/faults.sh` at 10.
"""

import json
import os
import random
import re
import signal
import smtplib
import threading
import time
import urllib.request
import uuid
from collections import Counter
from email.message import EmailMessage
from pathlib import Path

import pytest

from conftest import USERS
from harness.databases import MariaDB
from harness.dovecot import Cluster
from harness.postern import Postern, base_config
from harness.net import read_until
from harness.postfix import Postfix
from imap_client import Raw
from test_backends import own_cluster, start  # noqa: F401  (the fixtures)

SCALE = max(1, int(os.environ.get("FAULTS_SCALE", "1")))
ALICE, BOB = "alice@example.test", "bob@example.test"
NEW = sorted(u for u in USERS if u.startswith("new"))


def imap_session(addr, user, rounds, errors, ended, rng):
    """One looping client: login, select, append, fetch, logout, `rounds` times.
    Counts failed steps in `errors` and sessions the server ended (BYE or EOF while
    we still spoke) in `ended`."""
    for r in range(rounds):
        try:
            raw = Raw(addr)
        except OSError:
            errors.append("connect")
            continue
        try:
            if not raw.greeting.startswith(b"* OK"):
                errors.append("greeting")
                continue
            steps = [
                (f"a LOGIN {user} {USERS[user]}\r\n".encode(), b"a"),
                (b"b SELECT INBOX\r\n", b"b"),
            ]
            msg = f"Subject: load {r}\r\n\r\n{'x' * rng.randint(10, 2000)}\r\n".encode()
            steps.append((b"c APPEND INBOX {%d+}\r\n" % len(msg) + msg + b"\r\n", b"c"))
            steps.append((b"d FETCH 1:* (FLAGS)\r\n", b"d"))
            steps.append((b"e LOGOUT\r\n", b"e"))
            for data, tag in steps:
                got = raw.cmd(data, tag)
                if not got:
                    ended.append(tag.decode())
                    break
                if b"* BYE" in got and tag != b"e":
                    ended.append(tag.decode())
                    break
                if not re.search(rb"(^|\n)%s OK" % tag, got):
                    errors.append(f"{tag.decode()}: {got[-200:]!r}")
                    break
        except OSError as e:
            errors.append(f"io: {e}")
        finally:
            raw.close()


def load(addr, clients, rounds):
    errors, ended = [], []
    threads = [
        threading.Thread(
            target=imap_session,
            args=(addr, NEW[i % len(NEW)], rounds, errors, ended, random.Random(i)),
        )
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return errors, ended


def test_overload_postern_adds_no_errors_over_direct(start, own_cluster):
    """N looping clients against ONE Dovecot, first directly, then through Postern with
    the default [health]: Postern's errors are no more than direct's, and Postern ends
    no session."""
    clients, rounds = 20 * SCALE, 2 + 2 * SCALE

    def edit(c):
        c.pop("health", None)  # the defaults, as a new user has them
        c["routing"]["unknown_users"] = "assign"
        # The comparison is of what the backend can take: Dovecot has no per-user
        # limit on logins in flight, so neither does Postern here.
        c["limits"]["max_failures_per_user"] = 0

    p = start(edit)
    for u in NEW:
        assert p.cli("route", "pin", u, "b1").returncode == 0
    direct_errors, direct_ended = load(("127.0.0.1", own_cluster["b1"].imap_port), clients,
                                       rounds)
    errors, ended = load(p.addr("imap-plain"), clients, rounds)
    kinds = Counter(e.split(":")[0] for e in direct_errors)
    print(f"overload: {clients} clients x {rounds} rounds: direct errors={len(direct_errors)} "
          f"{dict(kinds)} ended={len(direct_ended)}; through Postern errors={len(errors)} "
          f"{dict(Counter(e.split(':')[0] for e in errors))} ended={len(ended)}")
    assert len(errors) <= len(direct_errors), (errors[:5], direct_errors[:5])
    assert ended == [] and direct_ended == [], (ended[:5], direct_ended[:5])
    log = p.log()
    assert "backend DOWN" not in log
    assert not re.search(r"session ended reason=\"?(kicked|shutdown)", log)


def test_a_frozen_backend_releases_its_logins_and_leaves_the_other_backend_alone(
    start, own_cluster
):
    """b1 frozen (SIGSTOP) in a shared pool: logins waiting on it are released when it
    goes DOWN and served by b2; b2's users see no failure; after SIGCONT b1 takes its
    users back."""

    def edit(c):
        c["pools"] = {"default": {"mode": "shared", "failover": "temporary"}}
        # Long enough that only the release at DOWN can answer in time.
        c["timeouts"] = {"preauth": "90s", "backend_login": "90s"}

    p = start(edit)
    # Spread over users (all on b1): many logins of one user at once are what the
    # per-user failure limit refuses, rightly, as a brute force.
    stranded_users = [ALICE] + NEW
    for u in NEW:
        assert p.cli("route", "pin", u, "b1").returncode == 0
    b1 = own_cluster["b1"]
    idle = Raw(p.addr("imap-plain"))
    assert idle.cmd(f"a LOGIN {BOB} {USERS[BOB]}\r\n".encode(), b"a").startswith(b"a OK")
    assert b"b OK" in idle.cmd(b"b SELECT INBOX\r\n", b"b")
    answers, bob_errors = {}, []
    os.killpg(b1.proc.pid, signal.SIGSTOP)
    try:
        def alice(i):
            user = stranded_users[i % len(stranded_users)]
            raw = Raw(p.addr("imap-plain"))
            raw.send(f"a LOGIN {user} {USERS[user]}\r\n".encode())
            got = read_until(raw.sock, b"\r\n", timeout=80)
            if got.startswith(b"a OK"):
                got += raw.cmd(b"b ID NIL\r\n", b"b")
            answers[i] = got
            raw.close()

        stranded = [threading.Thread(target=alice, args=(i,)) for i in range(5 * SCALE)]
        for t in stranded:
            t.start()
        # b2's users log in and work while b1 is frozen: no head-of-line blocking.
        for i in range(10 * SCALE):
            raw = Raw(p.addr("imap-plain"))
            got = raw.cmd(f"a LOGIN {BOB} {USERS[BOB]}\r\n".encode(), b"a")
            if not got.startswith(b"a OK"):
                bob_errors.append(got)
            raw.close()
        p.wait_log(r"backend DOWN.*backend=\"?b1\b.*protocol=imap", timeout=60)
        for t in stranded:
            t.join(timeout=85)
        assert not any(t.is_alive() for t in stranded), "a login on the frozen backend hung"
        assert bob_errors == []
        assert len(answers) == 5 * SCALE
        for got in answers.values():
            assert got.startswith(b"a OK") and b"postern-backend-b2" in got, got
        released = p.log().count("backend went down during the login; routing again")
        print(f"frozen: {len(answers)} stranded logins answered, all OK on b2; "
              f"{released} released at DOWN; b2 user failures={len(bob_errors)}")
        assert released > 0
        assert b"c OK" in idle.cmd(b"c NOOP\r\n", b"c"), "b2's IDLE-ish session was ended"
    finally:
        os.killpg(b1.proc.pid, signal.SIGCONT)
    p.wait_log(r"backend UP.*backend=\"?b1\b.*protocol=imap", timeout=60)
    raw = Raw(p.addr("imap-plain"))
    got = raw.cmd(f"a LOGIN {ALICE} {USERS[ALICE]}\r\n".encode(), b"a")
    got += raw.cmd(b"b ID NIL\r\n", b"b")
    assert b"postern-backend-b1" in got, got


def test_logins_waiting_since_before_a_reload_are_released_at_a_down_after_it(
    start, own_cluster
):
    """b1 frozen (SIGSTOP) in a shared pool with logins waiting on it; Postern reloads
    (SIGHUP) before b1 is DOWN. The DOWN, reached by the new configuration's checks,
    still releases the logins that started under the old one, and b2 serves them."""

    def edit(c):
        c["pools"] = {"default": {"mode": "shared", "failover": "temporary"}}
        c["timeouts"] = {"preauth": "90s", "backend_login": "90s"}
        # The defaults: a frozen backend is DOWN some 6 s after its last answer, time
        # enough for the logins to reach it and for the reload to happen first.
        c["health"] = {}
        c["admin"] = {"bind": "127.0.0.1:0"}

    p = start(edit)
    users = [ALICE] + NEW[: 2 * SCALE]
    for u in users[1:]:
        assert p.cli("route", "pin", u, "b1").returncode == 0
    b1 = own_cluster["b1"]
    answers = {}
    os.killpg(b1.proc.pid, signal.SIGSTOP)
    try:
        def login(u):
            raw = Raw(p.addr("imap-plain"))
            raw.send(f"a LOGIN {u} {USERS[u]}\r\n".encode())
            got = read_until(raw.sock, b"\r\n", timeout=80)
            if got.startswith(b"a OK"):
                got += raw.cmd(b"b ID NIL\r\n", b"b")
            answers[u] = got
            raw.close()

        threads = [threading.Thread(target=login, args=(u,)) for u in users]
        for t in threads:
            t.start()
        # Every login is on b1 (connected or logging in) under generation 1.
        deadline = time.monotonic() + 20
        while metric(p, "postern_backend_logins_in_flight", backend="b1",
                     protocol="imap") < len(users):
            assert time.monotonic() < deadline, "the logins never reached b1"
            time.sleep(0.1)
        p.proc.send_signal(signal.SIGHUP)
        p.wait_log(r"configuration reloaded generation=2", timeout=20)
        assert "backend DOWN" not in p.log(), "b1 went down before the reload"
        p.wait_log(r"backend DOWN.*backend=\"?b1\b.*protocol=imap", timeout=60)
        for t in threads:
            t.join(timeout=85)
        assert not any(t.is_alive() for t in threads), "a login on the frozen backend hung"
    finally:
        os.killpg(b1.proc.pid, signal.SIGCONT)
    assert len(answers) == len(users)
    for u, got in answers.items():
        assert got.startswith(b"a OK") and b"postern-backend-b2" in got, (u, got)
    log = p.log()
    assert log.index("configuration reloaded generation=2") < log.index("backend DOWN")
    released = log.count("backend went down during the login; routing again")
    print(f"frozen across a reload: {len(users)} logins waiting since generation 1, "
          f"{released} released at the DOWN after the reload, all OK on b2")
    assert released == len(users)


def metric(p, name: str, **labels) -> float:
    """A value from /metrics (0 when the series is absent)."""
    text = urllib.request.urlopen(p.admin_url + "/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line
                                               for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def db_cluster(workdir, certs):
    """Two Dovecots whose passdb is, after the passwd file, one private MariaDB: users
    dbNN exist only there."""
    db = None
    for attempt in range(3):
        try:
            db = MariaDB(workdir / f"mariadb{attempt}", certs).start()
            break
        except RuntimeError:
            # The free port it was given was taken before mariadbd bound it (the
            # machine is shared): a fresh directory and port.
            if attempt == 2:
                raise
    users = {f"db{i:02}@example.test": f"db{i:02}-Secret-8K" for i in range(1, 5 * SCALE + 1)}
    db.sql("CREATE TABLE users (username VARCHAR(255) PRIMARY KEY, password VARCHAR(255))")
    db.sql("INSERT INTO users VALUES " + ",".join(f"('{u}','{{PLAIN}}{pw}')"
                                                  for u, pw in users.items()))
    sql_conf = workdir / "dovecot-sql.conf.ext"
    sql_conf.write_text(
        f"driver = mysql\n"
        f"connect = host=127.0.0.1 port={db.port} dbname=postern user=postern "
        f"password=postern-pw\n"
        "password_query = SELECT username AS user, password FROM users "
        "WHERE username = '%Lu'\n"
    )
    sql_conf.chmod(0o644)
    extra = f"passdb {{\n  driver = sql\n  args = {sql_conf}\n}}\n"
    c = Cluster(workdir / "c", USERS, extra=lambda d: extra).start()
    try:
        yield c, db, users
    finally:
        c.stop()
        if db.proc is not None and db.proc.poll() is None:
            db.proc.send_signal(signal.SIGCONT)
        db.stop()


@pytest.mark.parametrize("routes", ["sqlite", "mariadb"])
def test_a_hung_password_database_takes_no_backend_down(db_cluster, certs, workdir, routes):
    """MariaDB behind both Dovecots' passdb hung (SIGSTOP): logins that need it time
    out on every backend at once. Without active checks real logins are the only
    evidence, yet no backend is marked down and no session is ended; the logins get
    the temporary failure, and everything recovers on SIGCONT. With the routes in the
    same MariaDB (the issue's setup), the route store's failure is what exonerates the
    backends; with the routes elsewhere, that every backend times out at once does."""
    cluster, db, users = db_cluster
    config = base_config(cluster, certs, workdir)
    config["health"] = {"enabled": False}
    # A login times out well after the last success (so slowness forgives nothing).
    config["timeouts"] = {"preauth": "30s", "backend_login": "8s"}
    if routes == "mariadb":
        db.new_database("routes")
        config["routing"]["sql"] = {"url": db.url("routes"), "query_timeout": "1s"}
        # Expired by the time of the hang, but served stale while the store fails.
        config["routing"]["cache"] = {"ttl": "1s"}
    p = Postern(workdir / "postern", config)
    if routes == "sqlite":
        p.seed()
    else:
        for u, b in ((ALICE, "b1"), (BOB, "b2")):
            assert p.cli("route", "pin", u, b).returncode == 0
    p.start()
    try:
        names = sorted(users)
        for i, u in enumerate(names):
            assert p.cli("route", "pin", u, f"b{i % 2 + 1}").returncode == 0
        # Each Dovecot opens its MariaDB connection before the hang, and every route
        # is in Postern's cache.
        for u in names:
            raw = Raw(p.addr("imap-plain"))
            assert raw.cmd(f"a LOGIN {u} {users[u]}\r\n".encode(), b"a").startswith(b"a OK")
            raw.close()
        sessions = []
        for u in (ALICE, BOB):
            raw = Raw(p.addr("imap-plain"))
            assert raw.cmd(f"a LOGIN {u} {USERS[u]}\r\n".encode(), b"a").startswith(b"a OK")
            sessions.append(raw)
        time.sleep(7)  # the last successes fall out of the slowness window
        db.freeze()
        answers = {}
        try:
            def login(u):
                raw = Raw(p.addr("imap-plain"))
                raw.sock.settimeout(60)
                answers[u] = raw.cmd(f"a LOGIN {u} {users[u]}\r\n".encode(), b"a")
                raw.close()

            threads = [threading.Thread(target=login, args=(u,)) for u in names]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert not any(t.is_alive() for t in threads), "a login hung"
            for u, got in answers.items():
                assert got.startswith(b"a NO [UNAVAILABLE]"), (u, got)
            log = p.log()
            assert "backend DOWN" not in log, log[-3000:]
            assert "the cause is shared" in log
            # Every login timeout was judged shared; none counted against a backend.
            timeouts = log.count("postern_server::login: backend login timed out")
            assert log.count("not counted against the backend") == timeouts
            if routes == "mariadb":
                assert "cause=\"shared_dependency\"" in log or "cause=shared_dependency" in log
            print(f"hung passdb: {len(answers)} logins, all NO [UNAVAILABLE]; "
                  f"{timeouts} timed out at the backend, none counted; 0 DOWN")
            for i, s in enumerate(sessions):
                assert b"n OK" in s.cmd(b"n NOOP\r\n", b"n"), f"session {i} was ended"
        finally:
            os.kill(db.proc.pid, signal.SIGCONT)
        # Recovery: Dovecot and the route store work through their backlog first, so
        # each user gets a bounded number of tries.
        for u in names:
            for attempt in range(40):
                raw = Raw(p.addr("imap-plain"))
                got = raw.cmd(f"a LOGIN {u} {users[u]}\r\n".encode(), b"a")
                raw.close()
                if got.startswith(b"a OK"):
                    break
                time.sleep(0.5)
            assert got.startswith(b"a OK"), (u, got)
        assert "backend DOWN" not in p.log()
    finally:
        p.stop()


def imap_services(p):
    """Each backend's IMAP service as /api/backends shows it."""
    with urllib.request.urlopen(p.admin_url + "/api/backends", timeout=30) as r:
        backends = json.load(r)["backends"]
    return {b["name"]: b["services"]["imap"] for b in backends}


@pytest.mark.parametrize("fault", ["hung", "stopped"])
def test_checks_that_log_in_stall_on_a_hung_password_database_and_take_no_backend_down(
    db_cluster, certs, workdir, fault
):
    """Health checks that log in (probe_user, a user of the shared MariaDB) while that
    MariaDB is hung (SIGSTOP): every backend's check gets the greeting and stalls in
    the login step. Compared with each other, none of those stalls is counted: no
    backend is marked down, no session ended; /api/backends shows them up, degraded.
    After SIGCONT the checks pass again and the database users log in. `stopped`:
    MariaDB shut down (then started again) instead, so Dovecot answers each check's
    login at once with its temporary failure (`NO [UNAVAILABLE]`): the same stall,
    told from a wrong password."""
    cluster, db, users = db_cluster
    stopped = fault == "stopped"
    probe = ("probe@example.test", "probe-Secret-8K")
    db.sql(f"INSERT INTO users VALUES ('{probe[0]}','{{PLAIN}}{probe[1]}')")
    config = base_config(cluster, certs, workdir, admin=True)
    # Stopped, Dovecot answers after its auth_failure_delay (2 s): within the bound.
    config["health"] = {"interval": "500ms", "timeout": "3s" if stopped else "1s",
                        "rise": 2, "fall": 2}
    for b in config["backends"].values():
        b["health"] = {"probe_user": probe[0], "probe_password": probe[1]}
    p = Postern(workdir / "postern", config)
    p.seed()
    p.start()
    try:
        names = sorted(users)
        for i, u in enumerate(names):
            assert p.cli("route", "pin", u, f"b{i % 2 + 1}").returncode == 0
        # The checks log in through MariaDB: both up, no error left.
        deadline = time.monotonic() + 30
        while any(s["state"] != "up" or s["last_error"] for s in imap_services(p).values()):
            assert time.monotonic() < deadline, imap_services(p)
            time.sleep(0.2)
        sessions = []
        for u in (ALICE, BOB):
            raw = Raw(p.addr("imap-plain"))
            assert raw.cmd(f"a LOGIN {u} {USERS[u]}\r\n".encode(), b"a").startswith(b"a OK")
            sessions.append(raw)
        stalled = re.compile(
            r"health check's login stalled after the greeting.*backend=\"?(b\d)\b.*protocol=imap")
        # Counted from the fault on (a check may have been slow at start-up).
        before = Counter(stalled.findall(p.log()))
        if stopped:
            db.stop()
        else:
            db.freeze()
        try:
            # Hung (or stopped) for as many checks as it takes to excuse 3 × fall stalls on each
            # backend: without the rule, `fall` of them take a backend down.
            # Stopped: until Dovecot, past its reconnect attempts, answers with its
            # temporary failure on both backends too.
            answered = re.compile(r"stalled after the greeting.*backend=\"?(b\d)\b.*"
                                  r"protocol=imap.*greeted, then a temporary failure")
            deadline = time.monotonic() + 60
            while True:
                seen = Counter(stalled.findall(p.log())) - before
                told = Counter(answered.findall(p.log()))
                if all(seen[b] >= 6 and (told[b] >= 2 or not stopped) for b in ("b1", "b2")):
                    break
                assert "backend DOWN" not in p.log(), p.log()[-3000:]
                assert time.monotonic() < deadline, (seen, told)
                time.sleep(0.2)
            services = imap_services(p)
            for name, s in services.items():
                assert s["up"] is True and s["state"] == "up", (name, s)
                assert s["degraded"] is True, (name, s)
                assert "probe login: greeted" in (s["last_error"] or ""), (name, s)
            log = p.log()
            assert "backend DOWN" not in log, log[-3000:]
            for i, s in enumerate(sessions):
                assert b"n OK" in s.cmd(b"n NOOP\r\n", b"n"), f"session {i} was ended"
            print(f"hung passdb, checks that log in: {dict(seen)} stalled checks excused "
                  f"(imap; {dict(told)} answered with a temporary failure), 0 DOWN, "
                  f"{len(sessions)} sessions kept")
        finally:
            if stopped:
                db.start()
            else:
                os.kill(db.proc.pid, signal.SIGCONT)
        # Recovery: the checks pass again (rise), and the database users log in.
        deadline = time.monotonic() + 60
        while any(s["last_error"] or s["degraded"] for s in imap_services(p).values()):
            assert time.monotonic() < deadline, imap_services(p)
            time.sleep(0.2)
        for u in names:
            for attempt in range(40):
                raw = Raw(p.addr("imap-plain"))
                got = raw.cmd(f"a LOGIN {u} {users[u]}\r\n".encode(), b"a")
                raw.close()
                if got.startswith(b"a OK"):
                    break
                time.sleep(0.5)
            assert got.startswith(b"a OK"), (u, got)
        for i, s in enumerate(sessions):
            assert b"m OK" in s.cmd(b"m NOOP\r\n", b"m"), f"session {i} was ended"
        health = [line for line in p.log().splitlines() if "backends::health" in line]
        assert not any("backend DOWN" in line for line in health), health[-40:]
    finally:
        p.stop()


def test_mx_messages_arrive_exactly_once_with_postfix_killed_midway(workdir, certs):
    """MX mail through Postern to b1's Postfix, which is killed (SIGKILL) and restarted
    half-way; the sender retries on 4xx and on a lost connection, as an MTA does.
    Every Message-ID is in the maildirs exactly once."""
    cluster = Cluster(workdir / "c", USERS, count=1).start()
    pf = None
    try:
        b1 = cluster["b1"]
        pf = Postfix("b1", workdir / "pf-b1", lmtp_target=f"inet:127.0.0.1:{b1.lmtp_port}",
                     sasl_target=f"inet:127.0.0.1:{b1.auth_port}").start()
        config = base_config(cluster, certs, workdir)
        config["backends"]["b1"]["smtp"] = {"port": pf.smtp_port}
        config["health"] = {"interval": "300ms", "timeout": "1s"}
        config["server"] = {"hostname": "postern.example.test"}
        config["listeners"].append(
            {"name": "mx", "protocol": "smtp", "bind": "127.0.0.1:0", "tls": "starttls"})
        config["routing"]["unknown_users"] = "assign"
        p = Postern(workdir / "postern", config)
        p.seed()
        p.start()
        recipients = [ALICE] + NEW[:4]
        for u in recipients[1:]:
            assert p.cli("route", "pin", u, "b1").returncode == 0
        total = 30 * SCALE
        ids, retries = [], 0

        def delivered():
            found = {}
            for path in Path(cluster.mailroot).rglob("*"):
                if path.is_file() and ("/new/" in str(path) or "/cur/" in str(path)):
                    for m in re.findall(rb"(?im)^Message-ID:\s*(<[^>]+>)", path.read_bytes()):
                        found[m.decode()] = found.get(m.decode(), 0) + 1
            return found

        for n in range(total):
            if n == total // 2:
                # Killed between transactions, and held down while the next message
                # is tried: the sender must see the outage and retry through it.
                # Postfix's queue is let drain first: a Postfix killed while it
                # delivers may deliver that message again after its restart (its own
                # at-least-once rule), which is not what this test is about.
                drain = time.monotonic() + 60
                while any(delivered().get(m, 0) == 0 for m in ids):
                    assert time.monotonic() < drain, "Postfix never delivered"
                    time.sleep(0.2)
                pf.kill()
                outage = True
            else:
                outage = False
            msg = EmailMessage()
            mid = f"<{uuid.uuid4()}@faults.example.org>"
            msg["Message-ID"] = mid
            msg["From"] = "sender@example.org"
            msg["To"] = recipients[n % len(recipients)]
            msg["Subject"] = f"fault {n}"
            msg.set_content("exactly once\n")
            for attempt in range(60):
                try:
                    with smtplib.SMTP(*p.addr("mx"), timeout=30) as s:
                        s.ehlo("mta.example.org")
                        s.send_message(msg)
                    ids.append(mid)
                    break
                except (smtplib.SMTPException, OSError):
                    retries += 1
                    if outage:
                        pf.start()
                        outage = False
                    time.sleep(0.5)
            else:
                raise AssertionError(f"message {n} never accepted")
        assert retries > 0, "the kill never showed: the test did not test it"

        deadline = time.monotonic() + 120
        found = delivered()
        while any(found.get(m, 0) < 1 for m in ids) and time.monotonic() < deadline:
            time.sleep(0.5)
            found = delivered()
        missing = [m for m in ids if found.get(m, 0) == 0]
        twice = {m: n for m, n in found.items() if m in ids and n > 1}
        assert missing == [] and twice == {}, (missing[:5], twice)
        print(f"mx: {total} messages, {retries} retries by the sender, "
              f"{sum(found.get(m, 0) for m in ids)} delivered, 0 missing, 0 twice")
        p.stop()
    finally:
        if pf is not None:
            pf.stop()
        cluster.stop()


def test_own_storage_logins_waiting_on_a_frozen_backend_are_answered_at_its_down(
    start, own_cluster
):
    """Own storage: a user whose backend froze has nowhere else to go. The logins
    waiting on it get the temporary failure when it goes DOWN, not after the login
    timeout, and never another backend."""

    def edit(c):
        c["timeouts"] = {"preauth": "90s", "backend_login": "90s"}

    p = start(edit)
    b1 = own_cluster["b1"]
    users = [ALICE] + NEW[: 2 * SCALE]
    for u in users[1:]:
        assert p.cli("route", "pin", u, "b1").returncode == 0
    answers = {}
    os.killpg(b1.proc.pid, signal.SIGSTOP)
    try:
        def login(u):
            raw = Raw(p.addr("imap-plain"))
            raw.send(f"a LOGIN {u} {USERS[u]}\r\n".encode())
            answers[u] = read_until(raw.sock, b"\r\n", timeout=80)
            raw.close()

        threads = [threading.Thread(target=login, args=(u,)) for u in users]
        for t in threads:
            t.start()
        p.wait_log(r"backend DOWN.*backend=\"?b1\b.*protocol=imap", timeout=60)
        for t in threads:
            t.join(timeout=85)
        assert not any(t.is_alive() for t in threads), "a login hung"
    finally:
        os.killpg(b1.proc.pid, signal.SIGCONT)
    for u, got in answers.items():
        assert got.startswith(b"a NO [UNAVAILABLE]"), (u, got)
    assert len(answers) == len(users)
    log = p.log()
    assert log.count("backend went down during the login; routing again") == len(users)
    assert "login did not finish before the pre-auth deadline" not in log
    assert "login accepted" not in log, "a user was served by another backend"
