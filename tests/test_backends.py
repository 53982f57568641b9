"""Backends: health checks, failover per pool policy, drain and evacuation, client
identity (PROXY protocol out and in, ID), TLS to backends. Real Dovecot processes,
killed (SIGKILL) and restarted by the tests."""

import imaplib
import socket
import struct
import threading
import time

import pytest

from conftest import USERS
from harness.dovecot import Cluster, Dovecot
from harness.net import read_all, read_until
from harness.postern import Postern, base_config
from imap_client import Raw, SourceIMAP4, SourceIMAP4_SSL, backend_id

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"

FAST_HEALTH = {"interval": "300ms", "timeout": "1s", "rise": 2, "fall": 2}


@pytest.fixture
def own_cluster(workdir):
    """Backends of this test alone: they get killed."""
    c = Cluster(workdir / "c", USERS).start()
    yield c
    c.stop()


@pytest.fixture
def start(own_cluster, certs, workdir):
    started = []

    def make(edit=None, seed=True) -> Postern:
        config = base_config(own_cluster, certs, workdir)
        config["health"] = dict(FAST_HEALTH)
        if edit:
            edit(config)
        p = Postern(workdir / f"postern{len(started)}", config)
        if seed:
            p.seed()
        p.start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


def which_backend(p, user, certs):
    m = SourceIMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
    m.login(user, USERS[user])
    name = backend_id(m).split('"')[-2].rsplit("-", 1)[-1]
    m.logout()
    return name


def logged_in(p, user, certs):
    raw = Raw(p.addr("imaps"), certs.client_context())
    assert raw.cmd(f"a LOGIN {user} {USERS[user]}\r\n".encode(), b"a").startswith(b"a OK")
    assert b"b OK" in raw.cmd(b"b SELECT INBOX\r\n", b"b")
    return raw


def until(pred, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = pred()
            if value:
                return value
        except (imaplib.IMAP4.error, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.2)


def pool(mode, failover="repin"):
    def edit(c):
        c["pools"] = {"default": {"mode": mode, "failover": failover}}

    return edit


def test_killed_backend_shared_pool_fails_over_and_repins(start, own_cluster, certs):
    p = start(pool("shared"))
    session = logged_in(p, ALICE, certs)
    # bob (on b2) keeps logging in throughout.
    stop = threading.Event()
    bob_failures = []

    def bob_loop():
        while not stop.is_set():
            try:
                which_backend(p, BOB, certs)
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                bob_failures.append(repr(e))
            time.sleep(0.1)

    t = threading.Thread(target=bob_loop)
    t.start()
    try:
        own_cluster["b1"].kill()
        # The live session ends...
        read_all(session.sock, timeout=15)
        # ...and alice's next logins land on b2 once b1 is seen down.
        until(lambda: which_backend(p, ALICE, certs) == "b2", "failover to b2")
    finally:
        stop.set()
        t.join()
    assert not bob_failures, bob_failures
    p.wait_log("backend DOWN")
    p.wait_log("user re-pinned")
    assert "alice@example.test\tb2" in p.cli("route", "list").stdout
    # b1 comes back healthy; alice stays re-pinned to b2.
    own_cluster["b1"].start()
    p.wait_log("backend UP")
    assert which_backend(p, ALICE, certs) == "b2"


def test_killed_backend_own_storage_users_wait(start, own_cluster, certs):
    p = start(pool("own-storage"))
    own_cluster["b1"].kill()
    p.wait_log("backend DOWN")
    m = SourceIMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
    with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
        m.login(ALICE, USERS[ALICE])
    assert which_backend(p, BOB, certs) == "b2"
    assert "alice@example.test\tb1" in p.cli("route", "list").stdout
    own_cluster["b1"].start()
    until(lambda: which_backend(p, ALICE, certs) == "b1", "alice back on b1")


def test_temporary_failover_hands_users_back(start, own_cluster, certs):
    p = start(pool("shared", "temporary"))
    own_cluster["b1"].kill()
    until(lambda: which_backend(p, ALICE, certs) == "b2", "temporary failover")
    stand_in = logged_in(p, ALICE, certs)
    assert "alice@example.test\tb1" in p.cli("route", "list").stdout  # pin untouched
    own_cluster["b1"].start()
    # When b1 is back, the stand-in session on b2 is ended before alice can be on both.
    read_all(stand_in.sock, timeout=15)
    until(lambda: which_backend(p, ALICE, certs) == "b1", "alice back on b1")


def test_drain_moves_users_and_takes_no_new_ones(start, certs):
    def edit(c):
        pool("shared")(c)
        c["routing"]["unknown_users"] = "assign"

    p = start(edit)
    session = logged_in(p, ALICE, certs)
    r = p.cli("backend", "drain", "b1")
    assert r.returncode == 0, r.stderr
    time.sleep(0.6)  # two watch intervals
    assert "drain" in p.cli("backend", "list").stdout
    # New users are not assigned to b1.
    for i in range(14, 18):
        assert which_backend(p, f"new{i:02}@example.test", certs) == "b2"
    # alice's next login moves her, fenced: her old session is ended first.
    assert which_backend(p, ALICE, certs) == "b2"
    read_all(session.sock, timeout=10)
    p.wait_log("backend draining: user moved")
    assert p.cli("backend", "undrain", "b1").returncode == 0


def test_evacuate_moves_every_pin(start, certs):
    p = start(pool("shared"))
    for user in (CAROL, "new18@example.test", "new19@example.test"):
        assert p.cli("route", "pin", user, "b1").returncode == 0
    session = logged_in(p, CAROL, certs)
    r = p.cli("backend", "evacuate", "b1", "--batch", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 user(s) moved" in r.stdout  # alice, carol, new18, new19
    read_all(session.sock, timeout=10)
    assert "b1" not in p.cli("route", "list", "--backend", "b1").stdout
    assert which_backend(p, CAROL, certs) == "b2"
    assert p.cli("backend", "up", "b1").returncode == 0
    # b1, brought back by `backend up`, takes users again: evacuating b2 moves them
    # there (its state row says "up <time>", which is not "drain" or "down").
    r = p.cli("backend", "evacuate", "b2")
    assert r.returncode == 0 and "user(s) moved" in r.stdout, r.stdout + r.stderr
    assert which_backend(p, CAROL, certs) == "b1"
    assert p.cli("backend", "up", "b2").returncode == 0


def haproxy_listener(d: Dovecot) -> str:
    return f"""
haproxy_trusted_networks = 127.0.0.0/8
service imap-login {{
  inet_listener imap_haproxy {{
    address = {d.address}
    port = {d.haproxy_port}
    haproxy = yes
  }}
}}
"""


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_dovecot_sees_the_client_through_proxy_protocol(workdir, certs, version):
    cluster = Cluster(workdir / "c", USERS, extra=haproxy_listener).start()
    try:
        config = base_config(cluster, certs, workdir)
        for name, b in cluster.backends.items():
            config["backends"][name]["imap"] = {
                "port": b.haproxy_port,
                "proxy_protocol": version,
                "forward_client": "none",  # the address must come from PROXY alone
            }
        p = Postern(workdir / "postern", config)
        p.seed()
        p.start()
        try:
            m = SourceIMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context(), source="127.0.0.2")
            m.login(ALICE, USERS[ALICE])
            m.logout()
            assert "rip=127.0.0.2" in cluster["b1"].wait_log("rip=127.0.0.2")
        finally:
            p.stop()
    finally:
        cluster.stop()


def proxy_v2(src: str, sport: int, dst: str, dport: int) -> bytes:
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    addrs = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return sig + bytes([0x21, 0x11]) + struct.pack("!H", len(addrs)) + addrs


def test_proxy_protocol_in_from_trusted_and_untrusted_peers(start, own_cluster, certs):
    def edit(c):
        c["listeners"][0]["accept_proxy_from"] = ["127.0.0.1/32"]

    p = start(edit)
    host, port = p.addr("imap")
    # From the trusted balancer (127.0.0.1): the announced client is used everywhere,
    # including the address Dovecot is told (ID x-originating-ip).
    for header in (b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 143\r\n",
                   proxy_v2("198.51.100.7", 6666, "127.0.0.1", 143)):
        s = socket.create_connection((host, port), source_address=("127.0.0.1", 0))
        s.sendall(header)
        assert read_until(s, b"\r\n").startswith(b"* OK")
        s.sendall(b"a STARTTLS\r\n")
        assert read_until(s, b"\r\n").startswith(b"a OK")
        s = certs.client_context().wrap_socket(s, server_hostname="localhost")
        s.sendall(f"b LOGIN {ALICE} {USERS[ALICE]}\r\n".encode())
        assert read_until(s, b"\r\n").startswith(b"b OK")
        s.close()
    own_cluster["b1"].wait_log("rip=203.0.113.9")
    log = own_cluster["b1"].wait_log("rip=198.51.100.7")
    assert "rip=203.0.113.9" in log and "rip=198.51.100.7" in log
    p.wait_log(r"client=203\.0\.113\.9:5555 via=127\.0\.0\.1")
    # From anywhere else a PROXY header is refused.
    s = socket.create_connection((host, port), source_address=("127.0.0.2", 0))
    assert read_until(s, b"\r\n").startswith(b"* OK")
    s.sendall(b"PROXY TCP4 6.6.6.6 127.0.0.1 1 143\r\n")
    assert read_all(s) == b""
    p.wait_log("refused: PROXY header from an untrusted address")
    # A trusted peer that sends no header is refused too.
    s = socket.create_connection((host, port), source_address=("127.0.0.1", 0))
    s.sendall(b"a CAPABILITY\r\n")
    assert read_all(s) == b""


def tls_required(d: Dovecot, certs) -> str:
    return f"""
ssl = required
ssl_cert = <{certs.cert}
ssl_key = <{certs.key}
disable_plaintext_auth = yes
login_trusted_networks =
"""


def test_starttls_to_a_backend_that_requires_it(workdir, certs):
    # Dovecot on 127.0.0.3, trusting nobody: from Postern (127.0.0.1) only TLS will do.
    d = Dovecot("tlsonly", workdir / "tlsonly", workdir / "mail", USERS, address="127.0.0.3",
                extra=lambda d: tls_required(d, certs))
    (workdir / "mail").mkdir(mode=0o755, exist_ok=True)
    d.start()
    try:
        def config(tls):
            c = {
                "log": {"level": "info"},
                "tls": {"cert": str(certs.cert), "key": str(certs.key)},
                "routing": {"store": "static", "static": {ALICE: "secure"}},
                "health": {"enabled": False},
                "backends": {"secure": {
                    "host": "127.0.0.3",
                    "imap": {"port": d.imap_port, "tls": tls},
                    "pop3": {"port": d.pop3_port, "tls": tls},
                    "tls": {"ca": str(certs.ca), "name": "localhost"},
                }},
                "listeners": [
                    {"name": "imaps", "protocol": "imap", "bind": "127.0.0.1:0", "tls": "implicit"},
                    {"name": "pop3s", "protocol": "pop3", "bind": "127.0.0.1:0", "tls": "implicit"},
                ],
            }
            return c

        p = Postern(workdir / "starttls", config("starttls")).start()
        try:
            m = SourceIMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
            assert m.login(ALICE, USERS[ALICE])[0] == "OK"
            m.logout()
            import poplib
            pm = poplib.POP3_SSL(*p.addr("pop3s"), context=certs.client_context())
            pm.user(ALICE)
            assert pm.pass_(USERS[ALICE]).startswith(b"+OK")
            pm.quit()
        finally:
            p.stop()
        # The same backend without TLS refuses the credentials: the hop really needed it.
        p = Postern(workdir / "plain", config("none")).start()
        try:
            m = SourceIMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
            with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
                m.login(ALICE, USERS[ALICE])
        finally:
            p.stop()
    finally:
        d.stop()
