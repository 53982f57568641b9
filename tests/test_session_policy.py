"""Which sessions Postern ends, against real Dovecot and Postfix: a backend marked DOWN
by its checks while it still answers keeps its live sessions; a pin that changes ends
the user's sessions on the other backend on every instance (with the protocol's
goodbye); and a delivery whose backend's SMTP service is down gets a temporary failure
instead of moving the pin under the user's live IMAP sessions."""

import os
import re
import signal
import smtplib
import time

from conftest import USERS
from harness.net import free_port
from imap_client import Raw
from test_backends import FAST_HEALTH, logged_in, own_cluster, start  # noqa: F401
from test_smtp import smtp_postern  # noqa: F401  (the fixture)

ALICE, BOB = "alice@example.test", "bob@example.test"


def test_a_backend_down_by_its_checks_keeps_sessions_that_still_work(start):
    p = start()

    # Checks start passing with the real probe password...
    def probe(password):
        p.config["backends"]["b1"]["health"] = {"probe_user": BOB, "probe_password": password}
        p.write_config()
        p.proc.send_signal(signal.SIGHUP)

    probe(USERS[BOB])
    p.wait_log(r"configuration reloaded generation=2")
    session = Raw(p.addr("imap-plain"))
    assert session.cmd(f"a LOGIN {ALICE} {USERS[ALICE]}\r\n".encode(), b"a").startswith(b"a OK")
    assert b"b OK" in session.cmd(b"b SELECT INBOX\r\n", b"b")
    # ...then fail (the probe's password is now wrong): b1 goes DOWN for IMAP although
    # Dovecot serves alice's session perfectly well.
    probe("not-the-password")
    p.wait_log(r"backend DOWN.*backend=\"?b1\b.*protocol=imap", timeout=20)
    for tag in (b"c", b"d", b"e"):
        assert b"%s OK" % tag in session.cmd(b"%s NOOP\r\n" % tag, tag), "the session was ended"
        time.sleep(0.2)
    assert b"f OK" in session.cmd(b"f LOGOUT\r\n", b"f")


def test_a_pin_change_ends_the_users_sessions_elsewhere_on_every_instance(
    start, own_cluster, certs
):
    a = start()
    b = start(seed=False)  # the same SQLite routes, a second instance
    on_a = logged_in(a, ALICE, certs)
    bob_on_a = logged_in(a, BOB, certs)
    r = b.cli("route", "pin", ALICE, "b2")
    assert r.returncode == 0, r.stderr
    # A's follower sees the pin event and ends alice's session on b1, with a goodbye.
    got = on_a.until(b"reconnect.\r\n", timeout=10)
    assert b"* BYE [UNAVAILABLE]" in got, got
    a.wait_log(r"pin changed: ending the user's sessions on other backends")
    # Nobody else was touched.
    assert b"z OK" in bob_on_a.cmd(b"z NOOP\r\n", b"z")


def test_mx_delivery_to_a_backend_whose_smtp_is_down_waits_and_moves_no_pin(smtp_postern):
    dead = free_port()

    def edit(c):
        c["pools"] = {"default": {"mode": "shared", "failover": "repin"}}
        c["health"] = {"interval": "200ms", "fall": 2, "rise": 2}
        c["backends"]["b1"]["smtp"] = {"port": dead}  # b1's Postfix is down

    p = smtp_postern(edit)
    p.wait_log(r"backend service not answering yet.*backend=\"?b1\b.*protocol=smtp")
    time.sleep(1.0)  # fall failures: b1's SMTP service is not routed to
    s = smtplib.SMTP(*p.addr("mx"), timeout=30, source_address=("127.0.0.2", 0))
    s.ehlo("mta.example.org")
    s.mail("sender@example.org")
    code, text = s.rcpt(ALICE)
    assert code == 450 and text.startswith(b"4.3.0"), (code, text)
    assert s.rcpt(BOB)[0] == 250  # b2's Postfix is fine
    s.rset()
    s.quit()
    # alice is still pinned to b1, where her IMAP is served: no re-pin by a delivery.
    assert "alice@example.test\tb1" in p.cli("route", "list").stdout
    assert "re-pinned" not in p.log()


def test_sigterm_says_goodbye_to_a_login_waiting_on_a_frozen_backend(start, own_cluster):
    p = start()
    b1 = own_cluster["b1"]
    os.killpg(b1.proc.pid, signal.SIGSTOP)  # alice's backend freezes
    try:
        raw = Raw(p.addr("imap-plain"))
        raw.send(f"a LOGIN {ALICE} {USERS[ALICE]}\r\n".encode())
        time.sleep(1.0)  # the login waits for b1's greeting
        p.proc.send_signal(signal.SIGTERM)
        got = raw.until(b"\r\n", timeout=15)
        assert got == b"* BYE Server shutting down.\r\n", got
        assert raw.sock.recv(100) == b""
        assert p.proc.wait(timeout=15) == 0, "exits without waiting for the frozen backend"
        p.wait_log("goodbye to a login in flight")
    finally:
        os.killpg(b1.proc.pid, signal.SIGCONT)


def test_without_checks_a_passive_down_recovers_by_itself_or_by_the_operator(
    start, own_cluster, certs
):
    """[health] enabled = false: real logins are the only evidence. A backend they took
    down lets one login through every 10 s (half-open) and comes back on its success;
    `postern backend up` forgets the DOWN at once."""
    from test_backends import until, which_backend

    def edit(c):
        c["health"] = {"enabled": False, "fall": 1, "rise": 1}

    p = start(edit)
    assert which_backend(p, ALICE, certs) == "b1"
    for attempt in range(2):
        own_cluster["b1"].kill()

        def down():
            try:
                which_backend(p, ALICE, certs)
            except Exception:  # noqa: BLE001 - the failing logins are the point
                pass
            return re.search(r"backend DOWN.*backend=\"?b1\b", p.log())

        until(down, "a failed login takes b1 down")
        own_cluster["b1"].start()
        if attempt == 0:
            # The operator says it is fixed: every instance forgets the DOWN at once.
            assert p.cli("backend", "up", "b1").returncode == 0
            p.wait_log("backend health reset by the operator", timeout=10)
            assert which_backend(p, ALICE, certs) == "b1"
            p.log_path.write_text("")  # start the next round's log afresh
        else:
            # Nobody says anything: a login gets through within a half-open period.
            until(lambda: which_backend(p, ALICE, certs) == "b1", "half-open recovery",
                  timeout=30)
            p.wait_log(r"backend UP.*backend=\"?b1\b")
