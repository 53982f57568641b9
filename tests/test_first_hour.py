"""What a newcomer and a migrating operator ran into in their first hour, each against
real Postern, Dovecot and Postfix: MX/LMTP backscatter for unknown recipients, an IMAP
ID at its RFC 2971 size, a backend that starts after Postern (unknown, not down), the
last error shown with its time and cleared once a service is well again, one
`instances` row per process across reloads, and the rate-limit refusal's text."""

import json
import re
import signal
import smtplib
import socket
import sqlite3
import time
import urllib.request


from conftest import USERS
from harness.dovecot import Dovecot
from harness.net import free_port, read_until
from test_smtp import smtp_postern  # noqa: F401  (the fixture)

ALICE, BOB = "alice@example.test", "bob@example.test"
NOBODY = "nobody@example.test"


def backends_api(p):
    with urllib.request.urlopen(p.admin_url + "/api/backends", timeout=30) as r:
        return {b["name"]: b for b in json.loads(r.read())["backends"]}


# -- MX and LMTP apply routing.unknown_users at RCPT time ------------------------------


def rcpt_replies(addr, recipients, lmtp=False):
    if lmtp:
        s = smtplib.LMTP(*addr, timeout=30)
    else:
        # From the address the backends' Postfix knows as a sending MTA.
        s = smtplib.SMTP(*addr, timeout=30, source_address=("127.0.0.2", 0))
    s.ehlo("mta.example.org")
    s.mail("sender@example.org")
    replies = {r: s.rcpt(r) for r in recipients}
    s.rset()
    s.quit()
    return replies


def test_mx_and_lmtp_reject_recipients_nobody_has(smtp_postern, postfixes, cluster):
    p = smtp_postern()
    for listener, lmtp in (("mx", False), ("lmtp", True)):
        replies = rcpt_replies(p.addr(listener), [NOBODY, ALICE], lmtp=lmtp)
        assert replies[NOBODY] == (
            550, f"5.1.1 <{NOBODY}>: Recipient address rejected: User unknown".encode()
        ), (listener, replies)
        assert replies[ALICE][0] == 250, (listener, replies)
    p.wait_log(r"recipient rejected: no pin")
    # Rejected at Postern: no backend ever heard of the address, so none can bounce.
    time.sleep(0.5)
    for name in ("b1", "b2"):
        assert NOBODY not in postfixes[name].log()
        assert NOBODY not in cluster[name].log()
    r = p.cli("route", NOBODY)
    assert r.returncode == 2 and "unknown_users = \"reject\"" in r.stdout


def test_mx_defers_when_the_route_store_cannot_answer(smtp_postern, postfixes):
    broken = "broken@example.test"

    def edit(c):
        # A lookup query that fails for one user only (SQLite's abs() overflows on the
        # smallest integer): the store cannot answer for them, and nothing is cached.
        c["routing"]["sql"]["lookup_query"] = (
            "SELECT backend FROM routes WHERE username = ? AND "
            "abs(CASE WHEN ? = 'broken@example.test' THEN -9223372036854775807 - 1 ELSE 1 END) > 0"
        )

    p = smtp_postern(edit)
    replies = rcpt_replies(p.addr("mx"), [broken, ALICE, NOBODY])
    code, text = replies[broken]
    assert code == 450 and text.startswith(f"4.3.0 <{broken}>: ".encode()), replies
    assert replies[ALICE][0] == 250 and replies[NOBODY][0] == 550, replies
    assert broken not in postfixes["b1"].log() + postfixes["b2"].log()


# -- IMAP ID at its RFC size -----------------------------------------------------------


def largest_id(tag: bytes) -> bytes:
    """RFC 2971's largest ID: 30 fields of 30 octets with 1024-octet values (~32 KB)."""
    pairs = b" ".join(
        b'"%s" "%s"' % ((b"field%02d" % i).ljust(30, b"f"), b"v" * 1024) for i in range(30)
    )
    return tag + b" ID (" + pairs + b")\r\n"


def imap_exchange(addr, lines):
    s = socket.create_connection(addr, timeout=30)
    assert read_until(s, b"\r\n").startswith(b"* OK")
    out = []
    for tag, line in lines:
        s.sendall(line)
        out.append(read_until(s, tag + b" "))
        out[-1] += read_until(s, b"\r\n") if not out[-1].endswith(b"\r\n") else b""
    s.close()
    return out


def test_imap_id_at_its_rfc_size_is_answered_like_dovecot(postern, cluster):
    line = largest_id(b"a1")
    assert len(line) > 16384, "larger than the default pre-login max_line_length"
    direct = imap_exchange(("127.0.0.1", cluster["b1"].imap_port), [(b"a1", line)])[0]
    assert b"a1 OK" in direct, direct
    login = f"a2 LOGIN {ALICE} {USERS[ALICE]}\r\n".encode()
    via = imap_exchange(
        postern.addr("imap-plain"),
        [(b"a1", line), (b"a2", login), (b"a3", b"a3 SELECT INBOX\r\n")],
    )
    assert b"a1 OK" in via[0], via[0]
    assert b"a2 OK" in via[1], via[1]
    assert b"a3 OK" in via[2], via[2]
    # Only ID has the larger bound: a LOGIN line that long is still refused.
    s = socket.create_connection(postern.addr("imap-plain"), timeout=30)
    read_until(s, b"\r\n")
    s.sendall(b"b1 LOGIN " + b"x" * len(line) + b"\r\n")
    assert read_until(s, b"* BYE").startswith(b"b1 BAD Command line too long.")
    s.close()


# -- a backend that starts after Postern -----------------------------------------------


def test_a_backend_starting_after_postern_is_unknown_then_up(
    cluster, certs, workdir, make_postern
):
    late = Dovecot("b3", workdir / "late-b3", cluster.mailroot, USERS)
    late.imap_port, late.pop3_port, late.lmtp_port = free_port(), free_port(), free_port()
    late.haproxy_port, late.auth_port = free_port(), free_port()
    never = free_port()

    def edit(c):
        c["admin"] = {"bind": "127.0.0.1:0"}
        c["health"] = {"interval": "200ms", "rise": 2, "fall": 2, "startup_grace": "4s"}
        c["backends"]["b3"] = {"host": "127.0.0.1", "imap": {"port": late.imap_port}}
        c["backends"]["b4"] = {"host": "127.0.0.1", "imap": {"port": never}}

    p = make_postern(edit)
    try:
        p.wait_log(r"backend service not answering yet.*backend=\"?b3\b")
        time.sleep(1.0)  # several failed checks, all within the grace
        b3 = backends_api(p)["b3"]["services"]["imap"]
        assert b3["state"] == "unknown" and b3["checks"] == "unknown", b3
        assert "refused" in b3["last_error"] and b3["last_error_at"], b3
        assert b3["last_error_unix"] <= time.time() + 1
        late.start()
        deadline = time.monotonic() + 20
        while True:
            b3 = backends_api(p)["b3"]["services"]["imap"]
            if b3["state"] == "up" and b3["last_error"] is None:
                break
            assert time.monotonic() < deadline, b3
            time.sleep(0.2)
        assert b3["last_error_at"] is None
        # The never-answering one goes down once the grace is over, and says so.
        p.wait_log(r"backend DOWN.*backend=\"?b4\b.*never_up=true", timeout=20)
        assert backends_api(p)["b4"]["services"]["imap"]["state"] == "down"
        assert not re.search(r"backend DOWN.*backend=\"?b3\b", p.log()), "b3 was starting, not down"
    finally:
        late.stop()


# -- one instances row per process, across reloads --------------------------------------


def test_reload_keeps_one_instances_row(make_postern, workdir):
    p = make_postern()
    db = p.config["routing"]["sql"]["url"][len("sqlite:"):]

    def instances():
        with sqlite3.connect(db) as c:
            return [r[0] for r in c.execute("SELECT id FROM instances")]

    deadline = time.monotonic() + 10
    while not instances():
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.1)
    first = instances()
    assert len(first) == 1
    for _ in range(3):
        # The default id has the start second in it: reload in later seconds.
        time.sleep(1.1)
        p.proc.send_signal(signal.SIGHUP)
    p.wait_log(r"generation=4")
    time.sleep(0.6)
    assert instances() == first, "a reload must not register the process again"
