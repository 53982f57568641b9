"""Hostile input against a real Postern process in front of real Dovecot and Postfix:
overlong and endless lines, huge IMAP literals, NUL bytes and invalid UTF-8, bad base64,
pipelining floods, STARTTLS command injection, PROXY headers from untrusted peers,
silent and dripping clients, thousands of idle connections.

Each test checks four things: the exact reply the protocol's front end gives (the texts
are those of crates/postern-{imap,pop3,smtp}/src/front.rs and the SMTP relay), the log
line that records the refusal (matched to the very connection by its client address and
port), that Postern neither crashed, panicked nor hung, and that it still serves a
normal login afterwards. Raw sockets throughout, for byte-exact checks.

Measured numbers (memory per idle connection, memory growth under an endless line) are
printed; run with `-s` (or look at the captured output) to copy them into the docs.
"""

import base64
import resource
import socket
import struct
import threading
import time

import pytest

from conftest import USERS
from harness.hostile import (
    Conn,
    Reader,
    assert_alive,
    fd_count,
    rss_kib,
    session_lines,
    stream,
    wait_session_log,
)
from harness.postern import Postern, smtp_config

ALICE, BOB = "alice@example.test", "bob@example.test"
HOST = "postern.example.test"  # server.hostname in smtp_config
MiB = 1024 * 1024


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# --- replies, copied from the front ends -----------------------------------------------

IMAP_TOO_LONG = b"%s BAD Command line too long.\r\n* BYE Input too long, closing connection.\r\n"
IMAP_TOOBIG = b"%s BAD [TOOBIG] Literal too large.\r\n"
IMAP_TOOBIG_BYE = b"* BYE Literal too large, closing connection.\r\n"
IMAP_SYNTAX = b"%s BAD Error in IMAP command: unknown command or bad syntax.\r\n"
IMAP_AUTH_FAILED = b"%s NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
IMAP_CANCELLED = b"%s BAD Authentication cancelled.\r\n"
IMAP_BAD_B64 = b"%s BAD Invalid base64 data in SASL response.\r\n"
IMAP_NOOP = b"%s OK NOOP completed.\r\n"
IMAP_STARTTLS = b"%s OK Begin TLS negotiation now.\r\n"
IMAP_TOO_MANY_COMMANDS = b"* BYE Too many commands before login.\r\n"
IMAP_TOO_MANY_BAD = b"* BYE Too many invalid commands.\r\n"

POP3_TOO_LONG = b"-ERR Line too long, closing connection.\r\n"
POP3_TOO_MANY_COMMANDS = b"-ERR Too many commands before login, closing connection.\r\n"
POP3_UNKNOWN = b"-ERR Unknown command.\r\n"
POP3_TOO_MANY_BAD = b"-ERR Too many invalid commands, closing connection.\r\n"
POP3_BAD_USER = b"-ERR Invalid user name.\r\n"
POP3_BAD_B64 = b"-ERR Invalid base64 data.\r\n"
POP3_CANCELLED = b"-ERR Authentication cancelled.\r\n"
POP3_AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
POP3_STLS = b"+OK Begin TLS negotiation\r\n"
POP3_NO_USER = b"-ERR No user name given, send USER first.\r\n"
POP3_CAPA_PLAIN = (
    b"+OK Capability list follows\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nSTLS\r\n.\r\n"
)

SMTP_TOO_LONG = b"500 5.5.0 Error: line too long\r\n"
SMTP_UNKNOWN = b"500 5.5.2 Error: command not recognized\r\n"
SMTP_BAD_CHARS = b"500 5.5.2 Error: invalid characters in command\r\n"
SMTP_TOO_MANY_ERRORS = b"421 4.7.0 %s Error: too many errors\r\n" % HOST.encode()
SMTP_TOO_MANY_COMMANDS = (
    b"421 4.7.0 %s Error: too many commands before authentication\r\n" % HOST.encode()
)
SMTP_TIMEOUT = b"421 4.4.2 %s Error: timeout exceeded\r\n" % HOST.encode()
SMTP_ABORTED = b"501 5.7.0 Authentication aborted\r\n"
SMTP_BAD_B64 = b"501 5.5.2 Cannot decode response\r\n"
SMTP_AUTH_FAILED = b"535 5.7.8 Authentication credentials invalid\r\n"
SMTP_NEED_AUTH = b"530 5.7.0 Authentication required\r\n"
SMTP_NEED_TLS = b"530 5.7.0 Must issue a STARTTLS command first\r\n"
SMTP_STARTTLS = b"220 2.0.0 Ready to start TLS\r\n"
SMTP_EHLO_SYNTAX = b"501 5.5.4 Syntax: EHLO hostname\r\n"
SMTP_SYNTAX = b"501 5.5.4 Syntax error in parameters or arguments\r\n"
SMTP_EHLO_FIRST = b"503 5.5.1 Error: send EHLO first\r\n"
SMTP_OK = b"250 2.0.0 Ok\r\n"
SMTP_HELP = b"214 2.0.0 Commands: EHLO HELO STARTTLS AUTH NOOP RSET QUIT\r\n"
RELAY_HELP = b"214 2.0.0 See RFC 5321\r\n"
RELAY_VRFY = b"252 2.0.0 Cannot VRFY user; try RCPT\r\n"
RELAY_NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
RELAY_NEED_HELO = b"503 5.5.1 Error: send HELO/EHLO first\r\n"
RELAY_NEED_LHLO = b"503 5.5.1 Error: send LHLO first\r\n"
RELAY_USE_LHLO = b"500 5.5.1 Error: use LHLO in LMTP\r\n"
RELAY_NO_AUTH = b"503 5.5.1 Error: authentication not enabled\r\n"

GREETING = {
    "imap": b"* OK [CAPABILITY ",
    "pop3": b"+OK ",
    "submission": b"220 %s ESMTP " % HOST.encode(),
    "smtp": b"220 %s ESMTP " % HOST.encode(),
    "lmtp": b"220 %s LMTP " % HOST.encode(),
}
# listener -> protocol, for the listeners of `start` below
PROTO = {
    "imap": "imap",
    "imap-plain": "imap",
    "imaps": "imap",
    "pop3": "pop3",
    "pop3-plain": "pop3",
    "pop3s": "pop3",
    "submission": "submission",
    "submission-plain": "submission",
    "submissions": "submission",
    "mx": "smtp",
    "lmtp": "lmtp",
}


# --- Postern for these tests -----------------------------------------------------------


@pytest.fixture
def start(cluster, postfixes, certs, workdir):
    """Starts a Postern with every protocol: `smtp_config` (IMAP and POP3 with STARTTLS
    and implicit TLS, a plaintext IMAP listener that allows logins, submission with
    STARTTLS and implicit TLS, MX, LMTP) plus plaintext POP3 and submission listeners
    that allow logins, so hostile credentials reach the parsers without a TLS layer."""
    started = []

    def make(edit=None) -> Postern:
        config = smtp_config(cluster, postfixes, certs, workdir)
        config["health"] = {"interval": "500ms"}
        config["listeners"] += [
            {"name": "pop3-plain", "protocol": "pop3", "bind": "127.0.0.1:0",
             "tls": "none", "insecure_plaintext_auth": True},
            {"name": "submission-plain", "protocol": "submission", "bind": "127.0.0.1:0",
             "tls": "none", "insecure_plaintext_auth": True},
        ]
        if edit:
            edit(config)
        p = Postern(workdir / f"postern{len(started)}", config)
        started.append(p)
        p.seed()
        p.start()
        # The health checks learn the SMTP backends' EHLO (what submission advertises).
        time.sleep(1.2)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture
def px(start):
    return start()


# --- normal logins: the "still serving" checks -----------------------------------------


def smtp_reply(c: Conn) -> bytes:
    """One complete (possibly multi-line) SMTP reply."""
    out = b""
    while True:
        line = c.line()
        out += line
        if line[3:4] != b"-":
            return out


def ehlo(c: Conn, name: bytes = b"client.example") -> bytes:
    c.send(b"EHLO " + name + b"\r\n")
    reply = smtp_reply(c)
    assert reply.startswith(b"250"), reply
    return reply


def plain(user: str, password: str) -> bytes:
    return b64(f"\0{user}\0{password}".encode())


def login_works(p: Postern, certs, proto: str) -> None:
    """A normal client logs in (or, for MX and LMTP, gets a recipient accepted by the
    backend) through Postern, on a new connection."""
    ctx = certs.client_context()
    if proto == "imap":
        with Conn(p.addr("imaps"), tls=ctx) as c:
            assert c.greeting.startswith(GREETING["imap"]), c.greeting
            out = c.imap(f"a LOGIN {ALICE} {USERS[ALICE]}\r\n".encode(), b"a")
            assert out.startswith(b"a OK [CAPABILITY"), out
            assert b"z OK" in c.imap(b"z LOGOUT\r\n", b"z")
    elif proto == "pop3":
        with Conn(p.addr("pop3s"), tls=ctx) as c:
            assert c.greeting.startswith(b"+OK"), c.greeting
            assert c.ask(f"USER {ALICE}\r\n".encode()) == b"+OK\r\n"
            out = c.ask(f"PASS {USERS[ALICE]}\r\n".encode())
            assert out.startswith(b"+OK"), out
            assert c.ask(b"QUIT\r\n").startswith(b"+OK")
    elif proto == "submission":
        with Conn(p.addr("submissions"), tls=ctx) as c:
            assert c.greeting.startswith(GREETING["submission"]), c.greeting
            ehlo(c)
            out = c.ask(b"AUTH PLAIN " + plain(ALICE, USERS[ALICE]) + b"\r\n")
            assert out.startswith(b"235"), out
            assert c.ask(b"QUIT\r\n").startswith(b"221")
    elif proto in ("smtp", "lmtp"):
        with Conn(p.addr("mx" if proto == "smtp" else "lmtp")) as c:
            assert c.greeting.startswith(GREETING[proto]), c.greeting
            c.send(b"LHLO client.example\r\n" if proto == "lmtp" else b"EHLO client.example\r\n")
            assert smtp_reply(c).startswith(b"250")
            assert c.ask(b"MAIL FROM:<sender@example.org>\r\n").startswith(b"250")
            out = c.ask(f"RCPT TO:<{ALICE}>\r\n".encode(), timeout=30)
            assert out.startswith(b"250"), out  # the backend's own answer
            assert c.ask(b"QUIT\r\n").startswith(b"221")
    else:
        raise ValueError(proto)


def assert_serving(p: Postern, certs, *protos: str) -> None:
    assert_alive(p)
    for proto in protos:
        login_works(p, certs, proto)
    assert_alive(p)


def ended(proto: str) -> str:
    """The log line a session ends with: the generic driver says 'before login'."""
    if proto in ("smtp", "lmtp"):
        return r"session ended reason="
    return r"session ended before login reason="


# =======================================================================================
# 1. Overlong lines: refused, then the connection closes (the rest of the line could be
#    read as commands, so there is no resynchronizing).
# =======================================================================================

OVERLONG = {
    # id: (listener, bytes sent after the greeting, exact answer)
    "imap-line": ("imap", b"a1 NOOP " + b"x" * 40_000 + b"\r\n", IMAP_TOO_LONG % b"a1"),
    "imap-no-eol": ("imap", b"a1 NOOP " + b"x" * 40_000, IMAP_TOO_LONG % b"a1"),
    "imap-sasl-response": (
        "imap-plain",
        b"s AUTHENTICATE PLAIN\r\n" + b"A" * 40_000 + b"\r\n",
        b"+ \r\n" + IMAP_TOO_LONG % b"*",
    ),
    "pop3-line": ("pop3", b"NOOP " + b"x" * 40_000 + b"\r\n", POP3_TOO_LONG),
    "pop3-sasl-response": (
        "pop3-plain",
        b"AUTH PLAIN\r\n" + b"A" * 40_000 + b"\r\n",
        b"+ \r\n" + POP3_TOO_LONG,
    ),
    "submission-line": ("submission", b"NOOP " + b"x" * 5_000 + b"\r\n", SMTP_TOO_LONG),
    "submission-auth-line": (
        "submission-plain",
        b"AUTH PLAIN " + b"A" * 20_000 + b"\r\n",
        SMTP_TOO_LONG,
    ),
    "submission-sasl-response": (
        "submission-plain",
        b"EHLO x\r\nAUTH LOGIN\r\n" + b"A" * 20_000 + b"\r\n",
        None,  # the EHLO reply comes first; checked below
    ),
    "mx-line": ("mx", b"NOOP " + b"x" * 5_000 + b"\r\n", SMTP_TOO_LONG),
    "lmtp-line": ("lmtp", b"NOOP " + b"x" * 5_000 + b"\r\n", SMTP_TOO_LONG),
}


@pytest.mark.parametrize("case", list(OVERLONG))
def test_overlong_line_is_refused_and_closed(px, certs, case):
    listener, data, want = OVERLONG[case]
    proto = PROTO[listener]
    with Conn(px.addr(listener)) as c:
        assert c.greeting.startswith(GREETING[proto])
        c.try_send(data)
        got = c.rest(timeout=10)
        if want is None:  # submission-sasl-response
            assert got.startswith(b"250-"), got
            assert got.endswith(b"334 VXNlcm5hbWU6\r\n" + SMTP_TOO_LONG), got
        else:
            assert got == want, got
        wait_session_log(px, c, r'client input rejected reason="line too long"')
        wait_session_log(px, c, ended(proto) + r'"input_too_long"')
    assert_serving(px, certs, proto)


def test_line_limits_are_exact_as_configured(start, certs):
    """max_line_length counts the CRLF: a line of exactly the limit is a command, one
    byte more closes the connection (docs/config.md). IMAP's ID alone has RFC 2971's
    bound, 64 KiB, whatever max_line_length says."""

    def edit(c):
        for section in ("imap", "pop3", "submission", "smtp"):
            c[section] = {"max_line_length": 1024}
        c["imap"]["max_literal_size"] = 512

    p = start(edit)

    def pad(prefix: bytes, suffix: bytes, total: int) -> bytes:
        return prefix + b"x" * (total - len(prefix) - len(suffix)) + suffix

    cases = [
        # listener, line builder, answer when it fits, answer when one byte too long, limit
        ("imap", lambda n: pad(b"a FOO ", b"\r\n", n), IMAP_SYNTAX % b"a",
         IMAP_TOO_LONG % b"a", 1024),
        ("imap", lambda n: pad(b'a ID ("name" "', b'")\r\n', n),
         b"* ID NIL\r\na OK ID completed.\r\n", IMAP_TOO_LONG % b"a", 65536),
        ("pop3-plain", lambda n: pad(b"USER ", b"\r\n", n), b"+OK\r\n", POP3_TOO_LONG, 1024),
        ("submission", lambda n: pad(b"NOOP ", b"\r\n", n), SMTP_OK, SMTP_TOO_LONG, 1024),
        ("mx", lambda n: pad(b"NOOP ", b"\r\n", n), SMTP_OK, SMTP_TOO_LONG, 1024),
    ]
    for listener, line, fits, too_long, limit in cases:
        with Conn(p.addr(listener)) as c:
            assert len(line(limit)) == limit
            c.send(line(limit))
            assert c.until(fits[-20:]) == fits, listener
            c.send(line(limit + 1))
            assert c.rest(timeout=10) == too_long, listener
            wait_session_log(p, c, r'client input rejected reason="line too long"')
    assert_serving(p, certs, "imap", "pop3", "submission", "smtp")


# =======================================================================================
# 2. IMAP literals of absurd sizes: no continuation, no allocation, checked arithmetic.
# =======================================================================================

HUGE = [
    b"9223372036854775807",  # i64::MAX
    b"9223372036854775808",  # 2^63
    b"18446744073709551615",  # u64::MAX
    b"18446744073709551616",  # 2^64
    b"99999999999999999999999999999999999999999",
    b"8193",  # max_literal_size + 1
]


@pytest.mark.parametrize("size", HUGE, ids=lambda s: s.decode()[:24])
def test_huge_synchronizing_literal_gets_toobig_and_the_session_goes_on(px, certs, size):
    pid = px.proc.pid
    before = rss_kib(pid)
    with Conn(px.addr("imap-plain")) as c:
        c.send(b"a LOGIN {%s}\r\n" % size)
        # No "+ OK" continuation: the client must not send the data.
        assert c.line() == IMAP_TOOBIG % b"a"
        assert c.quiet(0.3) == b""
        # The session goes on, and a login on the same connection works.
        assert c.imap(b"b NOOP\r\n", b"b") == IMAP_NOOP % b"b"
        out = c.imap(f"c LOGIN {ALICE} {USERS[ALICE]}\r\n".encode(), b"c")
        assert out.startswith(b"c OK [CAPABILITY"), out
        wait_session_log(px, c, r'client input rejected reason="literal too large"')
    # ... and also when the huge literal is the second one of the command
    with Conn(px.addr("imap-plain")) as c:
        c.send(b"a LOGIN {5}\r\n")
        assert c.line() == b"+ OK\r\n"
        c.send(b"alice {%s}\r\n" % size)
        assert c.line() == IMAP_TOOBIG % b"a"
        assert c.imap(b"b NOOP\r\n", b"b") == IMAP_NOOP % b"b"
    assert rss_kib(pid) - before < 5 * 1024
    assert_serving(px, certs, "imap")


@pytest.mark.parametrize("marker", [b"+", b"-"], ids=["LITERAL+", "LITERAL-"])
@pytest.mark.parametrize("size", HUGE, ids=lambda s: s.decode()[:24])
def test_huge_non_synchronizing_literal_closes_the_connection(px, certs, size, marker):
    pid = px.proc.pid
    before = rss_kib(pid)
    with Conn(px.addr("imap-plain")) as c:
        # The client does not wait: the literal's data follows at once.
        c.try_send(b"a LOGIN {%s%s}\r\n" % (size, marker) + b"x" * 8192)
        assert c.rest(timeout=10) == IMAP_TOOBIG % b"a" + IMAP_TOOBIG_BYE
        wait_session_log(px, c, r'client input rejected reason="literal too large"')
        wait_session_log(px, c, ended("imap") + r'"input_too_long"')
    assert rss_kib(pid) - before < 5 * 1024
    assert_serving(px, certs, "imap")


def test_many_huge_literals_do_not_grow_memory(px, certs):
    pid = px.proc.pid
    login_works(px, certs, "imap")  # warm up
    before = rss_kib(pid)
    for i in range(200):
        size = HUGE[i % len(HUGE)]
        with Conn(px.addr("imap-plain")) as c:
            c.send(b"a LOGIN {%s}\r\nb LOGIN ~{%s}\r\nc LOGIN {%s+}\r\n" % (size, size, size))
            assert c.rest(timeout=10) == (
                IMAP_TOOBIG % b"a" + IMAP_TOOBIG % b"b" + IMAP_TOOBIG % b"c" + IMAP_TOOBIG_BYE
            )
    growth = rss_kib(pid) - before
    print(f"\nRSS growth after 200 connections announcing 2^63-byte literals: {growth} KiB")
    assert growth < 5 * 1024
    assert_serving(px, certs, "imap")


# =======================================================================================
# 3. A line that never ends: several MB without a line feed. Postern must close after
#    the limit and hold no more than the limit.
# =======================================================================================

ENDLESS = {
    # id: (listener, prefix, exact answer)
    "imap": ("imap", b"a1 NOOP ", IMAP_TOO_LONG % b"a1"),
    "imap-literal": ("imap-plain", b"a LOGIN {8000+}\r\n" + b"u" * 8000 + b" ", IMAP_TOO_LONG % b"a"),
    "pop3": ("pop3", b"USER ", POP3_TOO_LONG),
    "submission": ("submission", b"EHLO ", SMTP_TOO_LONG),
    "submission-auth": ("submission-plain", b"AUTH PLAIN ", SMTP_TOO_LONG),
    "mx": ("mx", b"MAIL FROM:<", SMTP_TOO_LONG),
    "lmtp": ("lmtp", b"LHLO ", SMTP_TOO_LONG),
}


@pytest.mark.parametrize("case", list(ENDLESS))
def test_endless_line_is_cut_at_the_limit_with_bounded_memory(px, certs, case):
    listener, prefix, want = ENDLESS[case]
    proto = PROTO[listener]
    pid = px.proc.pid
    login_works(px, certs, proto)  # warm up the allocator
    before = rss_kib(pid)
    total = 64 * MiB
    with Conn(px.addr(listener)) as c:
        c.send(prefix)
        start = time.monotonic()
        sent, how = stream(c, b"x" * 65536, total)
        secs = time.monotonic() - start
        # Postern closed the connection: the kernel buffers on both sides hold a few MB
        # at most, so a server that kept reading would have taken all 64 MB.
        assert how == "closed", f"{how} after {sent} bytes of one line"
        assert c.rest(timeout=10) == want
        wait_session_log(px, c, r'client input rejected reason="line too long"')
        wait_session_log(px, c, ended(proto) + r'"input_too_long"')
    after = rss_kib(pid)
    print(
        f"\nendless line on {listener}: {sent / MiB:.1f} MiB written before the close "
        f"({secs:.2f}s); Postern RSS {before} -> {after} KiB ({after - before:+d} KiB)"
    )
    assert after - before < 20 * 1024
    assert_serving(px, certs, proto)


# =======================================================================================
# 4 and 5. NUL bytes, invalid UTF-8 and invalid base64 in commands and credentials.
#    Each case is a dialogue of (bytes to send, exact answer); afterwards the same
#    connection must still work, up to a real login.
# =======================================================================================

EHLO = object()  # "any 250 EHLO reply"

DIALOGUES = {
    # --- IMAP (imap-plain: logins allowed without TLS, so credentials reach the parser)
    "imap-nul-in-command": ("imap-plain", [(b"a NO\0OP\r\n", IMAP_SYNTAX % b"a")], "invalid command"),
    "imap-nul-in-tag": ("imap-plain", [(b"a\0 NOOP\r\n", IMAP_SYNTAX % b"*")], "invalid command"),
    "imap-nul-in-login-atom": (
        "imap-plain", [(b"a LOGIN mal\0lory pw\r\n", IMAP_SYNTAX % b"a")], "invalid command"),
    "imap-nul-in-quoted-password": (
        "imap-plain", [(b'a LOGIN "mallory" "p\0w"\r\n', IMAP_SYNTAX % b"a")], "invalid command"),
    "imap-nul-in-literal-password": (
        "imap-plain", [(b"a LOGIN mallory {4+}\r\np\0w!\r\n", IMAP_SYNTAX % b"a")], "invalid command"),
    "imap-nul-in-plain-password": (
        "imap-plain",
        [(b"a AUTHENTICATE PLAIN " + b64(b"\0mallory\0pw\0extra") + b"\r\n", IMAP_AUTH_FAILED % b"a")],
        None),
    "imap-nul-in-plain-user": (
        "imap-plain",
        [(b"a AUTHENTICATE PLAIN\r\n", b"+ \r\n"),
         (b64(b"\0mal\0lory\0pw") + b"\r\n", IMAP_AUTH_FAILED % b"a")],
        None),
    "imap-utf8-in-command": ("imap-plain", [(b"a NO\xffOP\r\n", IMAP_SYNTAX % b"a")], "invalid command"),
    "imap-utf8-in-login-atom": (
        "imap-plain", [(b"a LOGIN \xff\xfe pw\r\n", IMAP_SYNTAX % b"a")], "invalid command"),
    "imap-utf8-in-literal-user": (
        "imap-plain", [(b"a LOGIN {2+}\r\n\xff\xfe pw\r\n", IMAP_AUTH_FAILED % b"a")], None),
    "imap-utf8-in-plain-user": (
        "imap-plain",
        [(b"a AUTHENTICATE PLAIN " + b64(b"\0\xff\xfe\0pw") + b"\r\n", IMAP_AUTH_FAILED % b"a")],
        None),
    "imap-utf8-in-login-mechanism-user": (
        "imap-plain",
        [(b"a AUTHENTICATE LOGIN\r\n", b"+ VXNlcm5hbWU6\r\n"),
         (b64(b"\xc3\x28") + b"\r\n", IMAP_AUTH_FAILED % b"a")],
        None),
    "imap-bad-base64-initial-response": (
        "imap-plain", [(b"a AUTHENTICATE PLAIN !!!!\r\n", IMAP_SYNTAX % b"a")], "invalid command"),
    "imap-bad-base64-response": (
        "imap-plain",
        [(b"a AUTHENTICATE PLAIN\r\n", b"+ \r\n"), (b"!!!!\r\n", IMAP_BAD_B64 % b"a")],
        "invalid command"),
    "imap-bad-base64-password": (
        "imap-plain",
        [(b"a AUTHENTICATE LOGIN\r\n", b"+ VXNlcm5hbWU6\r\n"),
         (b64(b"mallory") + b"\r\n", b"+ UGFzc3dvcmQ6\r\n"),
         (b"c\0w=\r\n", IMAP_BAD_B64 % b"a")],
        "invalid command"),
    # --- POP3 (pop3-plain)
    "pop3-nul-in-command": ("pop3-plain", [(b"NO\0OP\r\n", POP3_UNKNOWN)], "unknown command"),
    "pop3-nul-in-user": ("pop3-plain", [(b"USER mal\0lory\r\n", POP3_BAD_USER)], "bad user name"),
    "pop3-nul-in-plain-password": (
        "pop3-plain",
        [(b"AUTH PLAIN " + b64(b"\0mallory\0pw\0extra") + b"\r\n", POP3_AUTH_FAILED)],
        None),
    "pop3-utf8-in-command": ("pop3-plain", [(b"NO\xffOP\r\n", POP3_UNKNOWN)], "unknown command"),
    "pop3-utf8-in-user": ("pop3-plain", [(b"USER \xff\xfe\r\n", POP3_BAD_USER)], "bad user name"),
    "pop3-utf8-in-plain-user": (
        "pop3-plain", [(b"AUTH PLAIN " + b64(b"\0\xff\0pw") + b"\r\n", POP3_AUTH_FAILED)], None),
    "pop3-utf8-in-login-user": (
        "pop3-plain", [(b"AUTH LOGIN " + b64(b"\xc3\x28") + b"\r\n", POP3_AUTH_FAILED)], None),
    "pop3-bad-base64-initial-response": (
        "pop3-plain", [(b"AUTH PLAIN !!!!\r\n", POP3_BAD_B64)], "bad base64"),
    "pop3-bad-base64-response": (
        "pop3-plain", [(b"AUTH PLAIN\r\n", b"+ \r\n"), (b"!!!!\r\n", POP3_BAD_B64)], "bad base64"),
    # --- submission (submission-plain)
    "submission-nul-in-command": (
        "submission-plain", [(b"NO\0OP\r\n", SMTP_BAD_CHARS)], "invalid characters in command"),
    "submission-nul-in-ehlo": (
        "submission-plain", [(b"EHLO x\0y\r\n", SMTP_BAD_CHARS)], "invalid characters in command"),
    "submission-nul-in-plain-password": (
        "submission-plain",
        [(b"EHLO x\r\n", EHLO),
         (b"AUTH PLAIN " + b64(b"\0mallory\0pw\0extra") + b"\r\n", SMTP_AUTH_FAILED)],
        None),
    "submission-nul-in-login-user": (
        "submission-plain",
        [(b"EHLO x\r\n", EHLO), (b"AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n"),
         (b64(b"mal\0lory") + b"\r\n", SMTP_AUTH_FAILED)],
        None),
    "submission-utf8-in-command": (
        "submission-plain", [(b"NOOP \xff\r\n", SMTP_BAD_CHARS)], "invalid characters in command"),
    "submission-utf8-in-ehlo": (
        "submission-plain", [(b"EHLO \xff\xfe\r\n", SMTP_BAD_CHARS)], "invalid characters in command"),
    "submission-utf8-in-plain-user": (
        "submission-plain",
        [(b"EHLO x\r\n", EHLO), (b"AUTH PLAIN " + b64(b"\0\xff\0pw") + b"\r\n", SMTP_AUTH_FAILED)],
        None),
    "submission-bad-base64-initial-response": (
        "submission-plain",
        [(b"EHLO x\r\n", EHLO), (b"AUTH PLAIN !!!!\r\n", SMTP_BAD_B64)],
        "bad base64"),
    "submission-bad-base64-response": (
        "submission-plain",
        [(b"EHLO x\r\n", EHLO), (b"AUTH PLAIN\r\n", b"334 \r\n"), (b"!!!!\r\n", SMTP_BAD_B64)],
        "bad base64"),
    # --- MX and LMTP
    "mx-nul-in-mail": (
        "mx", [(b"EHLO x\r\n", EHLO), (b"MAIL FROM:<a\0@example.org>\r\n", SMTP_BAD_CHARS)],
        "invalid characters in command"),
    "mx-utf8-in-rcpt": (
        "mx",
        [(b"EHLO x\r\n", EHLO), (b"MAIL FROM:<s@example.org>\r\n", b"250 2.1.0 Ok\r\n"),
         (b"RCPT TO:<\xff@example.test>\r\n", SMTP_BAD_CHARS), (b"RSET\r\n", SMTP_OK)],
        "invalid characters in command"),
    "mx-cr-inside-address": (
        "mx", [(b"EHLO x\r\n", EHLO), (b"MAIL FROM:<a\r@example.org>\r\n", SMTP_BAD_CHARS)],
        "invalid characters in command"),
    "lmtp-nul-in-mail": (
        "lmtp", [(b"LHLO x\r\n", EHLO), (b"MAIL FROM:<a\0@example.org>\r\n", SMTP_BAD_CHARS)],
        "invalid characters in command"),
}


def expect(c: Conn, want) -> None:
    if want is EHLO:
        reply = smtp_reply(c)
        assert reply.startswith(b"250-") and all(
            line.startswith(b"250") for line in reply.split(b"\r\n") if line
        ), reply
        return
    got = b"".join(c.lines(want.count(b"\r\n")))
    assert got == want


def login_on_same_connection(c: Conn, proto: str) -> None:
    """The connection that took the hostile input still logs in normally."""
    if proto == "imap":
        assert c.imap(b"y NOOP\r\n", b"y") == IMAP_NOOP % b"y"
        out = c.imap(f"z LOGIN {ALICE} {USERS[ALICE]}\r\n".encode(), b"z")
        assert out.startswith(b"z OK [CAPABILITY"), out
    elif proto == "pop3":
        assert c.ask(b"NOOP\r\n") == b"+OK\r\n"
        assert c.ask(f"USER {ALICE}\r\n".encode()) == b"+OK\r\n"
        out = c.ask(f"PASS {USERS[ALICE]}\r\n".encode())
        assert out.startswith(b"+OK"), out
    elif proto == "submission":
        assert c.ask(b"NOOP\r\n") == SMTP_OK
        ehlo(c)
        out = c.ask(b"AUTH PLAIN " + plain(ALICE, USERS[ALICE]) + b"\r\n")
        assert out.startswith(b"235"), out
    else:
        assert c.ask(b"NOOP\r\n") == SMTP_OK
        c.send(b"LHLO x\r\n" if proto == "lmtp" else b"EHLO x\r\n")
        assert smtp_reply(c).startswith(b"250")
        assert c.ask(b"MAIL FROM:<sender@example.org>\r\n").startswith(b"250")
        out = c.ask(f"RCPT TO:<{ALICE}>\r\n".encode(), timeout=30)
        assert out.startswith(b"250"), out


@pytest.mark.parametrize("case", list(DIALOGUES))
def test_nul_utf8_and_base64_garbage_is_refused(px, certs, case):
    listener, steps, reason = DIALOGUES[case]
    proto = PROTO[listener]
    with Conn(px.addr(listener)) as c:
        for data, want in steps:
            c.send(data)
            expect(c, want)
        assert c.quiet(0.2) == b""  # exactly one answer per command, nothing more
        if reason:
            wait_session_log(px, c, rf'client input rejected reason="{reason}"')
        # (reason None: credentials Postern cannot decode, answered as a failed login;
        # their log line is checked by test_undecodable_credentials_are_logged.)
        login_on_same_connection(c, proto)
    assert_serving(px, certs, proto)


UNDECODABLE = {
    "imap": ("imap-plain", [], b"a AUTHENTICATE PLAIN " + b64(b"\0mallory\0pw\0extra") + b"\r\n",
             IMAP_AUTH_FAILED % b"a"),
    "pop3": ("pop3-plain", [], b"AUTH PLAIN " + b64(b"\0mallory\0pw\0extra") + b"\r\n",
             POP3_AUTH_FAILED),
    "submission": ("submission-plain", [(b"EHLO x\r\n", EHLO)],
                   b"AUTH PLAIN " + b64(b"\0mallory\0pw\0extra") + b"\r\n", SMTP_AUTH_FAILED),
}


@pytest.mark.parametrize("case", list(UNDECODABLE))
def test_undecodable_credentials_are_logged(px, certs, case):
    """A SASL PLAIN message with a NUL in the password (or invalid UTF-8 in the name) is
    client misbehaviour like any other: docs/architecture.md says it becomes the
    protocol's reply plus Event::Rejected, which the driver logs. A failed login that
    leaves no trace in the log is invisible to whoever watches for password guessing."""
    listener, setup, data, want = UNDECODABLE[case]
    with Conn(px.addr(listener)) as c:
        for send, answer in setup:
            c.send(send)
            expect(c, answer)
        assert c.ask(data) == want
        wait_session_log(px, c, r"client input rejected reason=|login refused", timeout=5)
    assert_serving(px, certs, PROTO[listener])


def test_pop3_password_with_nul_never_reaches_the_backend(px, cluster, certs):
    """USER/PASS with a NUL in the password of a real, pinned user: Postern refuses the
    credentials itself (AUTH PLAIN replay cannot carry them) and sends nothing."""
    before = cluster["b1"].log().count("auth failed")
    with Conn(px.addr("pop3-plain")) as c:
        assert c.ask(f"USER {ALICE}\r\n".encode()) == b"+OK\r\n"
        assert c.ask(f"PASS {USERS[ALICE]}\0\r\n".encode()) == POP3_AUTH_FAILED
        wait_session_log(px, c, r"AuthFailed|login refused")
        login_on_same_connection(c, "pop3")
    time.sleep(1.0)  # Dovecot logs an attempt when the connection closes
    assert cluster["b1"].log().count("auth failed") == before
    assert_serving(px, certs, "pop3")


# =======================================================================================
# 6. 10 000 commands pipelined in one write: answered up to max_commands, then the
#    protocol's goodbye and a close; memory stays bounded. MX and LMTP have no command
#    cap: every command is answered, in order.
# =======================================================================================

N_PIPELINED = 10_000


def imap_pipelined():
    data = b"".join(
        (b"t%d NOOP\r\n" if i % 2 == 0 else b"t%d CAPABILITY\r\n") % i for i in range(N_PIPELINED)
    )
    return data


PIPELINED = {
    # id: (listener, data, exact answer or None for IMAP (checked by tags))
    "imap": ("imap", imap_pipelined(), None),
    "pop3": (
        "pop3",
        b"".join(b"NOOP\r\n" if i % 2 == 0 else b"CAPA\r\n" for i in range(N_PIPELINED)),
        b"".join(b"+OK\r\n" if i % 2 == 0 else POP3_CAPA_PLAIN for i in range(50))
        + POP3_TOO_MANY_COMMANDS,
    ),
    "submission": (
        "submission",
        b"".join(b"NOOP\r\n" if i % 2 == 0 else b"HELP\r\n" for i in range(N_PIPELINED)),
        b"".join(SMTP_OK if i % 2 == 0 else SMTP_HELP for i in range(50)) + SMTP_TOO_MANY_COMMANDS,
    ),
}


@pytest.mark.parametrize("case", list(PIPELINED))
def test_ten_thousand_pipelined_commands_hit_the_command_cap(px, certs, case):
    listener, data, want = PIPELINED[case]
    proto = PROTO[listener]
    pid = px.proc.pid
    login_works(px, certs, proto)
    before = rss_kib(pid)
    with Conn(px.addr(listener)) as c:
        reader = Reader(c)
        reader.start()
        c.try_send(data)  # one write; Postern closes before reading it all
        got = reader.wait(timeout=20)
        if want is None:
            lines = got.split(b"\r\n")
            tagged = [line for line in lines if line and not line.startswith(b"* ")]
            assert tagged == [
                (b"t%d OK NOOP completed." if i % 2 == 0 else b"t%d OK Capability completed.") % i
                for i in range(50)
            ], got[-500:]
            assert got.endswith(IMAP_TOO_MANY_COMMANDS), got[-500:]
        else:
            assert got == want, got[-500:]
        wait_session_log(px, c, r'client input rejected reason="too many commands before')
        wait_session_log(px, c, ended(proto) + r'"too_many_errors"')
    growth = rss_kib(pid) - before
    assert growth < 20 * 1024, f"RSS grew {growth} KiB"
    assert_serving(px, certs, proto)


@pytest.mark.parametrize("listener", ["mx", "lmtp"])
def test_ten_thousand_pipelined_commands_on_the_relay_are_all_answered_in_order(
    px, certs, listener
):
    proto = PROTO[listener]
    pid = px.proc.pid
    login_works(px, certs, proto)
    before = rss_kib(pid)
    data = b"".join(b"NOOP\r\n" if i % 2 == 0 else b"VRFY x\r\n" for i in range(N_PIPELINED))
    want = b"".join(SMTP_OK if i % 2 == 0 else RELAY_VRFY for i in range(N_PIPELINED))
    with Conn(px.addr(listener)) as c:
        reader = Reader(c, limit=len(want))
        reader.start()
        c.send(data)
        got = reader.wait(timeout=30)
        assert got == want, got[-300:]
        reader = None
        assert c.ask(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
        assert c.rest(timeout=10) == b""
        wait_session_log(px, c, r'session ended reason="logout"')
    growth = rss_kib(pid) - before
    assert growth < 20 * 1024, f"RSS grew {growth} KiB"
    assert_serving(px, certs, proto)


# A client that pipelines commands and never reads the replies. Postern must stop
# reading it (back-pressure), must not hold much more for it than its input limits
# (max_pipelined is 64 KiB; four times that closes a session), and must not keep the
# session forever: the relay's SMTP timeout (300 s, RFC 5321 §4.5.3.2) still applies.

STALL_BUDGET_KIB = 256  # per connection: 4 x max_pipelined


def stall_relay(p: Postern) -> tuple[Conn, int]:
    """An MX connection that pipelines EHLO (about 150 bytes of reply for 8 bytes of
    command) until Postern stops reading it; it never reads a reply."""
    c = Conn(p.addr("mx"))
    sent, how = stream(c, b"EHLO x\r\n" * 8192, 512 * MiB, stall=1.5)
    assert how == "stalled", f"{how} after {sent} bytes: Postern should stop reading"
    return c, sent


def test_relay_client_that_never_reads_costs_bounded_memory(px, certs):
    pid = px.proc.pid
    login_works(px, certs, "smtp")
    time.sleep(0.5)
    before = rss_kib(pid)
    conns = []
    try:
        for _ in range(10):
            conns.append(stall_relay(px)[0])
        time.sleep(1.0)
        after = rss_kib(pid)
        per_conn = (after - before) / len(conns)
        print(f"\nMX clients that never read: {per_conn:.0f} KiB of Postern RSS each")
        assert per_conn < STALL_BUDGET_KIB, (
            f"{per_conn:.0f} KiB per connection whose replies are not read "
            f"(an idle one costs ~15 KiB)"
        )
        assert_serving(px, certs, "smtp")
    finally:
        for c in conns:
            c.close()


def test_relay_client_that_never_reads_is_dropped_by_the_smtp_timeout(start, certs):
    """timeouts.smtp (5 minutes by default, RFC 5321 §4.5.3.2) bounds the wait for a
    client to take its replies as well as the wait for its commands."""
    p = start(lambda c: c.setdefault("timeouts", {}).update({"smtp": "3s"}))
    c, sent = stall_relay(p)
    with c:
        t0 = time.monotonic()
        line = wait_session_log(p, c, r"session ended reason=", timeout=30)
        took = time.monotonic() - t0
        print(f"\nstalled MX session ended after {took:.0f}s: {line}")
        assert 'reason="timeout"' in line or "reason=timeout" in line, line
        assert took < 20, took
    assert_serving(p, certs, "smtp")


EMPTY_FLOOD = {
    # id: (listener, exact answer to a flood of empty lines)
    "imap": ("imap", (IMAP_SYNTAX % b"*") * 11 + IMAP_TOO_MANY_BAD, "invalid command"),
    "pop3": ("pop3", POP3_UNKNOWN * 10 + POP3_TOO_MANY_BAD, "unknown command"),
    "submission": ("submission", SMTP_UNKNOWN * 11 + SMTP_TOO_MANY_ERRORS, "unknown command"),
    "mx": ("mx", SMTP_UNKNOWN * 11 + SMTP_TOO_MANY_ERRORS, "unknown command"),
    "lmtp": ("lmtp", SMTP_UNKNOWN * 11 + SMTP_TOO_MANY_ERRORS, "unknown command"),
}


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "bare-lf"])
@pytest.mark.parametrize("case", list(EMPTY_FLOOD))
def test_empty_line_flood_is_cut_by_the_error_budget(px, certs, case, eol):
    listener, want, reason = EMPTY_FLOOD[case]
    proto = PROTO[listener]
    with Conn(px.addr(listener)) as c:
        reader = Reader(c)
        reader.start()
        c.try_send(eol * 500_000)
        assert reader.wait(timeout=20) == want
        wait_session_log(px, c, rf'client input rejected reason="{reason}"')
        wait_session_log(px, c, ended(proto) + r'"too_many_errors"')
    assert_serving(px, certs, proto)


# =======================================================================================
# 7. STARTTLS command injection (CVE-2011-0411): plaintext pipelined behind STARTTLS in
#    the same write must never run inside TLS.
# =======================================================================================

INJECTION = {
    # id: (listener, setup exchanges, STARTTLS + injected bytes, answer to STARTTLS,
    #      probe sent inside TLS, the exact first answer to the probe, log text)
    "imap-noop": (
        "imap", [], b"a STARTTLS\r\nb NOOP\r\n", IMAP_STARTTLS % b"a",
        b"c NOOP\r\n", IMAP_NOOP % b"c", "STARTTLS"),
    "imap-login": (
        "imap", [], f"a STARTTLS\r\nb LOGIN {BOB} {USERS[BOB]}\r\n".encode(), IMAP_STARTTLS % b"a",
        b"c NOOP\r\n", IMAP_NOOP % b"c", "STARTTLS"),
    "pop3-noop": (
        "pop3", [], b"STLS\r\nNOOP\r\n", POP3_STLS,
        b"CAPA\r\n", b"+OK Capability list follows\r\n", "STLS"),
    "pop3-user": (
        "pop3", [], f"STLS\r\nUSER {BOB}\r\n".encode(), POP3_STLS,
        f"PASS {USERS[BOB]}\r\n".encode(), POP3_NO_USER, "STLS"),
    "submission-rset": (
        "submission", [(b"EHLO x\r\n", EHLO)], b"STARTTLS\r\nRSET\r\n", SMTP_STARTTLS,
        b"HELP\r\n", SMTP_HELP, "STARTTLS"),
    "submission-ehlo": (
        "submission", [(b"EHLO x\r\n", EHLO)], b"STARTTLS\r\nEHLO injected\r\n", SMTP_STARTTLS,
        b"AUTH PLAIN " + plain(BOB, USERS[BOB]) + b"\r\n", SMTP_EHLO_FIRST, "STARTTLS"),
    "mx-vrfy": (
        "mx", [(b"EHLO x\r\n", EHLO)], b"STARTTLS\r\nVRFY postmaster\r\n", SMTP_STARTTLS,
        b"HELP\r\n", RELAY_HELP, "STARTTLS"),
}


@pytest.mark.parametrize("case", list(INJECTION))
def test_starttls_injection_is_discarded(px, cluster, certs, case):
    listener, setup, data, answer, probe, first, verb = INJECTION[case]
    proto = PROTO[listener]
    logins = len(cluster["b2"].logins())
    with Conn(px.addr(listener)) as c:
        for send, want in setup:
            c.send(send)
            expect(c, want)
        c.send(data)  # one write: STARTTLS and the injected command in one segment
        assert c.line() == answer
        c.starttls(certs.client_context())
        c.send(probe)
        assert c.line() == first  # an answer to the injected command would come first
        if proto == "pop3" and first.startswith(b"+OK Capability"):
            capa = c.until(b".\r\n")
            assert b"STLS" not in capa and b"USER" in capa
        assert c.quiet(0.3) == b""
        wait_session_log(px, c, rf'client input rejected reason="discarded plaintext pipelined after {verb}"')
    assert len(cluster["b2"].logins()) == logins  # the injected LOGIN never ran
    assert_serving(px, certs, proto)


BIG_INJECTION = {
    # listener: (setup, STARTTLS line, injected command, answer); the injection is larger
    # than what Postern reads at once, so part of it reaches the TLS handshake.
    "imap": ([], b"a STARTTLS\r\n", b"b NOOP\r\n", IMAP_STARTTLS % b"a"),
    "pop3": ([], b"STLS\r\n", b"NOOP\r\n", POP3_STLS),
    "submission": ([(b"EHLO x\r\n", EHLO)], b"STARTTLS\r\n", b"NOOP\r\n", SMTP_STARTTLS),
    "mx": ([(b"EHLO x\r\n", EHLO)], b"STARTTLS\r\n", b"NOOP\r\n", SMTP_STARTTLS),
}


@pytest.mark.parametrize("listener", list(BIG_INJECTION))
def test_starttls_injection_larger_than_a_read_fails_the_handshake(px, certs, listener):
    setup, starttls, injected, answer = BIG_INJECTION[listener]
    proto = PROTO[listener]
    with Conn(px.addr(listener)) as c:
        for send, want in setup:
            c.send(send)
            expect(c, want)
        c.try_send(starttls + injected * (96 * 1024 // len(injected)))
        assert c.line() == answer
        # What Postern did not read with STARTTLS now sits where the ClientHello should:
        # the handshake fails, and nothing of the injection was executed. Postern may
        # already have answered the garbage with a TLS alert (content type 21).
        early = c.quiet(0.5)
        if early:
            assert early.startswith(b"\x15\x03"), early
        else:
            try:
                c.starttls(certs.client_context())
                c.try_send(b"probe\r\n")
                leaked = c.rest(timeout=10)
            except (OSError, ValueError):
                leaked = b""
            assert leaked == b"", leaked
        wait_session_log(px, c, r'reason="tls_error"')
    assert_serving(px, certs, proto)


# =======================================================================================
# 8. PROXY protocol headers from a peer outside accept_proxy_from.
# =======================================================================================

TRUSTED_BALANCER = "127.0.0.9"
PROXY_LISTENERS = ["imap", "pop3", "submission", "mx", "lmtp"]


def proxy_v1(src="203.0.113.7", sport=5555, dst="127.0.0.1", dport=143) -> bytes:
    return f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()


def proxy_v2(src="203.0.113.7", sport=5555, dst="127.0.0.1", dport=143) -> bytes:
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    addrs = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return sig + bytes([0x21, 0x11]) + struct.pack("!H", len(addrs)) + addrs


def trust_balancer(c):
    for listener in c["listeners"]:
        listener["accept_proxy_from"] = [TRUSTED_BALANCER]


@pytest.mark.parametrize("when", ["at-connect", "after-greeting"])
@pytest.mark.parametrize("header", ["v1", "v2"])
@pytest.mark.parametrize("listener", PROXY_LISTENERS)
def test_proxy_header_from_an_untrusted_peer_is_refused(start, certs, listener, header, when):
    p = start(trust_balancer)
    proto = PROTO[listener]
    data = proxy_v1() if header == "v1" else proxy_v2()
    with Conn(p.addr(listener), source="127.0.0.1", greeting=(when == "after-greeting")) as c:
        c.try_send(data)
        rest = c.rest(timeout=5)
        greeting = c.greeting or rest[: rest.find(b"\r\n") + 2]
        assert greeting.startswith(GREETING[proto]), rest
        # Nothing but the greeting: the header was neither obeyed nor run as commands.
        assert (c.greeting + rest).count(b"\r\n") == 1, c.greeting + rest
        wait_session_log(p, c, r"refused: PROXY header from an untrusted address")
        wait_session_log(p, c, r'reason="untrusted_proxy_header"')
    assert not any("client=203.0.113.7" in line for line in p.log().splitlines())
    assert_serving(p, certs, proto)


def test_proxy_header_from_the_trusted_balancer_still_works(start, certs):
    """The control for the test above: the same configuration does accept a header from
    the balancer, so the refusals are about the peer, not a broken setup."""
    p = start(trust_balancer)
    with Conn(p.addr("imap-plain"), source=TRUSTED_BALANCER, greeting=False) as c:
        c.send(proxy_v1())
        assert c.line().startswith(GREETING["imap"])
        out = c.imap(f"a LOGIN {ALICE} {USERS[ALICE]}\r\n".encode(), b"a")
        assert out.startswith(b"a OK"), out
    p.wait_log(r"client=203\.0\.113\.7:5555 via=127\.0\.0\.9:\d+.*login accepted")


@pytest.mark.parametrize("header", ["v1", "v2"])
def test_proxy_header_and_tls_hello_in_one_segment(start, certs, header):
    """A balancer (HAProxy with send-proxy in front of port 993) writes the header and
    the client's first bytes back to back; they often share a segment. Postern must
    take exactly the header's bytes and hand the rest to TLS."""
    import ssl

    p = start(trust_balancer)
    ctx = certs.client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    data = (proxy_v1 if header == "v1" else proxy_v2)(dport=993)
    with Conn(p.addr("imaps"), source=TRUSTED_BALANCER, greeting=False) as c:
        c.send(data + hello)  # one write: one segment on loopback
        greeting = b""
        deadline = time.monotonic() + 10
        while b"\r\n" not in greeting:
            assert time.monotonic() < deadline, "no TLS greeting"
            try:
                tls.do_handshake()
                greeting += tls.read(4096)
            except ssl.SSLWantReadError:
                pass
            if outgoing.pending:
                c.send(outgoing.read())
            if b"\r\n" not in greeting:
                chunk = c.sock.recv(65536)
                assert chunk, f"closed by Postern; greeting so far {greeting!r}"
                incoming.write(chunk)
        assert greeting.startswith(GREETING["imap"]), greeting
    p.wait_log(r"client=203\.0\.113\.7:5555 via=127\.0\.0\.9:\d+")


@pytest.mark.parametrize("listener", ["imap", "mx"])
def test_endless_proxy_header_from_the_balancer_is_cut(start, certs, listener):
    p = start(trust_balancer)
    with Conn(p.addr(listener), source=TRUSTED_BALANCER, greeting=False) as c:
        sent, how = stream(c, b"PROXY " + b"x" * 65530, 64 * MiB)
        assert how == "closed", f"{how} after {sent} bytes of PROXY header"
        assert c.rest(timeout=10) == b""  # no greeting for an invalid header
        wait_session_log(p, c, r"refused: no valid PROXY header from a trusted peer")
    assert_serving(p, certs, PROTO[listener])


# =======================================================================================
# 9. Clients that send nothing, or drip: closed by timeouts.preauth, a wall-clock budget.
# =======================================================================================

PREAUTH = 2.0


def short_preauth(c):
    c["timeouts"] = {"preauth": f"{PREAUTH:g}s"}


def goodbye_ok(proto: str, got: bytes) -> None:
    if proto == "submission":
        # docs/protocols/smtp.md: "on expiry the machines send 421 4.4.2 <hostname>
        # Error: timeout exceeded".
        assert got == SMTP_TIMEOUT, got
    elif proto == "imap":
        assert got == b"" or (got.startswith(b"* BYE ") and got.count(b"\r\n") == 1), got
    else:  # POP3 has no unsolicited replies
        assert got == b"" or (got.startswith(b"-ERR ") and got.count(b"\r\n") == 1), got


@pytest.mark.parametrize("listener", ["imap", "pop3", "submission"])
def test_silent_client_is_closed_after_the_preauth_timeout(start, certs, listener):
    p = start(short_preauth)
    proto = PROTO[listener]
    with Conn(p.addr(listener)) as c:
        t0 = time.monotonic()
        got = c.rest(timeout=15)
        took = time.monotonic() - t0
        assert PREAUTH - 0.5 < took < PREAUTH + 5, took
        wait_session_log(p, c, ended(proto) + r'"preauth_timeout"')
    goodbye_ok(proto, got)
    assert_serving(p, certs, proto)


@pytest.mark.parametrize("listener", ["imaps", "pop3s", "submissions"])
def test_client_that_never_starts_the_tls_handshake_is_closed(start, certs, listener):
    p = start(short_preauth)
    with Conn(p.addr(listener), greeting=False) as c:
        t0 = time.monotonic()
        assert c.rest(timeout=15) == b""
        took = time.monotonic() - t0
        assert PREAUTH - 0.5 < took < PREAUTH + 5, took
        wait_session_log(p, c, r'reason="preauth_timeout"')
    assert_serving(p, certs, PROTO[listener])


DRIP = {"imap": b"a LOGIN alice ", "pop3": b"USER alice", "submission": b"EHLO client"}


@pytest.mark.parametrize("listener", list(DRIP))
def test_dripping_client_is_closed_after_the_preauth_timeout(start, certs, listener):
    """One byte every 200 ms never completes a line: the pre-auth budget is wall-clock
    time from accept, not time since the last byte."""
    p = start(short_preauth)
    proto = PROTO[listener]
    with Conn(p.addr(listener)) as c:
        stop = threading.Event()

        def drip():
            data = DRIP[listener] + b"x" * 1000
            for i in range(len(data)):
                if stop.is_set() or not c.try_send(data[i : i + 1]):
                    return
                time.sleep(0.2)

        t = threading.Thread(target=drip, daemon=True)
        t0 = time.monotonic()
        t.start()
        try:
            got = c.rest(timeout=15)
        finally:
            stop.set()
            t.join(5)
        took = time.monotonic() - t0
        assert PREAUTH - 0.5 < took < PREAUTH + 5, took
        wait_session_log(p, c, ended(proto) + r'"preauth_timeout"')
    goodbye_ok(proto, got)
    assert_serving(p, certs, proto)


# =======================================================================================
# 10. Thousands of idle pre-auth connections: memory per connection, descriptors, and
#     normal logins while they are open.
# =======================================================================================

IDLE_CONNECTIONS = 5000
IDLE_BUDGET_KIB = 64  # per idle pre-auth connection, above the baseline


def open_idle(p: Postern, n: int, listeners: list[str], tls=None) -> list[Conn]:
    """Opens n connections spread over `listeners`, each from its own source address,
    and reads every greeting."""
    conns: list[Conn] = []
    batch: list[tuple[Conn, str]] = []
    try:
        for i in range(n):
            listener = listeners[i % len(listeners)]
            c = Conn(p.addr(listener), greeting=False, timeout=30, tls=tls)
            conns.append(c)
            batch.append((c, listener))
            if len(batch) == 250 or i == n - 1:
                for c, name in batch:
                    g = c.line(timeout=30)
                    assert g.startswith(GREETING[PROTO[name]]), (name, g)
                batch = []
    except BaseException:
        for c in conns:
            c.close()
        raise
    return conns


def settle(pid: int, want_fds: int, timeout: float = 30.0) -> int:
    """Waits until `pid` holds at most `want_fds` descriptors; returns the count."""
    deadline = time.monotonic() + timeout
    while True:
        n = fd_count(pid)
        if n <= want_fds or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


IDLE_LISTENERS = {
    "plaintext": ["imap", "pop3", "submission"],
    "implicit-tls": ["imaps", "pop3s", "submissions"],
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", list(IDLE_LISTENERS))
def test_five_thousand_idle_preauth_connections(start, certs, kind):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        # Postern inherits this process's limit: raise it before starting Postern.
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = min(IDLE_CONNECTIONS, hard - 300)
    assert n >= IDLE_CONNECTIONS, f"RLIMIT_NOFILE hard limit {hard} is too low for the test"
    p = start()
    pid = p.proc.pid
    listeners = IDLE_LISTENERS[kind]
    tls = certs.client_context() if kind == "implicit-tls" else None
    assert_serving(p, certs, "imap", "pop3", "submission")  # warms up TLS, routing, pools
    time.sleep(0.5)
    base_rss, base_fds = rss_kib(pid), fd_count(pid)

    t0 = time.monotonic()
    conns = open_idle(p, n, listeners, tls)
    opened = time.monotonic() - t0
    try:
        time.sleep(1.0)
        peak_rss, peak_fds = rss_kib(pid), fd_count(pid)
        per_conn = (peak_rss - base_rss) / n
        print(
            f"\n{n} idle {kind} pre-auth connections (IMAP/POP3/submission) opened in {opened:.1f}s; "
            f"Postern RSS {base_rss} -> {peak_rss} KiB = {per_conn:.1f} KiB per connection; "
            f"fds {base_fds} -> {peak_fds}"
        )
        assert peak_fds - base_fds >= n - 10, "connections are missing on Postern's side"
        assert per_conn < IDLE_BUDGET_KIB, f"{per_conn:.1f} KiB per idle connection"
        # Normal clients are served while the idle ones wait.
        t1 = time.monotonic()
        assert_serving(p, certs, "imap", "pop3", "submission")
        print(f"logins with {n} idle connections open took {time.monotonic() - t1:.2f}s")
        # The idle ones are still there, greeted and unharmed.
        for c in conns[:: max(1, n // 50)]:
            assert c.quiet(0.01) == b""
    finally:
        for c in conns:
            c.close()
    fds_after = settle(pid, base_fds + 10)
    time.sleep(1.0)
    rss_after = rss_kib(pid)
    print(f"after closing them: fds {fds_after}, RSS {rss_after} KiB")
    assert fds_after <= base_fds + 10, f"{fds_after - base_fds} descriptors left behind"
    assert rss_after <= peak_rss + 2048

    # A second wave reuses the memory of the first: no leak per connection.
    conns = open_idle(p, n, listeners, tls)
    try:
        time.sleep(1.0)
        second_rss = rss_kib(pid)
    finally:
        for c in conns:
            c.close()
    print(f"second wave of {n}: RSS {second_rss} KiB")
    assert second_rss - rss_after < max(0.25 * (peak_rss - base_rss), 4096), (
        f"second wave grew RSS from {rss_after} to {second_rss} KiB"
    )
    assert settle(pid, base_fds + 10) <= base_fds + 10
    assert_serving(p, certs, "imap", "pop3", "submission")


# =======================================================================================
# SMTP specifics: invalid EHLO, BDAT before AUTH, AUTH cancelled with "*".
# =======================================================================================

BAD_EHLO = {
    # id: (listener, command, exact reply, log reason)
    "submission-no-argument": ("submission-plain", b"EHLO\r\n", SMTP_SYNTAX, "syntax error"),
    "submission-control-char": (
        "submission-plain", b"EHLO \x01x\r\n", SMTP_EHLO_SYNTAX, "invalid EHLO argument"),
    "submission-non-ascii": (
        "submission-plain", "EHLO café.example\r\n".encode(), SMTP_EHLO_SYNTAX,
        "invalid EHLO argument"),
    "submission-overlong-name": (
        "submission-plain", b"EHLO " + b"a" * 300 + b"\r\n", SMTP_SYNTAX, "syntax error"),
    "submission-helo-no-argument": ("submission-plain", b"HELO\r\n", SMTP_SYNTAX, "syntax error"),
    "submission-lhlo": ("submission-plain", b"LHLO x\r\n", SMTP_UNKNOWN, "LHLO"),
    "mx-control-char": ("mx", b"EHLO \x01\r\n", SMTP_EHLO_SYNTAX, "invalid EHLO argument"),
    "mx-no-argument": ("mx", b"EHLO\r\n", SMTP_SYNTAX, "syntax error"),
    "mx-non-ascii": ("mx", "HELO café.example\r\n".encode(), SMTP_EHLO_SYNTAX, "invalid EHLO argument"),
    "lmtp-ehlo": ("lmtp", b"EHLO x\r\n", RELAY_USE_LHLO, "HELO/EHLO in LMTP"),
    "lmtp-control-char": ("lmtp", b"LHLO \x7f\r\n", SMTP_EHLO_SYNTAX, "invalid EHLO argument"),
}


@pytest.mark.parametrize("case", list(BAD_EHLO))
def test_invalid_ehlo_is_refused_and_does_not_count_as_a_greeting(px, certs, case):
    listener, command, want, reason = BAD_EHLO[case]
    proto = PROTO[listener]
    with Conn(px.addr(listener)) as c:
        assert c.ask(command) == want
        wait_session_log(px, c, rf'client input rejected reason="{reason}"')
        # The refused greeting did not register: what needs EHLO still says so.
        if proto == "submission":
            assert c.ask(b"AUTH PLAIN " + plain(ALICE, USERS[ALICE]) + b"\r\n") == SMTP_EHLO_FIRST
        else:
            need = RELAY_NEED_LHLO if proto == "lmtp" else RELAY_NEED_HELO
            assert c.ask(b"MAIL FROM:<s@example.org>\r\n") == need
        login_on_same_connection(c, proto)
    assert_serving(px, certs, proto)


def test_auth_on_the_relay_is_refused(px, certs):
    with Conn(px.addr("mx")) as c:
        ehlo(c)
        assert c.ask(b"AUTH PLAIN " + plain(ALICE, USERS[ALICE]) + b"\r\n") == RELAY_NO_AUTH
        wait_session_log(px, c, r'client input rejected reason="AUTH on a relay"')
        login_on_same_connection(c, "smtp")


def bdat_payload(size: int) -> bytes:
    """Chunk data that is made of SMTP commands: if Postern read it as commands, QUIT
    would close the session and AUTH would answer."""
    unit = b"QUIT\r\nAUTH PLAIN " + plain(ALICE, USERS[ALICE]) + b"\r\nRSET\r\n"
    return (unit * (size // len(unit) + 1))[:size]


BDAT = {
    # id: (listener, size, writes, exact answer to the BDAT)
    "submission-starttls-listener": ("submission", 100_000, 1, SMTP_NEED_TLS),
    "submission-plain-listener": ("submission-plain", 100_000, 1, SMTP_NEED_AUTH),
    "submission-in-pieces": ("submission", 100_000, 25, SMTP_NEED_TLS),
    "submission-10MB": ("submission", 10 * MiB, 1, SMTP_NEED_TLS),
    "mx-without-mail": ("mx", 100_000, 1, RELAY_NEED_MAIL),
    "mx-10MB-in-pieces": ("mx", 10 * MiB, 40, RELAY_NEED_MAIL),
}


@pytest.mark.parametrize("case", list(BDAT))
def test_bdat_before_auth_skips_its_data(px, certs, case):
    listener, size, writes, want = BDAT[case]
    proto = PROTO[listener]
    pid = px.proc.pid
    before = rss_kib(pid)
    with Conn(px.addr(listener)) as c:
        reader = Reader(c)
        reader.start()
        payload = bdat_payload(size)
        c.send(b"BDAT %d LAST\r\n" % size)
        step = len(payload) // writes + 1
        for i in range(0, len(payload), step):
            c.send(payload[i : i + step])
            if writes > 1:
                time.sleep(0.01)
        c.send(b"NOOP\r\n")
        deadline = time.monotonic() + 30
        while len(reader.data) < len(want + SMTP_OK) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert bytes(reader.data) == want + SMTP_OK  # nothing from the chunk's "commands"
        assert not reader.ended.is_set()  # the QUITs inside the data did not run
        wait_session_log(px, c, r"client input rejected reason=")
    assert rss_kib(pid) - before < 20 * 1024
    assert_serving(px, certs, proto)


@pytest.mark.parametrize("listener", ["submission-plain", "mx"])
def test_bdat_size_beyond_64_bits_is_a_syntax_error(px, certs, listener):
    """A chunk size that does not fit in 64 bits cannot be honoured; it must be refused
    like any unparsable size (as `BDAT 99999999999999999999` is), not read as some other
    number: here the parser wraps 1844674407370955161600000000006 around to 6, skips the
    next 6 bytes (the QUIT below) and answers as if a 6-byte chunk had been sent."""
    proto = PROTO[listener]
    with Conn(px.addr(listener)) as c:
        assert c.ask(b"BDAT 99999999999999999999\r\n") == SMTP_SYNTAX  # the reference
        c.send(b"BDAT 1844674407370955161600000000006\r\nQUIT\r\n")
        got = c.quiet(1.5)
        assert got == SMTP_SYNTAX + b"221 2.0.0 Bye\r\n", got
    assert_serving(px, certs, proto)


AUTH_CANCEL = {
    # id: (listener, the exchanges of one cancelled attempt)
    "imap-plain-continuation": (
        "imap-plain", [(b"a AUTHENTICATE PLAIN\r\n", b"+ \r\n"), (b"*\r\n", IMAP_CANCELLED % b"a")]),
    "imap-login-at-password": (
        "imap-plain",
        [(b"a AUTHENTICATE LOGIN\r\n", b"+ VXNlcm5hbWU6\r\n"),
         (b64(ALICE.encode()) + b"\r\n", b"+ UGFzc3dvcmQ6\r\n"), (b"*\r\n", IMAP_CANCELLED % b"a")]),
    "pop3-plain-continuation": (
        "pop3-plain", [(b"AUTH PLAIN\r\n", b"+ \r\n"), (b"*\r\n", POP3_CANCELLED)]),
    "pop3-initial-response": ("pop3-plain", [(b"AUTH PLAIN *\r\n", POP3_CANCELLED)]),
    "pop3-login-at-password": (
        "pop3-plain",
        [(b"AUTH LOGIN " + b64(ALICE.encode()) + b"\r\n", b"+ UGFzc3dvcmQ6\r\n"),
         (b"*\r\n", POP3_CANCELLED)]),
    "submission-plain-continuation": (
        "submission-plain", [(b"AUTH PLAIN\r\n", b"334 \r\n"), (b"*\r\n", SMTP_ABORTED)]),
    "submission-initial-response": ("submission-plain", [(b"AUTH PLAIN *\r\n", SMTP_ABORTED)]),
    "submission-login-at-password": (
        "submission-plain",
        [(b"AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n"),
         (b64(ALICE.encode()) + b"\r\n", b"334 UGFzc3dvcmQ6\r\n"), (b"*\r\n", SMTP_ABORTED)]),
}


@pytest.mark.parametrize("case", list(AUTH_CANCEL))
def test_auth_cancelled_with_a_star(px, certs, case):
    """A cancelled exchange answers the protocol's cancel reply, is not an
    authentication failure (five in a row, more than max_auth_failures, leave the
    session open) and a real login works afterwards on the same connection."""
    listener, steps = AUTH_CANCEL[case]
    proto = PROTO[listener]
    with Conn(px.addr(listener)) as c:
        if proto == "submission":
            ehlo(c)
        for _ in range(5):
            for data, want in steps:
                assert c.ask(data) == want
        assert c.quiet(0.2) == b""
        login_on_same_connection(c, proto)
        assert not any("too_many_auth_failures" in line for line in session_lines(px, c))
    assert_serving(px, certs, proto)
