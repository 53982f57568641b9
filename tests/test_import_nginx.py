"""`postern import-nginx`: the fixtures in fixtures/nginx/ (the seed's stream config and a
typical mail {} config with auth_http) are imported by the real binary, the generated
file passes `postern check` and runs unchanged in a real Postern in front of real
Dovecot and Postfix, and real clients log in through it.

Only addresses change between the fixture and the imported file: listen ports become
free loopback ports, the upstream servers become the test backends, auth_http becomes
the test's auth server, certificates the test CA's. Everything else is the fixture."""

import re
import shutil
import smtplib
import socket
import ssl
import imaplib
import poplib
import subprocess
import time
import tomllib
from pathlib import Path

from conftest import USERS
from harness import REPO
from harness.net import free_port
from harness.postern import Postern, binary
from imap_client import backend_id
from test_auth_http import HTTP_PW, AuthServer

FIXTURES = REPO / "fixtures" / "nginx"
ALICE, BOB = "alice@example.test", "bob@example.test"


def rebind(text: str) -> tuple[str, dict[str, int]]:
    """Every `listen [ADDR:]PORT` becomes a free loopback port; returns the new text and
    the map original port -> new port."""
    ports = {}

    def sub(m):
        old = m.group(2)
        new = ports.setdefault(old, free_port())
        return f"{m.group(1)}127.0.0.1:{new}"

    text = re.sub(r"(listen\s+)(?:[\w.*]+:)?(\d+)", sub, text)
    return text, {int(k): v for k, v in ports.items()}


def import_nginx(nginx_conf: Path, out: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([str(binary()), "import-nginx", str(nginx_conf), "-o", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r


class Generated(Postern):
    """A Postern running the imported file as written (not rewritten from a dict)."""

    def __init__(self, workdir: Path, config_path: Path):
        super().__init__(workdir, tomllib.loads(config_path.read_text()))
        self.config_path = config_path

    def write_config(self) -> Path:
        return self.config_path


def check(config: Path) -> str:
    r = subprocess.run([str(binary()), "-c", str(config), "check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr + r.stdout
    return r.stdout


def test_seed_stream_config(cluster, postfixes, workdir):
    text = (FIXTURES / "seed-stream.conf").read_text()
    text, ports = rebind(text)
    # The seed's mail servers, told apart by port, are the test's two backends.
    for old, new in {
        1431: cluster["b1"].imap_port, 1432: cluster["b2"].imap_port,
        1101: cluster["b1"].pop3_port, 1102: cluster["b2"].pop3_port,
        251: postfixes["b1"].smtp_port, 252: postfixes["b2"].smtp_port,
    }.items():
        text = text.replace(f"mail.internal:{old} ", f"127.0.0.1:{new} ")
    nginx = workdir / "nginx.conf"
    nginx.write_text(text)
    out = workdir / "postern.toml"
    r = import_nginx(nginx, out)
    assert "per-connection balancing replaced by per-user pins" in r.stderr
    generated = out.read_text()
    assert "#   - " in generated and 'unknown_users = "assign"' in generated
    assert "listener" in check(out)

    p = Generated(workdir, out).start()
    try:
        # Listen ports were not well known: the protocol came from the upstream's name.
        imap_addr = ("127.0.0.1", ports[143])
        m = imaplib.IMAP4(*imap_addr)
        assert m.login(ALICE, USERS[ALICE])[0] == "OK"
        first = backend_id(m)
        m.logout()
        # Pinned at the first login: the next connection goes to the same backend,
        # where nginx's round robin alternated.
        for _ in range(3):
            m = imaplib.IMAP4(*imap_addr)
            m.login(ALICE, USERS[ALICE])
            assert backend_id(m) == first
            m.logout()
        route = subprocess.run([str(binary()), "-c", str(out), "route", ALICE],
                               capture_output=True, text=True, timeout=30)
        assert "pinned" in route.stdout, route.stdout + route.stderr

        c = poplib.POP3("127.0.0.1", ports[110], timeout=20)
        c.user(BOB)
        assert c.pass_(USERS[BOB]).startswith(b"+OK")
        c.quit()

        s = smtplib.SMTP("127.0.0.1", ports[25], timeout=20)
        s.ehlo("sender.example.net")
        assert s.sendmail("someone@example.net", [BOB], "Subject: imported\r\n\r\nhi\r\n") == {}
        s.quit()
        # Delivered by one of the backends' Postfix (which the relay told the real
        # client with XCLIENT), whichever bob's pin or hash chose.
        deadline = time.monotonic() + 20
        sent = re.compile(r"to=<bob@example\.test>.*status=sent")
        while not any(sent.search(pf.log()) for pf in postfixes.values()):
            assert time.monotonic() < deadline, "no delivery to bob logged"
            time.sleep(0.1)
    finally:
        p.stop()


class ProxyIMAP4_SSL(imaplib.IMAP4_SSL):
    """IMAPS that first sends a PROXY v1 header claiming another client address."""

    claimed = "203.0.113.7"

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout)
        sock.sendall(f"PROXY TCP4 {self.claimed} 127.0.0.1 40000 {self.port}\r\n".encode())
        # No pause: the ClientHello may share a segment with the header, as it does
        # behind HAProxy; Postern consumes exactly the header's bytes.
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def test_typical_mail_config_with_auth_http(cluster, postfixes, certs, workdir):
    auth = AuthServer()
    try:
        nginx_dir = workdir / "nginx"
        shutil.copytree(FIXTURES, nginx_dir, ignore=shutil.ignore_patterns("edge"))
        (nginx_dir / "tls").mkdir()
        shutil.copy(certs.cert, nginx_dir / "tls" / "fullchain.pem")
        shutil.copy(certs.key, nginx_dir / "tls" / "privkey.pem")
        ports = {}
        for f in [nginx_dir / "mail-auth-http.conf", *(nginx_dir / "conf.d").glob("*.conf")]:
            text, p = rebind(f.read_text())
            ports.update(p)
            text = text.replace("auth_http 127.0.0.1:9000/mail/auth;", f"auth_http {auth.url};")
            # The L4 balancer in front of IMAPS is the test itself.
            text = text.replace("set_real_ip_from 10.0.0.0/24;", "set_real_ip_from 127.0.0.1;")
            f.write_text(text)
        out = workdir / "postern.toml"
        r = import_nginx(nginx_dir / "mail-auth-http.conf", out)
        assert "imap_capabilities: not mapped" in r.stderr
        assert "conf.d/smtp.conf:6: resolver: not mapped" in r.stderr
        check(out)

        def answer(h):
            user = h["Auth-User"]
            if HTTP_PW.get(user) != h["Auth-Pass"]:
                return [("Auth-Status", "Invalid login or password")]
            if h["Auth-Protocol"] == "smtp":
                # Postern sends XCLIENT LOGIN= only to submission backends declared with
                # login = "xclient" (none is, here: the importer cannot know them), so
                # the auth server returns the password and Postern replays AUTH, as
                # nginx's proxy_smtp_auth on.
                return [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"),
                        ("Auth-Port", str(postfixes["b1"].submission_port)),
                        ("Auth-Pass", USERS[user])]
            port = getattr(cluster["b2"], f"{h['Auth-Protocol']}_port")
            return [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"),
                    ("Auth-Port", str(port)), ("Auth-Pass", USERS[user])]

        auth.answer = answer
        p = Generated(workdir, out).start()
        try:
            ctx = certs.client_context()
            # IMAP, starttls only.
            m = imaplib.IMAP4("127.0.0.1", ports[143])
            m.starttls(ssl_context=ctx)
            assert m.login(ALICE, HTTP_PW[ALICE])[0] == "OK"
            assert "postern-backend-b2" in backend_id(m)
            m.logout()
            _, h = auth.requests[-1]
            assert h["X-Auth-Key"] == "shared secret" and h["Auth-Protocol"] == "imap"
            # IMAPS behind a PROXY-protocol balancer (listen ... proxy_protocol +
            # set_real_ip_from): the auth server sees the client from the header.
            m = ProxyIMAP4_SSL("127.0.0.1", ports[993], ssl_context=ctx)
            assert m.login(BOB, HTTP_PW[BOB])[0] == "OK"
            m.logout()
            assert auth.requests[-1][1]["Client-IP"] == ProxyIMAP4_SSL.claimed
            # POP3S and POP3 with STLS.
            c = poplib.POP3_SSL("127.0.0.1", ports[995], context=ctx, timeout=20)
            c.user(ALICE)
            assert c.pass_(HTTP_PW[ALICE]).startswith(b"+OK")
            c.quit()
            c = poplib.POP3("127.0.0.1", ports[110], timeout=20)
            c.stls(context=ctx)
            c.user(BOB)
            assert c.pass_(HTTP_PW[BOB]).startswith(b"+OK")
            c.quit()
            # Submission with implicit TLS (465-style), then STARTTLS (587-style).
            s = smtplib.SMTP_SSL("127.0.0.1", ports[465], context=ctx, timeout=20)
            s.login(ALICE, HTTP_PW[ALICE])
            s.sendmail(ALICE, [BOB], "Subject: via imported config\r\n\r\nhi\r\n")
            s.quit()
            postfixes["b1"].wait_log(r"sasl_username=alice@example.test")
            s = smtplib.SMTP("127.0.0.1", ports[587], timeout=20)
            s.starttls(context=ctx)
            s.ehlo()
            s.user, s.password = ALICE, "wrong"
            with_wrong = None
            try:
                s.auth("PLAIN", s.auth_plain)
            except smtplib.SMTPAuthenticationError as e:
                with_wrong = e.smtp_code
            assert with_wrong == 535, "refused by the auth server"
            assert auth.requests[-1][1]["Auth-Protocol"] == "smtp"
            s.close()
        finally:
            p.stop()
    finally:
        auth.stop()
