"""Abuse control at the edge: failure windows per address and per user with a growing
delay, trusted networks, per-address connection caps and rate, per-user session caps.
The tests' own 127.0.0.1 is trusted by the base config; attackers come from other
loopback addresses (127.0.0.2 and up). Real Dovecot and Postfix behind Postern."""

import base64
import re
import socket
import time

import pytest

from conftest import USERS
from harness.net import read_until
from harness.postern import smtp_config
from imap_client import Raw

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"

PLAIN_LISTENERS = [
    {"name": "pop3-plain", "protocol": "pop3", "bind": "127.0.0.1:0", "tls": "none",
     "insecure_plaintext_auth": True},
]


def limits(**kw):
    def edit(config):
        config["limits"].update(kw)
        config["listeners"] += PLAIN_LISTENERS

    return edit


def imap_login(p, user, password, source):
    raw = Raw(p.addr("imap-plain"), source=source)
    out = raw.cmd(f'a LOGIN "{user}" "{password}"\r\n'.encode(), b"a")
    raw.close()
    return out


def smtp_reply(s):
    """Reads one (possibly multi-line) SMTP reply."""
    out = b""
    while True:
        line = read_until(s, b"\r\n")
        assert line, f"closed after {out!r}"
        out += line
        if out.split(b"\r\n")[-2][3:4] == b" ":
            return out


def timed_login(p, user, password, source):
    start = time.monotonic()
    out = imap_login(p, user, password, source)
    return out, time.monotonic() - start


def test_failures_from_an_address_are_delayed_then_refused(make_postern, cluster):
    p = make_postern(limits(
        failure_delay="200ms", max_failure_delay="800ms", max_failures_per_ip=4,
        max_failures_per_user=0,
    ))
    delays = []
    for i in range(4):
        out, secs = timed_login(p, f"new{i + 1:02}@example.test", "wrong", "127.0.0.2")
        assert b"a NO [AUTHENTICATIONFAILED]" in out, out
        delays.append(secs)
    # 200, 400, 800, 800 ms: the delay doubles up to the cap.
    for got, want in zip(delays, [0.2, 0.4, 0.8, 0.8]):
        assert got >= want * 0.9, delays
    before = len(cluster["b1"].logins())
    out = imap_login(p, ALICE, USERS[ALICE], "127.0.0.2")
    assert out.startswith(b"a NO [LIMIT]") or b"\r\na NO [LIMIT]" in out, out
    assert len(cluster["b1"].logins()) == before, "a blocked address never reaches a backend"
    p.wait_log(r"login refused by abuse control.*limit=\"?auth_failures")
    # Another address, and the trusted one, are not affected.
    assert b"a OK" in imap_login(p, ALICE, USERS[ALICE], "127.0.0.3")
    # (An unknown user: Postern answers itself; Dovecot would add its own 2 s delay.)
    out, secs = timed_login(p, "nobody@example.test", "wrong", "127.0.0.1")
    assert b"a NO [AUTHENTICATIONFAILED]" in out and secs < 0.2


def test_failures_for_a_user_are_refused_from_any_address(make_postern, postfixes, cluster,
                                                          certs, workdir):
    def edit(config):
        smtp = smtp_config(cluster, postfixes, certs, workdir)
        config["backends"] = smtp["backends"]
        config["server"] = smtp["server"]
        config["listeners"] += [
            {"name": "sub-plain", "protocol": "submission", "bind": "127.0.0.1:0",
             "tls": "none", "insecure_plaintext_auth": True},
        ]
        limits(failure_delay="0s", max_failures_per_user=3, max_failures_per_ip=0)(config)

    p = make_postern(edit)
    for i in range(3):
        out = imap_login(p, CAROL, "wrong", f"127.0.0.{10 + i}")
        assert b"a NO [AUTHENTICATIONFAILED]" in out, out
    # Even the right password, from a fresh address: the user is locked for the window.
    out = imap_login(p, CAROL, USERS[CAROL], "127.0.0.20")
    assert b"a NO [LIMIT]" in out, out
    # POP3 says LOGIN-DELAY (RFC 2449), SMTP 421 4.7.0 and closes.
    s = socket.create_connection(p.addr("pop3-plain"), timeout=10, source_address=("127.0.0.21", 0))
    assert read_until(s, b"\r\n").startswith(b"+OK")
    s.sendall(f"USER {CAROL}\r\n".encode())
    assert read_until(s, b"\r\n").startswith(b"+OK")
    s.sendall(f"PASS {USERS[CAROL]}\r\n".encode())
    assert read_until(s, b"\r\n").startswith(b"-ERR [LOGIN-DELAY] ")
    s.close()
    s = socket.create_connection(p.addr("sub-plain"), timeout=10, source_address=("127.0.0.22", 0))
    assert read_until(s, b"\r\n").startswith(b"220 ")
    s.sendall(b"EHLO client.test\r\n")
    assert smtp_reply(s).startswith(b"250-")
    ir = base64.b64encode(f"\0{CAROL}\0{USERS[CAROL]}".encode()).decode()
    s.sendall(f"AUTH PLAIN {ir}\r\n".encode())
    line = read_until(s, b"\r\n")
    assert line.startswith(b"421 4.7.0 ") and b"(limit: auth_failures)" in line, line
    assert s.recv(100) == b"", "closed after 421"
    s.close()
    # Other users are fine.
    assert b"a OK" in imap_login(p, ALICE, USERS[ALICE], "127.0.0.23")


def test_trusted_network_is_exempt(make_postern):
    p = make_postern(limits(
        trusted_networks=["127.0.0.0/29"], failure_delay="1s", max_failures_per_ip=2,
        max_failures_per_user=0, max_connections_per_ip=2,
    ))
    start = time.monotonic()
    for i in range(5):
        assert b"a NO [AUTHENTICATIONFAILED]" in imap_login(
            p, f"new{i + 1:02}@example.test", "wrong", "127.0.0.5")
    assert time.monotonic() - start < 2.5, "no penalty delay for a trusted network"
    conns = [Raw(p.addr("imap-plain"), source="127.0.0.6") for _ in range(5)]
    assert all(c.greeting.startswith(b"* OK") for c in conns)
    for c in conns:
        c.close()
    assert b"a OK" in imap_login(p, ALICE, USERS[ALICE], "127.0.0.5")
    # Just outside the trusted /29, the limits apply.
    for i in range(2):
        imap_login(p, f"new{i + 10:02}@example.test", "wrong", "127.0.0.8")
    assert b"a NO [LIMIT]" in imap_login(p, ALICE, USERS[ALICE], "127.0.0.8")


def test_concurrent_connections_per_address(make_postern):
    p = make_postern(limits(max_connections_per_ip=3, connection_rate_per_ip=0))
    held = [Raw(p.addr("imap-plain"), source="127.0.0.30") for _ in range(3)]
    assert all(c.greeting.startswith(b"* OK") for c in held)
    over = socket.create_connection(p.addr("imap-plain"), timeout=10,
                                    source_address=("127.0.0.30", 0))
    assert read_until(over, b"\r\n") == (
        b"* BYE [LIMIT] Too many connections from your address, try again later"
        b" (limit: ip_connections).\r\n")
    assert over.recv(10) == b""
    over.close()
    # The cap counts across listeners and protocols.
    pop = socket.create_connection(p.addr("pop3-plain"), timeout=10,
                                   source_address=("127.0.0.30", 0))
    assert read_until(pop, b"\r\n") == (
        b"-ERR [SYS/TEMP] Too many connections from your address, try again later"
        b" (limit: ip_connections).\r\n")
    pop.close()
    # Implicit TLS: closed without a handshake.
    tls = socket.create_connection(p.addr("imaps"), timeout=10, source_address=("127.0.0.30", 0))
    assert tls.recv(10) == b""
    tls.close()
    # A closed connection frees its slot.
    held.pop().close()
    time.sleep(0.3)
    again = Raw(p.addr("imap-plain"), source="127.0.0.30")
    assert again.greeting.startswith(b"* OK")
    for c in held + [again]:
        c.close()
    p.wait_log(r"connection refused by abuse control.*limit=\"?ip_connections")


def test_connection_rate_per_address(make_postern):
    p = make_postern(limits(connection_rate_per_ip=5, max_connections_per_ip=0))
    for _ in range(5):
        c = Raw(p.addr("imap-plain"), source="127.0.0.40")
        assert c.greeting.startswith(b"* OK")
        c.close()
    c = socket.create_connection(p.addr("imap-plain"), timeout=10,
                                 source_address=("127.0.0.40", 0))
    refusal = read_until(c, b"\r\n")
    c.close()
    # The limit by name (as in the metric) and how long to wait: under a minute, the
    # rate window.
    m = re.fullmatch(rb"\* BYE \[LIMIT\] Connecting too fast, try again in (\d+) s"
                     rb" \(limit: connection_rate\)\.\r\n", refusal)
    assert m and 1 <= int(m[1]) <= 120, refusal
    assert Raw(p.addr("imap-plain"), source="127.0.0.41").greeting.startswith(b"* OK")


def test_sessions_per_user(make_postern):
    p = make_postern(limits(max_sessions_per_user=2))
    sessions = []
    for source in ("127.0.0.50", "127.0.0.51"):
        raw = Raw(p.addr("imap-plain"), source=source)
        assert b"a OK" in raw.cmd(f"a LOGIN {ALICE} {USERS[ALICE]}\r\n".encode(), b"a")
        sessions.append(raw)
    third = Raw(p.addr("imap-plain"), source="127.0.0.52")
    out = third.cmd(f"a LOGIN {ALICE} {USERS[ALICE]}\r\n".encode(), b"a")
    assert out == b"a NO [LIMIT] Too many sessions for this user.\r\n", out
    # The session goes on: once a slot frees up, the same connection logs in.
    sessions.pop().cmd(b"z LOGOUT\r\n", b"z")
    deadline = time.monotonic() + 5
    while True:
        out = third.cmd(f"b LOGIN {ALICE} {USERS[ALICE]}\r\n".encode(), b"b")
        if b"b OK" in out or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert b"b OK" in out, out
    for s in sessions + [third]:
        s.close()


@pytest.mark.parametrize("bad", ["not a network", "300.0.0.0/8"])
def test_invalid_trusted_network_is_a_config_error(make_postern, bad):
    p = make_postern(limits(trusted_networks=[bad]), seed=False, start=False)
    r = p.cli("check")
    assert r.returncode != 0 and "limits.trusted_networks" in r.stderr, r.stderr


def test_concurrent_guesses_cannot_beat_the_failure_limit(make_postern, cluster):
    """Twelve wrong passwords at once from one address, limit 3: attempts in flight
    count, so at most 3 reach the backend; the rest are refused by the limit."""
    import threading

    p = make_postern(limits(failure_delay="1s", max_failure_delay="1s",
                            max_failures_per_ip=3, max_failures_per_user=0,
                            max_connections_per_ip=0, connection_rate_per_ip=0))
    conns = [Raw(p.addr("imap-plain"), source="127.0.0.60") for _ in range(12)]
    barrier = threading.Barrier(len(conns))
    answers = [None] * len(conns)

    def guess(i):
        barrier.wait()
        answers[i] = conns[i].cmd(f'a LOGIN "new{i + 1:02}@example.test" "wrong"\r\n'.encode(), b"a")

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(len(conns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for c in conns:
        c.close()
    failed = sum(b"[AUTHENTICATIONFAILED]" in a for a in answers)
    limited = sum(b"a NO [LIMIT]" in a for a in answers)
    assert failed + limited == len(conns), answers
    assert 1 <= failed <= 3, answers
    p.wait_log(r"login refused by abuse control.*limit=\"?logins_in_flight")
