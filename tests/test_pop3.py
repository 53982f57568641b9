"""POP3 through Postern, end to end: real Dovecot backends, real clients (poplib, curl,
raw sockets for byte-exact checks)."""

import base64
import hashlib
import poplib
import smtplib
import socket
import subprocess

import pytest

from conftest import USERS
from harness.net import free_port, read_all, read_until

ALICE, BOB = "alice@example.test", "bob@example.test"


class SourcePOP3(poplib.POP3):
    """poplib.POP3 from a chosen loopback address, to tell the client from Postern."""

    def __init__(self, host, port, source="127.0.0.1"):
        self.source = source
        super().__init__(host, port, timeout=20)

    def _create_socket(self, timeout):
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )


def raw(addr, ctx=None):
    sock = socket.create_connection(addr, timeout=20)
    if ctx is not None:
        sock = ctx.wrap_socket(sock, server_hostname="localhost")
    greeting = read_until(sock, b"\r\n")
    assert greeting.startswith(b"+OK"), greeting
    return sock


def ask(sock, line: bytes, until: bytes = b"\r\n") -> bytes:
    sock.sendall(line)
    return read_until(sock, until)


def pop3s(p, certs):
    return poplib.POP3_SSL(*p.addr("pop3s"), context=certs.client_context(), timeout=20)


def deliver(backend, rcpt: str, message: bytes) -> None:
    """Delivers through one Dovecot's LMTP, bypassing Postern: the shared store makes
    the message visible to every backend."""
    with smtplib.LMTP("127.0.0.1", backend.lmtp_port, timeout=30) as lmtp:
        lmtp.sendmail("sender@example.org", [rcpt], message)


def test_capa_before_and_after_stls(postern, certs):
    sock = raw(postern.addr("pop3"))
    capa = ask(sock, b"CAPA\r\n", b"\r\n.\r\n")
    assert b"STLS\r\n" in capa and b"USER\r\n" not in capa and b"SASL" not in capa
    assert b"PIPELINING" in capa and b"RESP-CODES" in capa
    out = ask(sock, b"USER alice\r\n")
    assert out.startswith(b"-ERR [AUTH]"), out
    m = SourcePOP3(*postern.addr("pop3"))
    m.stls(context=certs.client_context())
    caps = m.capa()
    assert "USER" in caps and caps.get("SASL") == ["PLAIN", "LOGIN"] and "STLS" not in caps


def test_user_pass_after_stls_reaches_the_pinned_backend(postern, cluster, certs):
    m = SourcePOP3(*postern.addr("pop3"), source="127.0.0.2")
    m.stls(context=certs.client_context())
    m.user("Alice")
    assert m.pass_(USERS[ALICE]).startswith(b"+OK")
    assert m.stat()[0] >= 0
    m.quit()
    log = cluster["b1"].wait_log("rip=127.0.0.2")
    assert f"pop3-login: Info: Login: user=<{ALICE}>" in log
    assert "rip=127.0.0.2" in log  # XCLIENT carried the client's address


def test_pop3s_lands_on_backend_2(postern, cluster, certs):
    m = pop3s(postern, certs)
    m.user(BOB)
    m.pass_(USERS[BOB])
    m.quit()
    assert BOB in cluster["b2"].wait_login(BOB)


def test_wrong_password(postern, certs):
    m = pop3s(postern, certs)
    m.user(ALICE)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        m.pass_("wrong")


def test_auth_plain_with_initial_response_and_the_edge_cases(postern, certs):
    sock = raw(postern.addr("pop3s"), certs.client_context())
    assert ask(sock, b"AUTH PLAIN =\r\n").startswith(b"-ERR [AUTH]")
    assert ask(sock, b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert ask(sock, b"*\r\n").startswith(b"-ERR")
    ir = base64.b64encode(f"\0{BOB}\0{USERS[BOB]}".encode())
    out = ask(sock, b"AUTH PLAIN " + ir + b"\r\n")
    assert out.startswith(b"+OK"), out
    assert ask(sock, b"STAT\r\n").startswith(b"+OK")


def test_auth_login(postern, certs):
    sock = raw(postern.addr("pop3s"), certs.client_context())
    assert ask(sock, b"AUTH LOGIN\r\n") == b"+ VXNlcm5hbWU6\r\n"
    assert ask(sock, base64.b64encode(ALICE.encode()) + b"\r\n") == b"+ UGFzc3dvcmQ6\r\n"
    out = ask(sock, base64.b64encode(USERS[ALICE].encode()) + b"\r\n")
    assert out.startswith(b"+OK"), out


def test_long_password_and_long_sasl_response(postern, certs):
    for user in ("longpw@example.test", "longerpw@example.test"):
        assert postern.cli("route", "pin", user, "b2").returncode == 0
    m = pop3s(postern, certs)
    m.user("longpw@example.test")
    assert m.pass_(USERS["longpw@example.test"]).startswith(b"+OK")  # 2 KiB
    m.quit()
    sock = raw(postern.addr("pop3s"), certs.client_context())
    ir = base64.b64encode(b"\0longerpw@example.test\0" + USERS["longerpw@example.test"].encode())
    assert len(ir) > 6000
    out = ask(sock, b"AUTH PLAIN " + ir + b"\r\n")
    assert out.startswith(b"+OK"), out


def test_apop_where_configured(make_postern, certs, workdir):
    def edit(c):
        c["pop3"] = {"apop": True}
        c["routing"]["sql"]["lookup_query"] = (
            "SELECT backend, password FROM apop_users WHERE username = ?"
        )

    p = make_postern(edit, start=False)
    sql = workdir / "apop.sql"
    sql.write_text(
        "CREATE TABLE apop_users (username TEXT PRIMARY KEY, backend TEXT, password TEXT);"
        f"INSERT INTO apop_users VALUES ('{BOB}', 'b2', '{{PLAIN}}{USERS[BOB]}');"
        f"INSERT INTO apop_users VALUES ('{ALICE}', 'b1', '{{SHA512-CRYPT}}$6$nope');"
    )
    assert p.cli("db", "seed", str(sql)).returncode == 0
    p.start()
    m = SourcePOP3(*p.addr("pop3"))
    assert b"<" in m.getwelcome() and b"@" in m.getwelcome()
    assert m.apop(BOB, USERS[BOB]).startswith(b"+OK")  # before TLS: no password sent
    m.quit()
    m = SourcePOP3(*p.addr("pop3"))
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        m.apop(BOB, "wrong")
    # A hashed password cannot check an APOP digest: refused, and said why in the log.
    m = SourcePOP3(*p.addr("pop3"))
    with pytest.raises(poplib.error_proto):
        m.apop(ALICE, USERS[ALICE])
    p.wait_log("the stored password is not plaintext")


def test_apop_not_offered_by_default(postern):
    sock = raw(postern.addr("pop3"))
    assert ask(sock, b"APOP bob 0123456789abcdef0123456789abcdef\r\n").startswith(b"-ERR")


def test_pipelined_commands_are_answered_in_order(postern):
    sock = raw(postern.addr("pop3"))
    sock.sendall(b"NOOP\r\nCAPA\r\nAUTH\r\nBOGUS\r\nQUIT\r\n")
    out = read_all(sock)
    assert out.startswith(b"+OK\r\n+OK Capability list follows\r\n")
    assert out.endswith(b".\r\n+OK Methods supported:\r\n.\r\n-ERR Unknown command.\r\n+OK Logging out.\r\n")


def test_stls_injection_is_discarded(postern, cluster, certs):
    before = len(cluster["b2"].logins())
    sock = raw(postern.addr("pop3"))
    sock.sendall(b"STLS\r\nUSER " + BOB.encode() + b"\r\nPASS " + USERS[BOB].encode() + b"\r\n")
    assert read_until(sock, b"\r\n") == b"+OK Begin TLS negotiation\r\n"
    sock = certs.client_context().wrap_socket(sock, server_hostname="localhost")
    assert ask(sock, b"NOOP\r\n") == b"+OK\r\n"
    assert ask(sock, b"STAT\r\n").startswith(b"-ERR")  # not logged in: nothing ran
    assert len(cluster["b2"].logins()) == before
    postern.wait_log("discarded plaintext pipelined after STLS")


def test_retr_of_a_big_message_delivered_through_the_other_backend(postern, cluster, certs):
    marker = hashlib.sha256(b"big-pop3").hexdigest()
    body = b"\r\n".join(
        (b"line %06d " % i) + (b"." if i % 7 == 0 else b"") + b"x" * 60 for i in range(50_000)
    )
    message = f"Subject: {marker}\r\nMessage-ID: <{marker}@test>\r\n\r\n".encode() + body + b"\r\n"
    assert len(message) > 3_000_000
    # alice is pinned to b1; the message goes in through b2's LMTP, into the shared store.
    deliver(cluster["b2"], ALICE, message)
    m = pop3s(postern, certs)
    m.user(ALICE)
    m.pass_(USERS[ALICE])
    count, _ = m.stat()
    found = None
    for n in range(count, 0, -1):
        _, lines, _ = m.top(n, 0)
        if any(marker.encode() in line for line in lines):
            found = n
            break
    assert found, "the delivered message is not in the mailbox"
    _, lines, _ = m.retr(found)
    retrieved = b"\r\n".join(lines) + b"\r\n"
    # Dovecot prepends Return-Path and Delivered-To; the rest is byte-identical.
    assert retrieved.endswith(message)
    m.dele(found)
    m.quit()


def test_curl_pop3_with_stls_and_pop3s(postern, cluster, certs):
    deliver(cluster["b1"], BOB, b"Subject: for curl\r\n\r\nhello curl\r\n")
    for scheme, listener, extra in (("pop3", "pop3", ["--ssl-reqd"]), ("pop3s", "pop3s", [])):
        _, port = postern.addr(listener)
        listing = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--cacert", str(certs.ca), *extra,
             "-u", f"{BOB}:{USERS[BOB]}", f"{scheme}://localhost:{port}/"],
            capture_output=True, text=True,
        )
        assert listing.returncode == 0, listing.stderr
        first = listing.stdout.split()[0]
        msg = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--cacert", str(certs.ca), *extra,
             "-u", f"{BOB}:{USERS[BOB]}", f"{scheme}://localhost:{port}/{first}"],
            capture_output=True, text=True,
        )
        assert msg.returncode == 0, msg.stderr
        assert "Subject:" in msg.stdout


def test_unreachable_backend_is_a_temporary_failure(make_postern, certs):
    dead = free_port()

    def edit(c):
        c["backends"]["b1"]["pop3"]["port"] = dead

    p = make_postern(edit)
    m = pop3s(p, certs)
    m.user(ALICE)
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        m.pass_(USERS[ALICE])


def test_pop3_secrets_never_reach_the_log(postern, certs):
    m = pop3s(postern, certs)
    m.user(ALICE)
    try:
        m.pass_(USERS[ALICE] + "-wrong")
    except poplib.error_proto:
        pass
    m = pop3s(postern, certs)
    m.user(ALICE)
    m.pass_(USERS[ALICE])
    m.quit()
    postern.stop()
    log = postern.log()
    assert "login accepted" in log
    assert USERS[ALICE] not in log
