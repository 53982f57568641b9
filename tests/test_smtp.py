"""The SMTP family through Postern, end to end, against real Postfix and Dovecot:
submission (XCLIENT to Postfix, AUTH replay, implicit TLS, plaintext refusal, STARTTLS
injection), the MX relay (delivery to the pinned backend, recipients on two backends
split by 452, a 20 MB message) and the LMTP front (Postfix delivering through Postern).
Clients: smtplib, swaks, curl, openssl s_client."""

import base64
import hashlib
import imaplib
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from conftest import USERS
from harness.net import read_until
from harness.postern import Postern, smtp_config
from harness.postfix import Postfix
from imap_client import SourceIMAP4_SSL

ALICE, BOB = "alice@example.test", "bob@example.test"


class SourceSMTP(smtplib.SMTP):
    """smtplib.SMTP from a chosen loopback address (the client Postfix must be told of)."""

    def __init__(self, host, port, source="127.0.0.2"):
        super().__init__(host, port, timeout=30, source_address=(source, 0))


@pytest.fixture
def smtp_postern(cluster, postfixes, certs, workdir):
    started = []

    def make(edit=None) -> Postern:
        config = smtp_config(cluster, postfixes, certs, workdir)
        config["health"] = {"interval": "500ms"}
        if edit:
            edit(config)
        p = Postern(workdir / f"postern{len(started)}", config)
        p.seed()
        p.start()
        # Let the checks probe the backends' EHLO first.
        p.wait_log("listening listener=lmtp")
        time.sleep(1.2)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


def marker(tag: str) -> str:
    return hashlib.sha256(f"{tag}-{time.time()}".encode()).hexdigest()[:20]


def message(subject: str, body: bytes = b"hello\r\n") -> bytes:
    return f"From: sender@example.org\r\nSubject: {subject}\r\n\r\n".encode() + body


def inbox_has(postern, user, certs, subject, timeout=20.0) -> bytes:
    """Waits until `subject` is in `user`'s INBOX (via IMAP through Postern); returns
    the message."""
    deadline = time.monotonic() + timeout
    while True:
        m = SourceIMAP4_SSL(*postern.addr("imaps"), ssl_context=certs.client_context())
        m.login(user, USERS[user])
        m.select("INBOX")
        typ, data = m.search(None, "SUBJECT", f'"{subject}"')
        ids = data[0].split()
        if ids:
            _, fetched = m.fetch(ids[-1], "(BODY.PEEK[])")
            m.logout()
            return fetched[0][1]
        m.logout()
        if time.monotonic() > deadline:
            raise AssertionError(f"{subject!r} never reached {user}'s INBOX")
        time.sleep(0.3)


def test_submission_with_xclient_to_postfix(smtp_postern, postfixes, certs):
    p = smtp_postern()
    s = SourceSMTP(*p.addr("submission"))
    s.ehlo("client.example")
    assert not s.has_extn("auth")
    s.starttls(context=certs.client_context())
    s.ehlo("client.example")
    assert s.has_extn("auth") and "XCLIENT" not in s.esmtp_features
    code, _ = s.login(ALICE, USERS[ALICE])
    assert code == 235
    subject = marker("sub-xclient")
    s.sendmail(ALICE, [BOB], message(subject))
    s.quit()
    inbox_has(p, BOB, certs, subject)
    # Postfix saw the real client and the SASL user, not Postern.
    log = postfixes["b1"].wait_log(r"client=unknown\[127\.0\.0\.2\].*sasl_username=alice@example\.test")
    assert log


def test_submission_with_auth_replay(smtp_postern, postfixes, certs):
    def edit(c):
        c["backends"]["b2"]["submission"]["login"] = "auth"

    p = smtp_postern(edit)
    s = smtplib.SMTP_SSL(*p.addr("submissions"), context=certs.client_context(), timeout=30)
    assert s.login(BOB, USERS[BOB])[0] == 235
    subject = marker("sub-auth")
    s.sendmail(BOB, [ALICE], message(subject))
    s.quit()
    inbox_has(p, ALICE, certs, subject)
    postfixes["b2"].wait_log(r"sasl_method=PLAIN, sasl_username=bob@example\.test")


def test_wrong_password_and_plaintext_refusal(smtp_postern, certs):
    p = smtp_postern()
    s = SourceSMTP(*p.addr("submission"))
    s.ehlo("client.example")
    code, text = s.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{ALICE}\0x".encode()).decode())
    assert (code, text[:5]) == (530, b"5.7.0")
    code, _ = s.docmd("MAIL", "FROM:<alice@example.test>")
    assert code == 530
    s.starttls(context=certs.client_context())
    s.ehlo("client.example")
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        s.login(ALICE, "wrong")
    assert e.value.smtp_code == 535


def test_starttls_injection_is_discarded(smtp_postern, postfixes, certs):
    p = smtp_postern()
    sock = socket.create_connection(p.addr("submission"), timeout=20)
    assert read_until(sock, b"\r\n").startswith(b"220")
    sock.sendall(b"EHLO x\r\n")
    read_until(sock, b"250 ")
    ir = base64.b64encode(f"\0{ALICE}\0{USERS[ALICE]}".encode())
    sock.sendall(b"STARTTLS\r\nAUTH PLAIN " + ir + b"\r\n")
    assert read_until(sock, b"\r\n").startswith(b"220")
    sock = certs.client_context().wrap_socket(sock, server_hostname="localhost")
    sock.sendall(b"NOOP\r\n")
    assert read_until(sock, b"\r\n").startswith(b"250")  # not a 235 or 503: nothing ran
    sock.sendall(b"MAIL FROM:<alice@example.test>\r\n")
    assert read_until(sock, b"\r\n").startswith(b"530")
    p.wait_log("discarded plaintext pipelined after STARTTLS")


def test_mx_delivery_reaches_the_pinned_backend(smtp_postern, postfixes, certs):
    p = smtp_postern()
    subject = marker("mx")
    s = SourceSMTP(*p.addr("mx"))
    s.ehlo("mta.example.org")
    assert "auth" not in s.esmtp_features
    s.sendmail("sender@example.org", [ALICE], message(subject))
    s.quit()
    inbox_has(p, ALICE, certs, subject)
    # alice is pinned to b1: b1's Postfix took it, and saw the sending MTA's address.
    postfixes["b1"].wait_log(r"client=mta\.example\.org\[127\.0\.0\.2\]|client=unknown\[127\.0\.0\.2\]")


def test_recipients_on_different_backends_are_split(smtp_postern, postfixes, certs):
    p = smtp_postern()
    subject = marker("split")
    s = SourceSMTP(*p.addr("mx"))
    refused = s.sendmail("sender@example.org", [ALICE, BOB], message(subject))
    # bob is pinned elsewhere: 452 4.5.3, to retry in another transaction.
    assert refused == {BOB: (452, refused[BOB][1])} and refused[BOB][1].startswith(b"4.5.3")
    s.quit()
    s = SourceSMTP(*p.addr("mx"))
    assert s.sendmail("sender@example.org", [BOB], message(subject)) == {}
    s.quit()
    inbox_has(p, ALICE, certs, subject)
    inbox_has(p, BOB, certs, subject)


def test_lmtp_delivery_from_postfix_through_postern(smtp_postern, cluster, workdir, certs):
    p = smtp_postern()
    host, port = p.addr("lmtp")
    front = Postfix(
        "front", workdir / "pf-front", lmtp_target=f"inet:{host}:{port}",
        sasl_target=f"inet:127.0.0.1:{cluster['b1'].auth_port}",
    ).start()
    try:
        subject = marker("lmtp")
        s = smtplib.SMTP("127.0.0.1", front.smtp_port, timeout=30)
        s.sendmail("sender@example.org", [BOB], message(subject))
        s.quit()
        front.wait_log(r"to=<bob@example\.test>.*relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+.*status=sent")
        inbox_has(p, BOB, certs, subject)
        # Postern sent it to bob's backend, b2.
        deadline = time.monotonic() + 10
        while "lmtp(bob@example.test)" not in cluster["b2"].log():
            assert time.monotonic() < deadline, "b2's Dovecot did not deliver"
            time.sleep(0.2)
    finally:
        front.stop()


def test_a_20_mb_message_arrives_byte_identical(smtp_postern, certs):
    p = smtp_postern()
    subject = marker("big")
    lines = [
        (b"%07d " % i) + (b"." if i % 5 == 0 else b"x") + bytes((i * 31 + j) % 94 + 33 for j in range(70))
        for i in range(260_000)
    ]
    body = b"\r\n".join(lines) + b"\r\n"
    msg = message(subject, body)
    assert len(msg) > 20_000_000
    s = SourceSMTP(*p.addr("mx"))
    s.sendmail("sender@example.org", [ALICE], msg)
    s.quit()
    got = inbox_has(p, ALICE, certs, subject, timeout=60)
    # Postfix and Dovecot add trace headers (Received, Return-Path...); the body is
    # byte for byte what was sent, dot-stuffed lines included.
    headers, got_body = got.split(b"\r\n\r\n", 1)
    assert f"Subject: {subject}".encode() in headers
    assert got_body == body


def test_swaks_curl_and_openssl(smtp_postern, certs):
    p = smtp_postern()
    host, port = p.addr("submission")
    r = subprocess.run(
        ["swaks", "--server", f"{host}:{port}", "--tls", "--tls-ca-path", str(certs.ca),
         "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", USERS[ALICE],
         "--from", ALICE, "--to", BOB, "--header", "Subject: swaks", "--timeout", "30"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "235 2.7.0" in r.stdout
    mail = p.dir / "curl-mail.txt"
    mail.write_bytes(message("curl"))
    r = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "--ssl-reqd", "--cacert", str(certs.ca),
         f"smtp://localhost:{port}", "--mail-from", ALICE, "--mail-rcpt", BOB,
         "-u", f"{ALICE}:{USERS[ALICE]}", "-T", str(mail)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-connect", f"{host}:{port}",
         "-CAfile", str(certs.ca), "-verify_return_error", "-quiet", "-crlf"],
        input="EHLO openssl.example\nQUIT\n", capture_output=True, text=True, timeout=30,
    )
    assert "250-AUTH PLAIN LOGIN" in r.stdout or "250 AUTH PLAIN LOGIN" in r.stdout, r.stdout
    assert "221" in r.stdout
