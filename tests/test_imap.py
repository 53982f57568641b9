"""IMAP through Postern, end to end: real Dovecot backends, real clients (imaplib,
curl, openssl s_client, raw sockets for byte-exact checks)."""

import base64
import imaplib
import socket
import subprocess
import time

import pytest

from conftest import USERS
from harness.net import free_port, read_all, read_until
from imap_client import Raw, SourceIMAP4, SourceIMAP4_SSL, backend_id

ALICE = "alice@example.test"
BOB = "bob@example.test"
CAROL = "carol@example.test"


def plain_b64(user, password, authzid=""):
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


# --- before TLS ------------------------------------------------------------------------


def test_greeting_advertises_starttls_and_logindisabled(postern):
    raw = Raw(postern.addr("imap"))
    assert raw.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert b" STARTTLS" in raw.greeting and b" LOGINDISABLED" in raw.greeting
    assert b"AUTH=" not in raw.greeting
    out = raw.cmd(b"a CAPABILITY\r\n", b"a")
    assert b"LOGINDISABLED" in out and b"AUTH=PLAIN" not in out


def test_plaintext_auth_refused_before_tls(postern, cluster):
    before = len(cluster["b1"].logins())
    m = imaplib.IMAP4(*postern.addr("imap"))
    with pytest.raises(imaplib.IMAP4.error, match=r"PRIVACYREQUIRED"):
        m.login(ALICE, USERS[ALICE])
    raw = Raw(postern.addr("imap"))
    out = raw.cmd(f"s AUTHENTICATE PLAIN {plain_b64(ALICE, USERS[ALICE])}\r\n".encode(), b"s")
    assert out.startswith(b"s NO [PRIVACYREQUIRED]")
    assert len(cluster["b1"].logins()) == before


def test_plaintext_login_where_the_listener_allows_it(postern):
    m = imaplib.IMAP4(*postern.addr("imap-plain"))
    assert "AUTH=PLAIN" in m.capabilities and "LOGINDISABLED" not in m.capabilities
    typ, _ = m.login(ALICE, USERS[ALICE])
    assert typ == "OK"
    assert m.select("INBOX")[0] == "OK"
    assert backend_id(m) == '("name" "postern-backend-b1")'
    m.logout()


# --- TLS logins ------------------------------------------------------------------------


def test_starttls_login_reaches_the_pinned_backend_with_the_client_address(
    postern, cluster, certs
):
    m = SourceIMAP4(*postern.addr("imap"), source="127.0.0.2")
    m.starttls(ssl_context=certs.client_context())
    assert "AUTH=PLAIN" in m.capabilities and "STARTTLS" not in m.capabilities
    typ, data = m.login("Alice", USERS[ALICE])  # default domain, any case
    assert typ == "OK"
    # The backend's own post-login capabilities reach the client.
    assert b"[CAPABILITY IMAP4rev1" in data[0] and b"IDLE" in data[0]
    assert backend_id(m) == '("name" "postern-backend-b1")'
    m.logout()
    # Dovecot saw the real client address (ID x-originating-ip), not Postern's.
    assert ALICE in cluster["b1"].wait_login(ALICE)
    log = cluster["b1"].wait_log("rip=127.0.0.2")
    assert "rip=127.0.0.2" in log


def test_imaps_login_lands_on_backend_2_for_bob(postern, cluster, certs):
    b1_before = cluster["b1"].logins().count(BOB)
    m = SourceIMAP4_SSL(*postern.addr("imaps"), ssl_context=certs.client_context())
    assert m.login("BOB@example.TEST", USERS[BOB])[0] == "OK"
    assert backend_id(m) == '("name" "postern-backend-b2")'
    m.logout()
    assert BOB in cluster["b2"].wait_login(BOB)
    assert cluster["b1"].logins().count(BOB) == b1_before


def test_curl_starttls_and_imaps(postern, certs):
    for url, extra in [
        ("imap://{}:{}/", ["--ssl-reqd"]),
        ("imaps://{}:{}/", []),
        # SASL-IR: curl sends AUTHENTICATE PLAIN with the initial response
        ("imaps://{}:{}/", ["--sasl-ir", "--login-options", "AUTH=PLAIN"]),
    ]:
        listener = "imap" if url.startswith("imap:") else "imaps"
        host, port = postern.addr(listener)
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--cacert", str(certs.ca), *extra,
             "-u", f"{BOB}:{USERS[BOB]}", url.format("localhost", port)],
            capture_output=True, text=True,
        )
        assert r.returncode == 0, (url, extra, r.stderr)
        assert "INBOX" in r.stdout, r.stdout


def test_openssl_s_client_starttls(postern, certs):
    host, port = postern.addr("imap")
    script = f"a LOGIN {ALICE} {USERS[ALICE]}\nb ID NIL\nc LOGOUT\n"
    r = subprocess.run(
        ["openssl", "s_client", "-starttls", "imap", "-connect", f"{host}:{port}",
         "-CAfile", str(certs.ca), "-verify_return_error", "-quiet", "-crlf"],
        input=script, capture_output=True, text=True, timeout=30,
    )
    assert "a OK [CAPABILITY" in r.stdout, r.stdout + r.stderr
    assert '"postern-backend-b1"' in r.stdout
    assert "c OK" in r.stdout


# --- login forms -----------------------------------------------------------------------


def test_login_with_synchronizing_and_non_synchronizing_literals(postern, certs):
    raw = Raw(postern.addr("imaps"), certs.client_context())
    user, pw = ALICE.encode(), USERS[ALICE].encode()
    raw.send(b"a LOGIN {%d}\r\n" % len(user))
    assert raw.until(b"\r\n").startswith(b"+ ")
    raw.send(user + b" {%d}\r\n" % len(pw))
    assert raw.until(b"\r\n").startswith(b"+ ")
    out = raw.cmd(pw + b"\r\n", b"a")
    assert out.startswith(b"a OK [CAPABILITY"), out
    raw.close()

    raw = Raw(postern.addr("imaps"), certs.client_context())
    out = raw.cmd(b"b LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n" % (len(user), user, len(pw), pw), b"b")
    assert out.startswith(b"b OK [CAPABILITY"), out
    raw.close()


def test_quoted_login_with_escapes_reaches_the_backend_intact(postern, certs):
    raw = Raw(postern.addr("imaps"), certs.client_context())
    out = raw.cmd(b'a LOGIN "bob@example.test" "bob-Secret-9Z"\r\n', b"a")
    assert out.startswith(b"a OK"), out
    # A quote in the password travels escaped; the backend gets the real bytes and
    # refuses them (wrong password), proving nothing broke out of its argument.
    raw = Raw(postern.addr("imaps"), certs.client_context())
    out = raw.cmd(b'a LOGIN "bob@example.test" "bob-\\"Secret\\\\-9Z"\r\n', b"a")
    assert out.startswith(b"a NO [AUTHENTICATIONFAILED]"), out


def test_authenticate_plain_with_sasl_ir_continuation_and_cancel(postern, certs):
    raw = Raw(postern.addr("imaps"), certs.client_context())
    out = raw.cmd(b"a AUTHENTICATE PLAIN =\r\n", b"a")
    assert out.startswith(b"a NO [AUTHENTICATIONFAILED]")
    raw.send(b"b AUTHENTICATE PLAIN\r\n")
    assert raw.until(b"\r\n") == b"+ \r\n"
    assert raw.cmd(b"*\r\n", b"b") == b"b BAD Authentication cancelled.\r\n"
    out = raw.cmd(f"c AUTHENTICATE PLAIN {plain_b64(BOB, USERS[BOB])}\r\n".encode(), b"c")
    assert out.startswith(b"c OK [CAPABILITY"), out
    raw.close()

    # imaplib's AUTHENTICATE waits for the continuation (no SASL-IR)
    m = SourceIMAP4_SSL(*postern.addr("imaps"), ssl_context=certs.client_context())
    typ, _ = m.authenticate("PLAIN", lambda _: f"\0{ALICE}\0{USERS[ALICE]}".encode())
    assert typ == "OK"
    assert backend_id(m) == '("name" "postern-backend-b1")'
    m.logout()


def test_authenticate_login_mechanism(postern, certs):
    raw = Raw(postern.addr("imaps"), certs.client_context())
    raw.send(b"a AUTHENTICATE LOGIN\r\n")
    assert raw.until(b"\r\n") == b"+ VXNlcm5hbWU6\r\n"
    raw.send(base64.b64encode(BOB.encode()) + b"\r\n")
    assert raw.until(b"\r\n") == b"+ UGFzc3dvcmQ6\r\n"
    out = raw.cmd(base64.b64encode(USERS[BOB].encode()) + b"\r\n", b"a")
    assert out.startswith(b"a OK"), out


# --- refusals --------------------------------------------------------------------------


def test_wrong_password_is_refused_and_the_client_may_retry(postern, certs):
    m = SourceIMAP4_SSL(*postern.addr("imaps"), ssl_context=certs.client_context())
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        m.login(ALICE, "wrong-password")
    assert m.login(ALICE, USERS[ALICE])[0] == "OK"
    m.logout()


def test_too_many_failures_close_the_connection(postern, certs):
    raw = Raw(postern.addr("imaps"), certs.client_context())
    for tag in (b"a", b"b"):
        assert raw.cmd(tag + b" LOGIN alice nope\r\n", tag).startswith(tag + b" NO")
    out = raw.cmd(b"c LOGIN alice nope\r\n", b"c") + read_all(raw.sock)
    assert b"c NO" in out and out.endswith(b"* BYE Too many authentication failures.\r\n")


def test_user_without_pin_rejected_or_hashed(make_postern, certs):
    p = make_postern()
    m = SourceIMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        m.login(CAROL, USERS[CAROL])

    def hashed(c):
        c["routing"]["unknown_users"] = "hash"

    p = make_postern(hashed)
    route = p.cli("route", "CAROL")
    assert route.returncode == 0, route.stderr
    want = "b1" if "backend: b1 " in route.stdout else "b2"
    for spelling in ("carol", "Carol@Example.Test"):
        m = SourceIMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
        assert m.login(spelling, USERS[CAROL])[0] == "OK"
        assert backend_id(m) == f'("name" "postern-backend-{want}")'
        m.logout()


def test_unreachable_backend_is_a_temporary_failure(make_postern, certs):
    dead = free_port()

    def dead_b1(c):
        c["backends"]["b1"]["imap"]["port"] = dead

    p = make_postern(dead_b1)
    raw = Raw(p.addr("imaps"), certs.client_context())
    out = raw.cmd(f"a LOGIN {ALICE} {USERS[ALICE]}\r\n".encode(), b"a")
    assert out.startswith(b"a NO [UNAVAILABLE]"), out
    # bob's backend is fine
    out = raw.cmd(f"b LOGIN {BOB} {USERS[BOB]}\r\n".encode(), b"b")
    assert out.startswith(b"b OK"), out
    p.wait_log("backend connect failed")


# --- hostile input ---------------------------------------------------------------------


def test_starttls_injection_is_discarded(postern, cluster, certs):
    before = len(cluster["b2"].logins())
    raw = Raw(postern.addr("imap"))
    injected = f"b LOGIN {BOB} {USERS[BOB]}\r\n".encode()
    raw.send(b"a STARTTLS\r\n" + injected)
    assert raw.until(b"\r\n") == b"a OK Begin TLS negotiation now.\r\n"
    raw.starttls(certs.client_context())
    out = raw.cmd(b"c NOOP\r\n", b"c")
    assert out == b"c OK NOOP completed.\r\n", out
    assert len(cluster["b2"].logins()) == before
    postern.wait_log("discarded plaintext pipelined after STARTTLS")


def test_overlong_line_is_refused_and_closed(postern):
    raw = Raw(postern.addr("imap"))
    raw.send(b"a1 NOOP " + b"x" * 40_000)
    out = read_all(raw.sock)
    assert out == b"a1 BAD Command line too long.\r\n* BYE Input too long, closing connection.\r\n"


def test_huge_literal_is_refused_without_continuation(postern, certs):
    raw = Raw(postern.addr("imaps"), certs.client_context())
    out = raw.cmd(b"a LOGIN {9223372036854775808}\r\n", b"a")
    assert out == b"a BAD [TOOBIG] Literal too large.\r\n"
    raw.send(b"b LOGIN {100000000+}\r\n")
    out = read_all(raw.sock)
    assert out.endswith(b"* BYE Literal too large, closing connection.\r\n")


def test_pipelined_commands_are_answered_in_order(postern):
    raw = Raw(postern.addr("imap"))
    raw.send(b"a CAPABILITY\r\nb NOOP\r\nc ID (\"name\" \"pytest\")\r\nd LOGOUT\r\n")
    out = read_all(raw.sock)
    tags = [line.split(b" ")[0] for line in out.split(b"\r\n") if line and not line.startswith(b"*")]
    assert tags == [b"a", b"b", b"c", b"d"], out


def test_commands_pipelined_after_login_reach_the_backend(postern, certs):
    raw = Raw(postern.addr("imaps"), certs.client_context())
    raw.send(
        f"a LOGIN {ALICE} {USERS[ALICE]}\r\nb SELECT INBOX\r\nc LOGOUT\r\n".encode()
    )
    out = read_all(raw.sock)
    lines = out.split(b"\r\n")
    tagged = [l.split(b" ")[:2] for l in lines if l[:2] in (b"a ", b"b ", b"c ")]
    assert tagged == [[b"a", b"OK"], [b"b", b"OK"], [b"c", b"OK"]], out


def test_silent_client_is_closed_by_the_preauth_timeout(make_postern):
    def short(c):
        c["timeouts"] = {"preauth": "1s"}

    p = make_postern(short)
    raw = Raw(p.addr("imap"))
    start = time.monotonic()
    # Dovecot's goodbye for it, then the close.
    assert read_all(raw.sock, timeout=30) == b"* BYE Disconnected for inactivity.\r\n"
    assert time.monotonic() - start < 20
    p.wait_log("preauth_timeout")


# --- the session after login -----------------------------------------------------------


def test_large_message_round_trips_byte_identical(postern, certs):
    body = bytes((i * 7 + 13) % 94 + 32 for i in range(2 * 1024 * 1024 - 2))
    lines = [body[i : i + 998] for i in range(0, len(body), 998)]
    message = b"Subject: big\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    m = SourceIMAP4_SSL(*postern.addr("imaps"), ssl_context=certs.client_context())
    m.login(BOB, USERS[BOB])
    m.create("Big")
    assert m.append("Big", None, None, message)[0] == "OK"
    m.select("Big")
    typ, data = m.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK"
    assert data[0][1] == message
    m.delete("Big")
    m.logout()


def test_idle_session_receives_updates_through_the_relay(postern, certs):
    ctx = certs.client_context()
    idler = Raw(postern.addr("imaps"), ctx)
    assert idler.cmd(f"a LOGIN {ALICE} {USERS[ALICE]}\r\n".encode(), b"a").startswith(b"a OK")
    idler.cmd(b"b SELECT INBOX\r\n", b"b")
    idler.send(b"c IDLE\r\n")
    assert idler.until(b"\r\n").startswith(b"+ ")
    writer = SourceIMAP4_SSL(*postern.addr("imaps"), ssl_context=ctx)
    writer.login(ALICE, USERS[ALICE])
    writer.append("INBOX", None, None, b"Subject: ping\r\n\r\nhello\r\n")
    writer.logout()
    assert b"EXISTS" in idler.until(b"EXISTS\r\n")
    assert b"c OK Idle completed" in idler.cmd(b"DONE\r\n", b"c")


def test_secrets_never_reach_the_log(postern, certs):
    ctx = certs.client_context()
    for user in (ALICE, BOB):
        m = SourceIMAP4_SSL(*postern.addr("imaps"), ssl_context=ctx)
        try:
            m.login(user, USERS[user] + "-wrong")
        except imaplib.IMAP4.error:
            pass
        m.login(user, USERS[user])
        m.logout()
    raw = Raw(postern.addr("imaps"), ctx)
    raw.cmd(f"a AUTHENTICATE PLAIN {plain_b64(CAROL, USERS[CAROL])}\r\n".encode(), b"a")
    postern.stop()
    log = postern.log()
    assert "login accepted" in log
    for secret in list(USERS.values()) + [plain_b64(CAROL, USERS[CAROL])]:
        assert secret not in log


# --- the command line ------------------------------------------------------------------


def test_check_and_route_commands(make_postern):
    p = make_postern(start=False)
    r = p.cli("check")
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and "b1" in r.stdout
    r = p.cli("route", " ALICE ")
    assert r.returncode == 0
    assert "alice@example.test" in r.stdout and "backend: b1 (pinned by Postern's routes table (sqlite store))" in r.stdout
    r = p.cli("route", "nobody")
    assert r.returncode == 2 and "none" in r.stdout

    p.config["routing"]["sql"]["ulr"] = "x"
    r = p.cli("check")
    assert r.returncode != 0
    assert "routing.sql" in r.stderr and "ulr" in r.stderr


def test_check_reports_a_bad_certificate(make_postern, workdir):
    bogus = workdir / "bogus.pem"
    bogus.write_text("not a certificate\n")

    def bad(c):
        c["tls"]["cert"] = str(bogus)

    p = make_postern(bad, seed=False, start=False)
    r = p.cli("check")
    assert r.returncode != 0
    assert "bogus.pem" in r.stderr
