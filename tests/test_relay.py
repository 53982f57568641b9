"""The byte relay, end to end: every relay path carries 20 MB byte for byte, a client's
half-close reaches the backend while the backend's remaining bytes still reach the
client, and a slow reader gets everything while Postern's memory stays flat.

Relay paths (client side ↔ backend side): plaintext ↔ plaintext (splice(2) on Linux),
implicit TLS ↔ plaintext, STARTTLS ↔ plaintext, plaintext ↔ STARTTLS to the backend and
TLS ↔ TLS (the copy path). A real Dovecot stores and serves the 20 MB message: it is
APPENDed through Postern (client → backend) and FETCHed back through it (backend →
client). The half-close test needs a backend that keeps sending after it has seen the
client's end of stream, which Dovecot does not do, so a small fake backend in this file
plays that part.
"""

import base64
import hashlib
import imaplib
import os
import random
import re
import socket
import ssl
import threading
import time

import pytest

from conftest import USERS
from harness.dovecot import Dovecot
from harness.postern import Postern
from imap_client import SourceIMAP4, SourceIMAP4_SSL

ALICE = "alice@example.test"  # pinned to the plaintext backend
BOB = "bob@example.test"  # pinned to the same Dovecot, reached over STARTTLS
SIZE = 20 * 1000 * 1000


def make_message(size: int, seed: int = 8) -> bytes:
    """A message of exactly `size` bytes: headers, then CRLF lines of every byte value
    but NUL, CR and LF (8-bit included), so any corruption or reordering shows."""
    rnd = random.Random(seed)
    allowed = bytes(b for b in range(256) if b not in (0, 10, 13))
    table = bytes(allowed[i % len(allowed)] for i in range(256))
    head = b"From: relay@example.test\r\nTo: relay@example.test\r\nSubject: relay\r\n\r\n"
    lines = [head]
    left = size - len(head)
    while left > 0:
        n = min(left, rnd.randint(1, 998) + 2)
        if n < 3:
            lines.append(b"x" * n)
            break
        lines.append(rnd.randbytes(n - 2).translate(table) + b"\r\n")
        left -= n
    msg = b"".join(lines)
    assert len(msg) == size
    return msg


@pytest.fixture(scope="module")
def message() -> bytes:
    return make_message(SIZE)


@pytest.fixture(scope="module")
def tls_dovecot(workroot, certs):
    """A Dovecot that offers STARTTLS (optional), so the same mailboxes are reachable
    over a plaintext and a TLS backend connection."""
    mail = workroot / "relay-mail"
    mail.mkdir(mode=0o755, exist_ok=True)
    d = Dovecot(
        "relay", workroot / "relay-dovecot", mail, USERS,
        extra=lambda d: f"ssl = yes\nssl_cert = <{certs.cert}\nssl_key = <{certs.key}\n",
    )
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def relay_postern(workroot, certs, tls_dovecot):
    d = tls_dovecot
    config = {
        "log": {"level": "info"},
        "tls": {"cert": str(certs.cert), "key": str(certs.key)},
        "limits": {"trusted_networks": ["127.0.0.1"]},
        "routing": {"store": "static", "static": {ALICE: "plain", BOB: "tls"}},
        "health": {"enabled": False},
        "backends": {
            "plain": {"host": "127.0.0.1", "imap": {"port": d.imap_port}},
            "tls": {
                "host": "127.0.0.1",
                "imap": {"port": d.imap_port, "tls": "starttls"},
                "tls": {"ca": str(certs.ca), "name": "localhost"},
            },
        },
        "listeners": [
            {"name": "imap", "protocol": "imap", "bind": "127.0.0.1:0", "tls": "starttls"},
            {"name": "imaps", "protocol": "imap", "bind": "127.0.0.1:0", "tls": "implicit"},
            {"name": "imap-plain", "protocol": "imap", "bind": "127.0.0.1:0", "tls": "none",
             "insecure_plaintext_auth": True},
        ],
    }
    p = Postern(workroot / "relay-postern", config).start()
    yield p
    p.stop()


def connect(p: Postern, client: str, certs) -> imaplib.IMAP4:
    if client == "plain":
        return SourceIMAP4(*p.addr("imap-plain"), timeout=60)
    if client == "tls":
        return SourceIMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context(), timeout=60)
    m = SourceIMAP4(*p.addr("imap"), timeout=60)
    m.starttls(ssl_context=certs.client_context())
    return m


PATHS = [
    # (client side, user: whose backend connection is plaintext or TLS)
    ("plain", ALICE),
    ("tls", ALICE),
    ("starttls", ALICE),
    ("plain", BOB),
    ("tls", BOB),
]


@pytest.mark.parametrize(
    "client,user", PATHS,
    ids=[f"{c}-to-{'tls' if u == BOB else 'plain'}" for c, u in PATHS],
)
def test_20mb_append_and_fetch_are_byte_identical(
    relay_postern, tls_dovecot, certs, message, client, user
):
    m = connect(relay_postern, client, certs)
    assert m.login(user, USERS[user])[0] == "OK"
    box = f"relay-{client}-{user.split('@')[0]}"
    m.create(box)
    typ, data = m.append(box, None, None, message)
    assert typ == "OK", data
    uid = re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1).decode()
    assert m.select(box)[0] == "OK"
    typ, data = m.uid("FETCH", uid, "(BODY.PEEK[])")
    assert typ == "OK"
    body = data[0][1]
    assert len(body) == len(message)
    assert hashlib.sha256(body).digest() == hashlib.sha256(message).digest()
    m.logout()
    if user == BOB:
        # The backend hop really was TLS.
        assert re.search(rf"Login: user=<{re.escape(BOB)}>.*TLS", tls_dovecot.log())


# --- slow reader ---------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def stored(tls_dovecot, message):
    """The 20 MB message in ALICE's mailbox `slow`, APPENDed straight to Dovecot."""
    m = imaplib.IMAP4("127.0.0.1", tls_dovecot.imap_port, timeout=60)
    m.login(ALICE, USERS[ALICE])
    m.create("slow")
    typ, data = m.append("slow", None, None, message)
    assert typ == "OK", data
    uid = re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1).decode()
    m.logout()
    return uid


@pytest.mark.parametrize("client", ["plain", "tls"])
def test_slow_reader_gets_everything_and_postern_memory_stays_flat(
    relay_postern, certs, message, stored, client
):
    sock = socket.create_connection(relay_postern.addr(
        "imap-plain" if client == "plain" else "imaps"), timeout=60)
    if client == "tls":
        sock = certs.client_context().wrap_socket(sock, server_hostname="localhost")
    reader = LineReader(sock)
    assert reader.line().startswith(b"* OK")
    sock.sendall(f"a LOGIN {ALICE} {USERS[ALICE]}\r\n".encode())
    while not reader.line().startswith(b"a OK"):
        pass
    sock.sendall(b"b SELECT slow\r\n")
    while not reader.line().startswith(b"b "):
        pass
    pid = relay_postern.proc.pid
    before = rss_kib(pid)
    sock.sendall(f"c UID FETCH {stored} (BODY.PEEK[])\r\n".encode())
    line = reader.line()
    size = int(re.search(rb"\{(\d+)\}\r\n$", line).group(1))
    assert size == len(message)
    # 5 MB/s: far slower than Dovecot and Postern go, so every buffer between them and
    # us fills and stays full for the whole transfer.
    rate = 5e6
    got = bytearray(reader.take())
    peak = before
    start = time.monotonic()
    while len(got) < size:
        chunk = sock.recv(min(65536, size - len(got)))
        assert chunk, "closed early"
        got += chunk
        if len(got) % (1 << 20) < len(chunk):
            peak = max(peak, rss_kib(pid))
        ahead = len(got) / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
    reader.buf = b""
    while not reader.line().startswith(b"c OK"):
        pass
    assert hashlib.sha256(got).digest() == hashlib.sha256(message).digest()
    # Postern held at most a few buffers of this session, not the message.
    assert peak - before < 4096, f"Postern grew {peak - before} KiB while relaying 20 MB"
    sock.sendall(b"d LOGOUT\r\n")
    sock.close()


class LineReader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "closed"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def take(self) -> bytes:
        out, self.buf = self.buf, b""
        return out


# --- half-close ----------------------------------------------------------------------


class HalfCloseBackend:
    """Just enough IMAP for Postern's backend login (AUTHENTICATE PLAIN with SASL-IR,
    ID, LOGIN with literals), then, on `x HALFCLOSE N`, waits for the end of the
    client's stream, sends N bytes and a tagged OK, and closes."""

    GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN ID] fake\r\n"

    def __init__(self, payload: bytes):
        self.payload = payload
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.saw_eof = threading.Event()
        self.errors: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        try:
            conn.sendall(self.GREETING)
            buf = b""
            while True:
                while b"\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                line, _, buf = buf.partition(b"\r\n")
                lit = re.search(rb"\{(\d+)(\+?)\}$", line)
                while lit:  # LOGIN with literals
                    if not lit.group(2):
                        conn.sendall(b"+ OK\r\n")
                    n = int(lit.group(1))
                    while len(buf) < n + 2 or b"\r\n" not in buf[n:]:
                        buf += conn.recv(65536)
                    rest, _, buf = buf[n:].partition(b"\r\n")
                    line = line + b" literal " + rest
                    lit = re.search(rb"\{(\d+)(\+?)\}$", rest)
                tag, _, rest = line.partition(b" ")
                verb = rest.split(b" ")[0].upper()
                if verb == b"CAPABILITY":
                    conn.sendall(b"* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN ID\r\n"
                                 + tag + b" OK done\r\n")
                elif verb == b"ID":
                    conn.sendall(b"* ID NIL\r\n" + tag + b" OK done\r\n")
                elif verb in (b"LOGIN", b"AUTHENTICATE"):
                    conn.sendall(tag + b" OK [CAPABILITY IMAP4rev1] Logged in\r\n")
                elif verb == b"HALFCLOSE":
                    # Postern must pass the client's shutdown on as ours to read.
                    while True:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                    self.saw_eof.set()
                    conn.sendall(self.payload)
                    conn.sendall(tag + b" OK sent after your end of stream\r\n")
                    conn.shutdown(socket.SHUT_WR)
                    return
                else:
                    conn.sendall(tag + b" BAD unknown\r\n")
        except OSError as e:
            self.errors.append(repr(e))
        finally:
            conn.close()

    def close(self):
        self.listener.close()


@pytest.fixture(scope="module")
def halfclose(workroot, certs):
    payload = make_message(SIZE, seed=11)
    backend = HalfCloseBackend(payload)
    config = {
        "log": {"level": "info"},
        "tls": {"cert": str(certs.cert), "key": str(certs.key)},
        "limits": {"trusted_networks": ["127.0.0.1"]},
        "routing": {"store": "static", "static": {ALICE: "fake"}},
        "health": {"enabled": False},
        "backends": {"fake": {"host": "127.0.0.1", "imap": {"port": backend.port}}},
        "listeners": [
            {"name": "imaps", "protocol": "imap", "bind": "127.0.0.1:0", "tls": "implicit"},
            {"name": "imap-plain", "protocol": "imap", "bind": "127.0.0.1:0", "tls": "none",
             "insecure_plaintext_auth": True},
        ],
    }
    p = Postern(workroot / "relay-halfclose", config).start()
    yield p, backend
    p.stop()
    backend.close()


class BioTls:
    """TLS over a socket we keep control of (Python's SSLSocket.shutdown drops TLS), so
    the client can shut down its TCP write side and go on reading TLS records."""

    def __init__(self, sock, ctx: ssl.SSLContext):
        self.sock = sock
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname="localhost")
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def _flush(self):
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if data:
            self.inc.write(data)
            return True
        self.inc.write_eof()
        return False

    def sendall(self, data: bytes):
        self.obj.write(data)
        self._flush()

    def recv(self, n: int) -> bytes:
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""


@pytest.mark.parametrize("client", ["plain", "tls"])
def test_client_half_close_reaches_the_backend_and_its_remaining_bytes_arrive(
    halfclose, certs, client
):
    p, backend = halfclose
    backend.saw_eof.clear()
    sock = socket.create_connection(
        p.addr("imap-plain" if client == "plain" else "imaps"), timeout=60)
    conn = BioTls(sock, certs.client_context()) if client == "tls" else sock
    reader = LineReader(conn)
    assert reader.line().startswith(b"* OK")
    auth = base64.b64encode(f"\0{ALICE}\0{USERS[ALICE]}".encode()).decode()
    conn.sendall(f"a AUTHENTICATE PLAIN {auth}\r\n".encode())
    while not reader.line().startswith(b"a OK"):
        pass
    conn.sendall(b"h HALFCLOSE\r\n")
    # Our end of stream: TCP FIN only (with TLS, no close_notify: as many clients do).
    sock.shutdown(socket.SHUT_WR)
    got = bytearray(reader.take())
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        got += chunk
    assert backend.saw_eof.wait(10), "the backend never saw the client's end of stream"
    tail = b"h OK sent after your end of stream\r\n"
    assert bytes(got[-len(tail):]) == tail
    body = bytes(got[:-len(tail)])
    assert len(body) == len(backend.payload)
    assert hashlib.sha256(body).digest() == hashlib.sha256(backend.payload).digest()
    assert not backend.errors
    sock.close()
    p.wait_log(r"session ended reason=\"?closed")
