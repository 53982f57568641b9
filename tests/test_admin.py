"""The admin HTTP listener against a real Postern in front of real Dovecot: Prometheus
metrics after real logins, the JSON access log, every API endpoint (and the token),
kicking a live IMAP session, drain, reload through the API and `postern reload`, and
the HTML status page rendered by headless Chromium."""

import base64
import imaplib
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import USERS
from harness import REPO
from harness.postern import base_config
from harness.net import read_until
from imap_client import Raw, SourceIMAP4_SSL

ALICE, BOB = "alice@example.test", "bob@example.test"
TOKEN = "adm1n-T0ken-4F"


def api(p, path, method="GET", token=None, headers=None):
    """One admin request; returns (status, body text)."""
    req = urllib.request.Request(p.admin_url + path, method=method, headers=headers or {})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if method == "POST":
        req.data = b""
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def api_json(p, path, method="GET", token=None, status=200):
    code, body = api(p, path, method, token)
    assert code == status, f"{method} {path}: {code} {body}"
    return json.loads(body)


@pytest.fixture
def make_admin(cluster, certs, workdir, make_postern):
    """make_postern with an [admin] section (keys from `admin`) plus `edit`."""

    def make(admin=True, edit=None, **kw):
        def both(c):
            c["admin"] = base_config(cluster, certs, workdir, admin=admin)["admin"]
            if edit:
                edit(c)

        return make_postern(both, **kw)

    return make


def login(p, certs, user=ALICE, listener="imaps"):
    m = SourceIMAP4_SSL(*p.addr(listener), ssl_context=certs.client_context())
    m.login(user, USERS[user])
    return m


def metric(text, name, **labels):
    """The value of one sample of the Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-z_]+)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return 0.0


def test_metrics_count_real_logins(make_admin, certs):
    p = make_admin()
    m = login(p, certs)
    m.select("INBOX")
    m.logout()
    bad = SourceIMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
    with pytest.raises(imaplib.IMAP4.error):
        bad.login(ALICE, "wrong-password")
    bad.logout()
    # The session's end (bytes, relayed gauge) is recorded just after the client
    # sees the connection close.
    deadline = time.monotonic() + 10
    while True:
        code, text = api(p, "/metrics")
        assert code == 200
        if metric(text, "postern_relayed_bytes_total", protocol="imap", direction="backend_to_client") > 0:
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.1)
    assert metric(text, "postern_logins_total", protocol="imap", result="accepted") == 1
    assert metric(text, "postern_logins_total", protocol="imap", result="refused") == 1
    assert metric(text, "postern_auth_failures_total", protocol="imap") == 1
    assert metric(text, "postern_connections_total", protocol="imap", listener="imaps") == 2
    assert metric(text, "postern_tls_handshakes_total", result="ok") >= 2
    assert metric(text, "postern_relayed_bytes_total", protocol="imap", direction="client_to_backend") > 0
    assert metric(text, "postern_backend_up", backend="b1", protocol="imap") == 1
    assert metric(text, "postern_backend_up", backend="b2", protocol="pop3") == 1
    assert metric(text, "postern_config_generation") == 1
    assert metric(text, "postern_route_lookups_total", result="miss") >= 1
    assert metric(text, "postern_route_store_lookup_seconds_count") >= 1
    assert 'postern_route_store_lookup_seconds_bucket{le="+Inf"}' in text
    assert "# TYPE postern_sessions gauge" in text and "# EOF" not in text
    assert metric(text, "postern_sessions", protocol="imap", listener="imaps", state="relayed") == 0
    assert USERS[ALICE] not in text


def test_access_log_line_after_an_imap_session(make_admin, certs, workdir):
    log = workdir / "access.log"
    p = make_admin(edit=lambda c: c["log"].update(access=str(log)))
    m = login(p, certs)
    m.select("INBOX")
    m.logout()
    deadline = time.monotonic() + 10
    while not (log.exists() and log.read_text().strip()):
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.05)
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 1, text
    e = lines[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["timestamp"])
    assert re.fullmatch(r"[0-9a-f]{16}", e["session"])
    assert e["protocol"] == "imap" and e["listener"] == "imaps"
    assert e["client_ip"] == "127.0.0.1" and e["client_port"] > 0
    assert e["tls"] == "TLSv1_3"
    assert e["user"] == ALICE and e["backend"] == "b1"
    assert e["result"] == "relayed" and e["reason"] == "closed"
    assert e["login"] == "accepted" and e["login_attempts"] == 1
    assert e["bytes_in"] > 0 and e["bytes_out"] > 0
    assert e["duration"] >= 0
    assert USERS[ALICE] not in text
    # The session id is the one in the human-readable log.
    assert e["session"] in p.log()
    # A failed login shows as such (and still no password).
    bad = SourceIMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
    with pytest.raises(imaplib.IMAP4.error):
        bad.login(BOB, "not-" + USERS[BOB])
    bad.logout()
    deadline = time.monotonic() + 10
    while len(log.read_text().splitlines()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    e = json.loads(log.read_text().splitlines()[1])
    assert e["result"] == "not_relayed" and e["login"] == "refused"
    assert USERS[BOB] not in log.read_text()
    # Rotation: move the file away, reload; the next session end writes a new file.
    rotated = log.with_suffix(".1")
    log.rename(rotated)
    assert api_json(p, "/api/reload", method="POST")["generation"] == 2
    login(p, certs, user=BOB).logout()
    deadline = time.monotonic() + 10
    while not (log.exists() and log.read_text().strip()):
        assert time.monotonic() < deadline, "the access log was not reopened"
        time.sleep(0.05)
    assert json.loads(log.read_text())["user"] == BOB
    assert len(rotated.read_text().splitlines()) == 2


def test_endpoints_and_the_token(make_admin, certs):
    p = make_admin(admin={"token": TOKEN})
    # Probes are open; everything else needs the token.
    assert api(p, "/healthz") == (200, "ok\n")
    ready = api_json(p, "/readyz")
    assert ready["ready"] is True and ready["problems"] == []
    for path in ["/", "/metrics", "/api/backends", "/api/status", "/api/sessions"]:
        assert api(p, path)[0] == 401, path
        assert api(p, path, token="wrong")[0] == 401, path
        assert api(p, path, token=TOKEN)[0] == 200, path
    assert api(p, "/api/kick?user=alice", method="POST")[0] == 401
    assert api(p, "/api/reload", method="POST")[0] == 401
    assert api(p, "/api/backends/b1/drain", method="POST")[0] == 401
    basic = base64.b64encode(f"admin:{TOKEN}".encode()).decode()
    assert api(p, "/api/backends", headers={"Authorization": f"Basic {basic}"})[0] == 200
    code, html = api(p, "/", token=TOKEN)
    assert code == 200 and "<title>Postern status</title>" in html

    backends = {b["name"]: b for b in api_json(p, "/api/backends", token=TOKEN)["backends"]}
    assert set(backends) == {"b1", "b2"}
    b1 = backends["b1"]
    assert b1["pool"] == "default" and b1["weight"] == 1 and b1["admin_state"] == "normal"
    # Unknown until the first check answers (routable meanwhile), then up.
    assert b1["services"]["imap"]["up"] is True
    assert b1["services"]["pop3"]["state"] in ("unknown", "up")
    deadline = time.monotonic() + 10
    while b1["services"]["pop3"]["state"] != "up":
        assert time.monotonic() < deadline, b1
        time.sleep(0.1)
        b1 = api_json(p, "/api/backends", token=TOKEN)["backends"][0]
    assert b1["services"]["pop3"]["last_error"] is None
    assert b1["pinned_users"] == 1 and b1["sessions"] == 0

    m = login(p, certs)
    sessions = api_json(p, "/api/sessions?user=Alice", token=TOKEN)
    assert sessions["count"] == 1
    s = sessions["sessions"][0]
    assert s["user"] == ALICE and s["backend"] == "b1" and s["protocol"] == "imap"
    assert api_json(p, "/api/sessions?user=bob", token=TOKEN)["count"] == 0
    assert api_json(p, "/api/sessions", token=TOKEN)["count"] == 1
    assert api_json(p, "/api/backends", token=TOKEN)["backends"][0]["sessions"] == 1
    m.logout()

    route = api_json(p, "/api/routes/Alice", token=TOKEN)
    assert route["user"] == ALICE and route["backend"] == "b1" and route["source"] == "pinned"
    assert route["address"].startswith("127.0.0.1:")
    route = api_json(p, "/api/routes/bob%40example.test?protocol=pop3", token=TOKEN)
    assert route["backend"] == "b2" and route["protocol"] == "pop3"
    nobody = api_json(p, "/api/routes/nobody", token=TOKEN, status=404)
    assert nobody["reason"] == "no_route" and nobody["backend"] is None
    assert api(p, "/api/routes/alice?protocol=gopher", token=TOKEN)[0] == 400
    assert api(p, "/api/nothing", token=TOKEN)[0] == 404
    assert api(p, "/api/kick?user=alice", token=TOKEN)[0] == 405
    assert api(p, "/api/kick", method="POST", token=TOKEN)[0] == 400
    assert api(p, "/api/backends/nowhere/drain", method="POST", token=TOKEN)[0] == 404
    assert TOKEN not in p.log()


def test_kick_ends_a_live_imap_session(make_admin, certs):
    p = make_admin()
    m = login(p, certs)
    m.select("INBOX")
    other = login(p, certs, user=BOB)
    kicked = api_json(p, "/api/kick?user=ALICE", method="POST")
    assert kicked == {"user": ALICE, "kicked": 1}
    with pytest.raises((imaplib.IMAP4.abort, OSError, EOFError)):
        for _ in range(20):
            m.noop()
            time.sleep(0.1)
    # Bob was not touched.
    assert other.noop()[0] == "OK"
    deadline = time.monotonic() + 5
    while api_json(p, "/api/sessions?user=alice")["count"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    other.logout()
    # A kicked user may log in again at once.
    login(p, certs).logout()


def test_kicked_sessions_get_the_protocols_goodbye(make_admin, certs):
    p = make_admin()
    imap = Raw(p.addr("imap-plain"))
    imap.send(f"a LOGIN {ALICE} {USERS[ALICE]}\r\n".encode())
    assert b"a OK" in imap.until(b"a OK")
    imap.send(b"b SELECT INBOX\r\nc IDLE\r\n")
    assert b"+ idling" in imap.until(b"+ idling")
    pop = socket.create_connection(p.addr("pop3s"), timeout=15)
    pop = certs.client_context().wrap_socket(pop, server_hostname="localhost")
    read_until(pop, b"\r\n")
    pop.sendall(f"USER {ALICE}\r\nPASS {USERS[ALICE]}\r\n".encode())
    assert b"+OK Logged in" in read_until(pop, b"Logged in")
    deadline = time.monotonic() + 10
    while api_json(p, "/api/sessions?user=alice")["count"] < 2:
        assert time.monotonic() < deadline, "both sessions relayed"
        time.sleep(0.05)
    assert api_json(p, "/api/kick?user=alice", method="POST")["kicked"] == 2
    # An IMAP client in IDLE reads BYE [UNAVAILABLE], then the close.
    rest = imap.until(b"reconnect.\r\n")
    assert b"* BYE [UNAVAILABLE] Session ended by the server, please reconnect.\r\n" in rest, rest
    assert imap.sock.recv(100) == b""
    got = read_until(pop, b"reconnect.\r\n")
    assert b"-ERR [SYS/TEMP] Session ended by the server, please reconnect.\r\n" in got, got
    p.wait_log(r"session ended.*reason=\"?kicked")


def test_drain_and_undrain(make_admin, certs):
    p = make_admin()
    assert api_json(p, "/api/backends/b1/drain", method="POST") == {
        "backend": "b1",
        "admin_state": "drain",
    }
    b1 = api_json(p, "/api/backends")["backends"][0]
    assert b1["name"] == "b1" and b1["admin_state"] == "drain"
    assert b1["services"]["imap"]["state"] == "draining"
    # As `postern backend drain`: the state is in the database.
    assert re.search(r"b1\s+default\s+1\s+drain", p.cli("backend", "list").stdout)
    # A pinned own-storage user still reaches the draining backend.
    m = login(p, certs)
    m.logout()
    assert api_json(p, "/api/backends/b1/undrain", method="POST")["admin_state"] == "normal"
    assert api_json(p, "/api/backends")["backends"][0]["admin_state"] == "normal"
    assert re.search(r"b1\s+default\s+1\s+normal", p.cli("backend", "list").stdout)


def test_reload_through_the_api_and_the_cli(make_admin, certs):
    p = make_admin(admin={"token": TOKEN})
    assert api_json(p, "/api/status", token=TOKEN)["generation"] == 1
    # A new listener, through the API.
    p.config["listeners"].append(
        {"name": "imap-extra", "protocol": "imap", "bind": "127.0.0.1:0", "tls": "implicit"}
    )
    p.write_config()
    assert api_json(p, "/api/reload", method="POST", token=TOKEN) == {"ok": True, "generation": 2}
    status = api_json(p, "/api/status", token=TOKEN)
    assert status["generation"] == 2
    extra = [l for l in status["listeners"] if l["name"] == "imap-extra"]
    assert extra and extra[0]["address"].startswith("127.0.0.1:")
    host, port = extra[0]["address"].rsplit(":", 1)
    m = SourceIMAP4_SSL(host, int(port), ssl_context=certs.client_context())
    m.login(ALICE, USERS[ALICE])
    m.logout()
    # `postern reload` validates the file and asks the server (with the token).
    assert "port 0" in p.cli("reload").stderr
    admin_addr = p.admin_url.removeprefix("http://")
    r = p.cli("reload", "--admin", admin_addr)
    assert r.returncode == 0, r.stderr
    assert "reloaded: generation 3" in r.stdout
    code, text = api(p, "/metrics", token=TOKEN)
    assert metric(text, "postern_reloads_total", result="ok") == 2
    assert metric(text, "postern_config_generation") == 3
    # A file that does not validate is refused by the CLI before asking the server...
    p.config["listeners"][0]["tls"] = "sometimes"
    r = p.cli("reload", "--admin", admin_addr)
    assert r.returncode != 0 and "sometimes" in r.stderr
    # ...and by the server when it gets there anyway: the old configuration stays.
    refused = api_json(p, "/api/reload", method="POST", token=TOKEN, status=422)
    assert refused["ok"] is False and refused["generation"] == 3 and "sometimes" in refused["error"]
    code, text = api(p, "/metrics", token=TOKEN)
    assert metric(text, "postern_reloads_total", result="error") == 1
    login(p, certs).logout()


def test_operator_marks_survive_a_reload(make_admin):
    """`postern backend up` and `backend down` marks across two `postern reload`s: the
    old `up` stamp is not taken for a new one (which would forget that b1's checks
    keep failing), and b2 stays down without being marked (and its sessions kicked)
    again."""

    def edit(c):
        c["health"] = {"interval": "300ms", "timeout": "1s", "rise": 2, "fall": 2,
                       "startup_grace": "0s"}
        # b1's checks log in with a wrong password: they keep it DOWN.
        c["backends"]["b1"]["health"] = {"probe_user": BOB, "probe_password": "not-it"}

    p = make_admin(edit=edit)
    b1_down = re.compile(r"backend DOWN.*backend=\"?b1\b.*protocol=imap")
    p.wait_log(b1_down.pattern, timeout=20)
    assert p.cli("backend", "up", "b1").returncode == 0
    p.wait_log(r"backend health reset by the operator backend=\"?b1", timeout=20)
    # Forgotten, then down again by its checks.
    deadline = time.monotonic() + 20
    while len(b1_down.findall(p.log())) < 2:
        assert time.monotonic() < deadline, p.log()[-2000:]
        time.sleep(0.1)
    assert p.cli("backend", "down", "b2").returncode == 0
    p.wait_log(r"backend marked down backend=\"?b2", timeout=20)
    admin_addr = p.admin_url.removeprefix("http://")
    for generation in (2, 3):
        r = p.cli("reload", "--admin", admin_addr)
        assert r.returncode == 0 and f"reloaded: generation {generation}" in r.stdout, r.stderr
    backends = {b["name"]: b for b in api_json(p, "/api/backends")["backends"]}
    assert backends["b2"]["admin_state"] == "down", backends["b2"]
    assert backends["b1"]["services"]["imap"]["state"] == "down", backends["b1"]
    # Every stored state applied by the reloaded generation (as its change-log
    # follower does each tick), b1's old `up` stamp among them: a sync point.
    assert api(p, "/api/backends/b2/drain", method="POST")[0] == 200
    log = p.log()
    assert log.count("backend health reset by the operator") == 1, log[-3000:]
    assert len(re.findall(r"backend marked down backend=\"?b2", log)) == 1
    assert len(re.findall(r"backend state set by the operator backend=\"?b2\"? state=\"?down",
                          log)) == 1
    backends = {b["name"]: b for b in api_json(p, "/api/backends")["backends"]}
    assert backends["b1"]["services"]["imap"]["state"] == "down", backends["b1"]


def test_reload_cli_needs_an_admin_section(make_postern):
    p = make_postern(start=False)
    r = p.cli("reload")
    assert r.returncode != 0 and "no [admin] section" in r.stderr


def test_non_loopback_admin_needs_a_token(make_postern):
    def edit(c):
        c["admin"] = {"bind": "0.0.0.0:0"}

    p = make_postern(edit, start=False, seed=False)
    r = p.cli("check")
    assert r.returncode != 0 and "admin.token" in r.stderr
    tokens = p.dir / "admin.token"
    tokens.write_text(TOKEN + "\n")
    p.config["admin"]["token_file"] = str(tokens)
    assert p.cli("check").returncode == 0


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed for the status page test (Debian: apt-get install chromium)")


def browser(*args, timeout=90):
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_status_page_in_chromium(make_admin, certs, workdir):
    p = make_admin()
    # Live numbers: one relayed session now, logins counted.
    login(p, certs).logout()
    bad = SourceIMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
    with pytest.raises(imaplib.IMAP4.error):
        bad.login(BOB, "wrong")
    bad.logout()
    live = login(p, certs, user=BOB)
    api_json(p, "/api/backends/b1/drain", method="POST")
    # The JS runs in virtual time: the first fetch, then refreshes every 2 s.
    r = browser("--virtual-time-budget=5000", "--dump-dom", p.admin_url + "/")
    dom = r.stdout
    assert 'data-backend="b1"' in dom and 'data-backend="b2"' in dom, r.stderr[-2000:]
    row = lambda name: re.search(rf'<tr class="backend[^"]*" data-backend="{name}">(.*?)</tr>', dom).group(1)
    b1, b2 = row("b1"), row("b2")
    assert re.search(r'class="backend drain" data-backend="b1"', dom)
    svc = lambda row, p: re.search(rf'data-field="svc-{p}" title="127.0.0.1:\d+">(\w+)<', row).group(1)
    assert svc(b1, "imap") == "DRAINING" and svc(b1, "pop3") == "DRAINING"
    assert svc(b2, "imap") == "UP" and svc(b2, "pop3") == "UP"
    assert '<td data-field="sessions">1</td>' in b2
    assert '<td data-field="pinned">1</td>' in b1
    imap = re.search(r'data-protocol="imap">(.*?)</tr>', dom).group(1)
    assert '<td data-field="logins-accepted">2</td>' in imap
    assert '<td data-field="logins-refused">1</td>' in imap
    assert '<td data-field="relayed">1</td>' in imap
    assert re.search(r'id="generation">1<', dom)
    refreshes = int(re.search(r'data-refreshes="(\d+)"', dom).group(1))
    assert refreshes >= 2, "the page did not refresh itself"
    assert 'id="error" style="display: none;"' in dom or "cannot reach" not in dom
    shot = workdir / "status-page.png"
    r = browser(
        "--virtual-time-budget=3000",
        "--window-size=1280,720",
        f"--screenshot={shot}",
        p.admin_url + "/",
    )
    assert shot.exists() and shot.stat().st_size > 10_000, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if (REPO / "docs" / "img").is_dir() and __import__("os").environ.get("POSTERN_UPDATE_SCREENSHOT"):
        shutil.copy(shot, REPO / "docs" / "img" / "status-page.png")
    live.logout()


def test_access_log_line_of_an_mx_session(cluster, postfixes, certs, workdir, make_postern):
    import smtplib

    from harness.postern import smtp_config

    log = workdir / "access-mx.log"

    def edit(c):
        smtp = smtp_config(cluster, postfixes, certs, workdir)
        c["backends"] = smtp["backends"]
        c["server"] = smtp["server"]
        c["listeners"] += [l for l in smtp["listeners"] if l["name"] == "mx"]
        c["log"]["access"] = str(log)

    p = make_postern(edit)
    message = "Subject: access log\r\n\r\n" + "x" * 5000 + "\r\n"
    with smtplib.SMTP(*p.addr("mx"), timeout=30) as s:
        s.sendmail("sender@example.org", [BOB], message)
    deadline = time.monotonic() + 10
    while not (log.exists() and log.read_text().strip()):
        assert time.monotonic() < deadline, "no access log line"
        time.sleep(0.05)
    e = json.loads(log.read_text().splitlines()[0])
    assert e["protocol"] == "smtp" and e["listener"] == "mx"
    assert e["backend"] == "b2" and e["user"] is None
    assert e["result"] == "relayed" and e["reason"] in ("quit", "logout", "closed"), e
    # The whole message came from the client; replies went back.
    assert e["bytes_in"] > 5000 and 0 < e["bytes_out"] < 5000, e
