"""Postern's lifecycle against real Dovecot and real clients: reload (SIGHUP) under live
sessions, a refused reload, listeners added and removed by a reload, certificates
reloaded and chosen by SNI, and graceful shutdown (SIGTERM): pre-auth goodbyes,
relayed sessions running on through the grace period, exit status 0."""

import imaplib
import poplib
import shutil
import signal
import socket
import ssl
import subprocess
import time

import pytest

from conftest import USERS
from harness import REPO
from harness.net import read_until
from imap_client import SourceIMAP4, SourceIMAP4_SSL, backend_id

ALICE, BOB = "alice@example.test", "bob@example.test"


def hup(p):
    p.proc.send_signal(signal.SIGHUP)


def reloads(p, n):
    """Waits for the n-th successful reload's log line."""
    p.wait_log(rf"configuration reloaded generation={n + 1}")


def greeting(addr) -> bytes:
    with socket.create_connection(addr, timeout=10) as s:
        return read_until(s, b"\r\n", timeout=10)


def new_cert(directory):
    """A fresh throwaway CA and a certificate for localhost, by the tests' script."""
    subprocess.run([str(REPO / "scripts" / "gen-certs.sh"), str(directory)], check=True)
    return directory


def issuer_of(addr, server_name="localhost") -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(addr, timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            return tls.getpeercert(binary_form=True)


# --- reload ----------------------------------------------------------------------------


def test_reload_keeps_live_sessions_and_applies_the_new_config(make_postern):
    p = make_postern()
    live = SourceIMAP4(*p.addr("imap-plain"))
    assert live.login(ALICE, USERS[ALICE])[0] == "OK"
    assert live.select("INBOX")[0] == "OK"
    assert b"Postern ready." in greeting(p.addr("imap-plain"))

    p.config["imap"] = {"greeting": "Reloaded and ready."}
    p.write_config()
    hup(p)
    reloads(p, 1)

    # The live session goes on, on its backend, untouched.
    assert live.noop()[0] == "OK"
    assert live.select("INBOX")[0] == "OK"
    assert "postern-backend-b1" in backend_id(live)
    # New connections, on the same socket, get the new configuration.
    assert b"Reloaded and ready." in greeting(p.addr("imap-plain"))
    m = SourceIMAP4(*p.addr("imap-plain"))
    assert m.login(BOB, USERS[BOB])[0] == "OK"
    m.logout()
    live.logout()
    p.wait_log(r"SIGHUP: reloading the configuration")


def test_a_bad_config_is_refused_and_the_old_one_stays(make_postern):
    p = make_postern()
    live = SourceIMAP4(*p.addr("imap-plain"))
    assert live.login(ALICE, USERS[ALICE])[0] == "OK"
    good = p.config_path.read_text()

    p.config_path.write_text(good + "\n[no_such_section]\nx = 1\n")
    hup(p)
    p.wait_log(r"reload refused.*no_such_section")
    # A certificate that does not exist: refused too.
    p.config["tls"] = {"cert": "/nonexistent/cert.pem", "key": "/nonexistent/key.pem"}
    p.write_config()
    hup(p)
    p.wait_log(r"reload refused.*nonexistent")

    assert live.noop()[0] == "OK"
    m = SourceIMAP4(*p.addr("imap-plain"))
    assert m.login(BOB, USERS[BOB])[0] == "OK"
    m.logout()
    assert "configuration reloaded" not in p.log()
    assert p.proc.poll() is None


def test_reload_adds_and_removes_listeners(make_postern):
    p = make_postern()
    pop3 = p.addr("pop3")
    live = SourceIMAP4(*p.addr("imap-plain"))
    assert live.login(ALICE, USERS[ALICE])[0] == "OK"

    p.config["listeners"] = [l for l in p.config["listeners"] if l["name"] != "pop3"]
    p.config["listeners"].append(
        {"name": "imap-extra", "protocol": "imap", "bind": "127.0.0.1:0", "tls": "none",
         "insecure_plaintext_auth": True})
    p.write_config()
    hup(p)
    reloads(p, 1)
    m = p.wait_log(r"listening listener=imap-extra proto=imap addr=127\.0\.0\.1:(\d+)")
    extra = ("127.0.0.1", int(m.group(1)))
    c = SourceIMAP4(*extra)
    assert c.login(BOB, USERS[BOB])[0] == "OK"
    c.logout()
    p.wait_log(r"listener closed by reload listener=pop3 ")
    with pytest.raises(OSError):
        poplib.POP3(*pop3, timeout=5).getwelcome()
    assert live.noop()[0] == "OK"
    live.logout()


def test_reload_rereads_certificates_and_sni_picks_them(make_postern, certs, workdir):
    p = make_postern()
    imaps = p.addr("imaps")
    before = issuer_of(imaps)
    live = SourceIMAP4_SSL(*imaps, ssl_context=certs.client_context())
    assert live.login(ALICE, USERS[ALICE])[0] == "OK"

    # A second throwaway CA: its certificate for SNI name other.test, and a new
    # default certificate written over the old files' paths.
    other = new_cert(workdir / "other-ca")
    renewed = workdir / "renewed"
    renewed.mkdir()
    new_cert(renewed)
    default_cert, default_key = workdir / "default.pem", workdir / "default.key"
    shutil.copy(certs.cert, default_cert)
    shutil.copy(certs.key, default_key)
    p.config["tls"] = {
        "cert": str(default_cert),
        "key": str(default_key),
        "sni": {"other.test": {"cert": str(other / "cert.pem"), "key": str(other / "key.pem")},
                "*.wild.test": {"cert": str(other / "cert.pem"),
                                "key": str(other / "key.pem")}},
    }
    p.write_config()
    hup(p)
    reloads(p, 1)
    assert issuer_of(imaps) == before  # same files, same certificate
    # By SNI: the other CA's certificate verifies against the other CA only.
    for name in ["other.test", "a.wild.test"]:
        ctx = ssl.create_default_context(cafile=str(other / "ca.pem"))
        ctx.check_hostname = False
        with socket.create_connection(imaps, timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.recv(100).startswith(b"* OK")
    # Unknown names and no name get the default.
    assert issuer_of(imaps, "nobody.test") == before
    ctx = ssl.create_default_context(cafile=str(other / "ca.pem"))
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection(imaps, timeout=10) as raw:
            ctx.wrap_socket(raw, server_hostname="localhost")

    # Renewal: new files at the same paths, then SIGHUP.
    shutil.copy(renewed / "cert.pem", default_cert)
    shutil.copy(renewed / "key.pem", default_key)
    hup(p)
    reloads(p, 2)
    assert issuer_of(imaps) != before
    ctx = ssl.create_default_context(cafile=str(renewed / "ca.pem"))
    with socket.create_connection(imaps, timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.recv(100).startswith(b"* OK")
    # The session opened on the old certificate runs on.
    assert live.noop()[0] == "OK"
    live.logout()


# --- shutdown --------------------------------------------------------------------------


def raw_preauth(addr, proto):
    s = socket.create_connection(addr, timeout=10)
    first = read_until(s, b"\r\n", timeout=10)
    assert first.startswith(b"* OK" if proto == "imap" else b"+OK" if proto == "pop3"
                            else b"220"), first
    return s


def rest(s, timeout=10) -> bytes:
    s.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = s.recv(4096)
        except (ConnectionResetError, socket.timeout):
            return out
        if not chunk:
            return out
        out += chunk


def test_sigterm_says_goodbye_before_login_and_lets_relayed_sessions_finish(
        make_postern, postfixes, cluster, certs, workdir):
    from harness.postern import smtp_config

    def edit(c):
        smtp = smtp_config(cluster, postfixes, certs, workdir)
        c["backends"] = smtp["backends"]
        c["server"] = smtp["server"]
        c["listeners"] += [
            l for l in smtp["listeners"] if l["name"] in ("submission", "mx")]
        c["timeouts"] = {"shutdown_grace": "20s"}

    p = make_postern(edit)
    live = SourceIMAP4(*p.addr("imap-plain"))
    assert live.login(ALICE, USERS[ALICE])[0] == "OK"
    imap = raw_preauth(p.addr("imap-plain"), "imap")
    pop3 = raw_preauth(p.addr("pop3"), "pop3")
    sub = raw_preauth(p.addr("submission"), "smtp")
    mx = raw_preauth(p.addr("mx"), "smtp")

    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    assert rest(imap) == b"* BYE Server shutting down.\r\n"
    assert rest(pop3) == b"-ERR Server shutting down.\r\n"
    assert rest(sub) == b"421 4.3.2 postern.example.test Service shutting down\r\n"
    assert rest(mx) == b"421 4.3.2 postern.example.test Service shutting down\r\n"
    # No new connections.
    p.wait_log(r"shutting down: listeners closed")
    with pytest.raises(OSError):
        greeting(p.addr("imap-plain"))
    # The relayed session goes on within the grace period.
    assert live.select("INBOX")[0] == "OK"
    assert live.noop()[0] == "OK"
    live.logout()
    # Its end is the last thing Postern waited for: it exits at once, status 0.
    assert p.proc.wait(timeout=10) == 0
    assert time.monotonic() - t0 < 15
    assert "grace period over" not in p.log()


def test_sigterm_closes_relayed_sessions_when_the_grace_period_ends(make_postern):
    p = make_postern(lambda c: c.update(timeouts={"shutdown_grace": "2s"}))
    live = SourceIMAP4(*p.addr("imap-plain"))
    assert live.login(ALICE, USERS[ALICE])[0] == "OK"
    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(timeout=15) == 0
    took = time.monotonic() - t0
    assert 1.5 < took < 10, took
    p.wait_log(r"grace period over.*sessions=1")
    with pytest.raises((imaplib.IMAP4.abort, OSError)):
        live.noop()
