"""OAuth bearer tokens (XOAUTH2, OAUTHBEARER) through Postern: the user comes from the
SASL message for routing, the token goes unchanged to a real Dovecot that checks it
against a token introspection endpoint (a small HTTP server of this test), and to a real
Postfix that asks that Dovecot."""

import base64
import imaplib
import json
import poplib
import smtplib
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import USERS
from harness.dovecot import Cluster
from harness.postern import Postern, base_config
from harness.postfix import Postfix

ALICE = "alice@example.test"
GOOD = "tok-alice-0123456789"
LONG = "L" * 3000  # longer than Postfix's 2048-byte command line


class Introspection(BaseHTTPRequestHandler):
    """RFC 7662 token introspection: two tokens are valid for alice."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        token = (form.get("token") or [""])[0]
        self.server.seen.append(token)
        body = {"active": True, "username": ALICE} if token in (GOOD, LONG) else {"active": False}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def idp():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Introspection)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def oauth_stack(workroot, idp, certs):
    root = workroot / "oauth"
    root.mkdir(exist_ok=True)
    conf = root / "oauth2.conf.ext"
    conf.write_text(
        f"introspection_mode = post\n"
        f"introspection_url = http://127.0.0.1:{idp.server_address[1]}/introspect\n"
        "force_introspection = yes\n"
        "username_attribute = username\n"
        "active_attribute = active\n"
        "active_value = true\n"
    )

    def extra(_d):
        return (
            "auth_mechanisms = plain login xoauth2 oauthbearer\n"
            "passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
            f"  args = {conf}\n}}\n"
        )

    cluster = Cluster(root / "c", USERS, count=1, extra=extra).start()
    b1 = cluster["b1"]
    pf = Postfix(
        "ob1",
        root / "pf",
        lmtp_target=f"inet:127.0.0.1:{b1.lmtp_port}",
        sasl_target=f"inet:127.0.0.1:{b1.auth_port}",
    ).start()
    config = base_config(cluster, certs, root)
    config["routing"]["sql"]["url"] = f"sqlite:{root / 'routes.db'}"
    config["imap"] = {"oauth": True}
    config["pop3"] = {"oauth": True}
    config["submission"] = {"oauth": True}
    config["server"] = {"hostname": "postern.example.test"}
    # XCLIENT for the client address, then the token replayed: Postern checks no tokens.
    config["backends"]["b1"]["submission"] = {"port": pf.submission_port, "login": "xclient"}
    config["listeners"].append(
        {"name": "submission", "protocol": "submission", "bind": "127.0.0.1:0", "tls": "starttls"}
    )
    p = Postern(root / "postern", config)
    p.cli("route", "pin", ALICE, "b1", check=True)
    p.start()
    yield p, b1, pf
    p.stop()
    pf.stop()
    cluster.stop()


def xoauth2(user, token):
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(user, token):
    return f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()


def test_imap_xoauth2_and_oauthbearer(oauth_stack, certs):
    p, b1, _ = oauth_stack
    m = imaplib.IMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
    assert "AUTH=XOAUTH2" in m.capabilities and "AUTH=OAUTHBEARER" in m.capabilities
    typ, _ = m.authenticate("XOAUTH2", lambda _: xoauth2(ALICE, GOOD))
    assert typ == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()
    assert ALICE in b1.wait_login(ALICE)

    m = imaplib.IMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
    typ, _ = m.authenticate("OAUTHBEARER", lambda _: oauthbearer(ALICE, LONG))
    assert typ == "OK"
    m.logout()


def test_imap_bad_token_refused_by_the_backend(oauth_stack, certs, idp):
    p, _, _ = oauth_stack
    m = imaplib.IMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
    with pytest.raises(imaplib.IMAP4.error) as e:
        m.authenticate("XOAUTH2", lambda _: xoauth2(ALICE, "forged"))
    assert "forged" in idp.seen, "the backend, not Postern, judged the token"
    assert "forged" not in p.log() and "Bearer" not in p.log(), "tokens never logged"
    assert "AUTHENTICATIONFAILED" in str(e.value) or "failed" in str(e.value).lower()
    m.logout()


def test_pop3_oauthbearer(oauth_stack, certs):
    p, _, _ = oauth_stack
    c = poplib.POP3_SSL(*p.addr("pop3s"), context=certs.client_context())
    assert "XOAUTH2" in c.capa().get("SASL", [])
    msg = base64.b64encode(oauthbearer(ALICE, GOOD)).decode()
    assert c._shortcmd(f"AUTH OAUTHBEARER {msg}").startswith(b"+OK")
    assert c.stat()[0] >= 0
    c.quit()
    c = poplib.POP3_SSL(*p.addr("pop3s"), context=certs.client_context())
    msg = base64.b64encode(xoauth2(ALICE, "forged")).decode()
    with pytest.raises(poplib.error_proto):
        c._shortcmd(f"AUTH XOAUTH2 {msg}")
    c.quit()


def test_submission_tokens_through_postfix(oauth_stack, certs):
    p, _, pf = oauth_stack
    for mech, message in (("XOAUTH2", xoauth2(ALICE, GOOD)), ("OAUTHBEARER", oauthbearer(ALICE, LONG))):
        s = smtplib.SMTP(*p.addr("submission"), timeout=20)
        s.starttls(context=certs.client_context())
        s.ehlo()
        assert mech in s.esmtp_features["auth"]
        code, _ = s.docmd("AUTH", f"{mech} {base64.b64encode(message).decode()}")
        assert code == 235, (mech, code)
        s.sendmail(ALICE, [ALICE], f"Subject: oauth {mech}\r\n\r\nhi\r\n")
        s.quit()
    s = smtplib.SMTP(*p.addr("submission"), timeout=20)
    s.starttls(context=certs.client_context())
    s.ehlo()
    code, _ = s.docmd("AUTH", f"XOAUTH2 {base64.b64encode(xoauth2(ALICE, 'forged')).decode()}")
    assert code == 535
    s.quit()
