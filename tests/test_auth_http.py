"""auth_http mode: Postern asks an nginx-style auth server (written here on Python's
http.server, a real HTTP stack) and follows its answer exactly as nginx's mail module
does (../shared/docs/nginx-mail.md §2): the request headers, Auth-Server/Port choosing
the backend, Auth-User/Auth-Pass for the backend login, Auth-Wait, WAIT, refusals with
and without a delay, Auth-Error-Code for SMTP. Real Dovecot and Postfix behind."""

import hashlib
import imaplib
import poplib
import smtplib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import USERS
from harness.postern import smtp_config
from imap_client import Raw, SourceIMAP4, backend_id

ALICE, BOB = "alice@example.test", "bob@example.test"
# The passwords the auth server accepts: the backends know others.
HTTP_PW = {ALICE: "alice-http-pw", BOB: "bob-http-pw"}
KEY = "auth-key-4R7"


class AuthServer:
    """Decides by a per-test function `answer(headers) -> list of (name, value)`."""

    def __init__(self):
        self.requests = []
        self.answer = lambda h: [("Auth-Status", "Invalid login or password")]
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                headers = {k: v for k, v in self.headers.items()}
                outer.requests.append((self.path, headers))
                self.send_response(200)
                for name, value in outer.answer(headers):
                    self.send_header(name, value)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mail/auth"

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def auth_server():
    s = AuthServer()
    yield s
    s.stop()


def route_to(cluster, protocol, user_map=None):
    """An answer that accepts HTTP_PW and sends everyone to b2 (whatever the pins say)
    with the backend's real password."""

    def answer(h):
        user = h["Auth-User"]
        if HTTP_PW.get(user) != h["Auth-Pass"]:
            return [("Auth-Status", "Invalid login or password"), ("Auth-Wait", "1")]
        port = getattr(cluster["b2"], f"{protocol}_port")
        out = [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"), ("Auth-Port", str(port)),
               ("Auth-Pass", USERS[user])]
        if user_map:
            out.append(("Auth-User", user_map(user)))
        return out

    return answer


def http_mode(auth_server, extra=None):
    def edit(c):
        c["auth"] = {"mode": "http", "http": {"url": auth_server.url, "timeout": "5s",
                                              "headers": {"X-Auth-Key": KEY}}}
        if extra:
            extra(c)

    return edit


def test_imap_login_goes_where_the_auth_server_says(make_postern, cluster, certs, auth_server):
    auth_server.answer = route_to(cluster, "imap")
    p = make_postern(http_mode(auth_server))
    # alice is pinned to b1; the auth server sends her to b2.
    m = imaplib.IMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
    assert m.login(ALICE, HTTP_PW[ALICE])[0] == "OK"
    assert "postern-backend-b2" in backend_id(m)
    m.logout()
    path, h = auth_server.requests[-1]
    assert path == "/mail/auth"
    assert h["Auth-Method"] == "plain" and h["Auth-User"] == ALICE
    assert h["Auth-Pass"] == HTTP_PW[ALICE] and h["Auth-Protocol"] == "imap"
    assert h["Auth-Login-Attempt"] == "1" and h["Client-IP"] == "127.0.0.1"
    assert h["Auth-SSL"] == "on" and h["Auth-SSL-Protocol"].startswith("TLSv1.")
    assert h["Auth-SSL-Cipher"] and h["X-Auth-Key"] == KEY
    assert h["Host"] == "127.0.0.1"
    assert HTTP_PW[ALICE] not in p.log() and USERS[ALICE] not in p.log()


def test_refusal_with_wait_keeps_the_session_and_counts_attempts(make_postern, cluster,
                                                                 auth_server):
    auth_server.answer = route_to(cluster, "imap")
    p = make_postern(http_mode(auth_server))
    raw = Raw(p.addr("imap-plain"), source="127.0.0.2")
    start = time.monotonic()
    out = raw.cmd(f"a LOGIN {ALICE} wrong\r\n".encode(), b"a")
    assert out == b"a NO Invalid login or password\r\n", out
    assert time.monotonic() - start >= 0.95, "Auth-Wait: 1 delays the answer"
    out = raw.cmd(f'b LOGIN {ALICE} "{HTTP_PW[ALICE]}"\r\n'.encode(), b"b")
    assert out.startswith(b"b OK"), out
    attempts = [h["Auth-Login-Attempt"] for _, h in auth_server.requests]
    assert attempts == ["1", "2"], attempts
    assert auth_server.requests[-1][1]["Client-IP"] == "127.0.0.2"
    raw.close()


def test_refusal_without_wait_closes_like_nginx(make_postern, auth_server):
    auth_server.answer = lambda h: [("Auth-Status", "Account locked")]
    p = make_postern(http_mode(auth_server))
    raw = Raw(p.addr("imap-plain"))
    out = raw.cmd(f"a LOGIN {ALICE} x\r\n".encode(), b"a")
    assert out == b"a NO Account locked\r\n", out
    assert raw.sock.recv(100) == b"", "closed after the refusal"


def test_wait_status_asks_again(make_postern, cluster, auth_server):
    answers = iter([[("Auth-Status", "WAIT"), ("Auth-Wait", "1")]])

    def answer(h):
        return next(answers, None) or route_to(cluster, "imap")(h)

    auth_server.answer = answer
    p = make_postern(http_mode(auth_server))
    m = SourceIMAP4(*p.addr("imap-plain"))
    assert m.login(BOB, HTTP_PW[BOB])[0] == "OK"
    m.logout()
    assert len(auth_server.requests) == 2
    assert [h["Auth-Login-Attempt"] for _, h in auth_server.requests] == ["1", "1"]


def test_auth_user_renames_the_backend_login(make_postern, cluster, auth_server):
    # The client logs in as "alice"; the auth server maps it to the full address.
    def answer(h):
        if h["Auth-User"] != "alice" or h["Auth-Pass"] != HTTP_PW[ALICE]:
            return [("Auth-Status", "Invalid login or password")]
        return [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"),
                ("Auth-Port", str(cluster["b1"].imap_port)), ("Auth-User", ALICE),
                ("Auth-Pass", USERS[ALICE])]

    auth_server.answer = answer
    p = make_postern(http_mode(auth_server, lambda c: c["routing"]["normalize"].pop(
        "default_domain")))
    m = SourceIMAP4(*p.addr("imap-plain"))
    assert m.login("alice", HTTP_PW[ALICE])[0] == "OK"
    m.logout()
    assert ALICE in cluster["b1"].wait_login(ALICE)


def test_pop3_user_pass_and_apop(make_postern, cluster, certs, auth_server):
    ts_seen = []

    def answer(h):
        if h["Auth-Method"] == "apop":
            ts_seen.append(h["Auth-Salt"])
            want = hashlib.md5((h["Auth-Salt"] + HTTP_PW[BOB]).encode()).hexdigest()
            if h["Auth-Pass"] != want:
                return [("Auth-Status", "Invalid login or password")]
            return [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"),
                    ("Auth-Port", str(cluster["b2"].pop3_port)), ("Auth-Pass", USERS[BOB])]
        return route_to(cluster, "pop3")(h)

    auth_server.answer = answer

    def edit(c):
        c["pop3"] = {"apop": True}
        c["listeners"].append({"name": "pop3-plain", "protocol": "pop3", "bind": "127.0.0.1:0",
                               "tls": "none", "insecure_plaintext_auth": True})

    p = make_postern(http_mode(auth_server, edit))
    c = poplib.POP3_SSL(*p.addr("pop3s"), context=certs.client_context())
    c.user(ALICE)
    assert c.pass_(HTTP_PW[ALICE]).startswith(b"+OK")
    c.quit()
    assert auth_server.requests[-1][1]["Auth-Protocol"] == "pop3"
    # APOP: the auth server checks the digest against the salt (no lookup_query needed).
    c = poplib.POP3(*p.addr("pop3-plain"))
    assert c.apop(BOB, HTTP_PW[BOB]).startswith(b"+OK")
    c.quit()
    assert ts_seen and ts_seen[0].startswith("<") and ts_seen[0].endswith(">")


@pytest.mark.parametrize("backends", ["configured", "unknown-to-postern"])
def test_submission_xclient_login_or_error_code(make_postern, cluster, postfixes, certs,
                                                workdir, auth_server, backends):
    """With the backend configured, its `login = "xclient"` applies; with an address
    only the auth server knows, nginx's default `xclient on` does."""
    def answer(h):
        if h["Auth-Pass"] != HTTP_PW[ALICE]:
            return [("Auth-Status", "Bad password"), ("Auth-Error-Code", "535 5.7.8"),
                    ("Auth-Wait", "1")]
        # No Auth-Pass: like nginx without proxy_smtp_auth, the backend gets XCLIENT
        # LOGIN= and no password at all.
        return [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"),
                ("Auth-Port", str(postfixes["b1"].submission_port))]

    auth_server.answer = answer

    def edit(c):
        smtp = smtp_config(cluster, postfixes, certs, workdir)
        c["backends"] = smtp["backends"]
        c["server"] = smtp["server"]
        c["listeners"] += [l for l in smtp["listeners"] if l["name"] == "submission"]
        if backends != "configured":
            c["backends"] = {}
            c["listeners"] = [l for l in c["listeners"] if l["name"] == "submission"]

    p = make_postern(http_mode(auth_server, edit), seed=backends == "configured")
    s = smtplib.SMTP(*p.addr("submission"), timeout=20)
    s.starttls(context=certs.client_context())
    with pytest.raises(smtplib.SMTPAuthenticationError) as e:
        s.login(ALICE, "wrong")
    assert e.value.smtp_code == 535 and b"5.7.8 Bad password" in e.value.smtp_error
    s.login(ALICE, HTTP_PW[ALICE])
    s.sendmail(ALICE, [BOB], "Subject: auth_http\r\n\r\nhi\r\n")
    s.quit()
    assert auth_server.requests[-1][1]["Auth-Protocol"] == "smtp"
    postfixes["b1"].wait_log(r"sasl_username=alice@example.test")


def test_auth_server_down_is_a_temporary_failure(make_postern, auth_server):
    p = make_postern(http_mode(auth_server))
    auth_server.stop()
    auth_server.server.server_close()
    raw = Raw(p.addr("imap-plain"))
    out = raw.cmd(f"a LOGIN {ALICE} x\r\n".encode(), b"a")
    assert out.startswith(b"a NO [UNAVAILABLE]"), out
    assert raw.sock.recv(100) == b""
    p.wait_log("auth_http failed")


def test_garbage_answer_is_a_temporary_failure(make_postern, auth_server):
    auth_server.answer = lambda h: [("Auth-Status", "OK"), ("Auth-Server", "mail.example"),
                                    ("Auth-Port", "143"), ("Auth-Pass", "x")]
    p = make_postern(http_mode(auth_server))
    raw = Raw(p.addr("imap-plain"))
    out = raw.cmd(f"a LOGIN {ALICE} x\r\n".encode(), b"a")
    assert out.startswith(b"a NO [UNAVAILABLE]"), out
    p.wait_log("auth_http failed")


def test_no_backends_configured_the_auth_server_names_them(make_postern, cluster, auth_server):
    # A pure nginx-mail replacement: Postern knows no backend; the auth server does.
    auth_server.answer = route_to(cluster, "imap")

    def edit(c):
        c["backends"] = {}
        c["listeners"] = [l for l in c["listeners"] if l["protocol"] == "imap"]

    p = make_postern(http_mode(auth_server, edit), seed=False)
    m = SourceIMAP4(*p.addr("imap-plain"))
    assert m.login(BOB, HTTP_PW[BOB])[0] == "OK"
    assert "postern-backend-b2" in backend_id(m)
    m.logout()


def test_an_endless_auth_wait_ends_at_the_preauth_deadline(make_postern, auth_server):
    """Auth-Wait may say anything (nginx takes up to u32::MAX seconds); Postern's every
    wait ends at the session's pre-auth deadline, with an answer and a goodbye."""
    auth_server.answer = lambda h: [("Auth-Status", "Invalid login or password"),
                                    ("Auth-Wait", "3600")]

    def edit(c):
        http_mode(auth_server)(c)
        c["timeouts"] = {"preauth": "2s"}

    p = make_postern(edit)
    raw = Raw(p.addr("imap-plain"))
    raw.send(f"a LOGIN {ALICE} x\r\n".encode())
    out = raw.until(b"\r\n* BYE", timeout=30)
    assert out.startswith(b"a NO [UNAVAILABLE]"), out
    rest = out + raw.until(b"\r\n", timeout=10)
    assert b"* BYE Disconnected for inactivity." in rest, rest
    assert raw.sock.recv(100) == b""
    p.wait_log("login did not finish before the pre-auth deadline")
