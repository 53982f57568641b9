"""Authentication modes: `proxy` (Postern checks the password against the route store's
hash, made by Dovecot's own `doveadm pw`, then logs in to the backend as a master user,
with XCLIENT LOGIN=, or with the same credentials). Real Dovecot and Postfix behind
Postern; the passwords Postern checks differ from the backends' on purpose, so a login
that works proves which side judged it."""

import base64
import imaplib
import poplib
import smtplib
import statistics
import subprocess
import time

import pytest

from conftest import USERS
from harness.dovecot import Cluster
from harness.postern import Postern, base_config, smtp_config
from imap_client import SourceIMAP4

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"
# What Postern's store knows: not the backends' passwords.
PROXY_PW = {ALICE: "alice-proxy-pw", BOB: "bob-proxy-pw", CAROL: "carol-proxy-pw"}
SCHEMES = {ALICE: "SHA512-CRYPT", BOB: "BLF-CRYPT", CAROL: "ARGON2ID"}
MASTER, MASTER_PW = "postern-master", "master-Secret-8K"


def doveadm_pw(scheme: str, password: str) -> str:
    out = subprocess.run(["doveadm", "pw", "-s", scheme, "-p", password],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def users_sql(rows: dict[str, tuple[str, str]]) -> str:
    sql = "CREATE TABLE mail_users (username TEXT PRIMARY KEY, backend TEXT, password TEXT);"
    for user, (backend, stored) in rows.items():
        sql += f"INSERT INTO mail_users VALUES ('{user}', '{backend}', '{stored}');"
    return sql


def proxy_edit(extra=None):
    def edit(c):
        c["auth"] = {"mode": "proxy"}
        c["routing"]["sql"]["lookup_query"] = (
            "SELECT backend, password FROM mail_users WHERE username = ?"
        )
        if extra:
            extra(c)

    return edit


def start_proxy(make, workdir, edit, rows=None):
    p = make(edit, start=False)
    if rows is None:
        rows = {u: (b, doveadm_pw(SCHEMES[u], PROXY_PW[u]))
                for u, b in ((ALICE, "b1"), (BOB, "b2"), (CAROL, "b1"))}
    sql = workdir / "users.sql"
    sql.write_text(users_sql(rows))
    p.cli("db", "seed", str(sql), check=True)
    return p.start()


def master_users(d) -> str:
    (d.dir / "master-users").write_text(f"{MASTER}:{{PLAIN}}{MASTER_PW}\n")
    return (
        "auth_master_user_separator = *\n"
        "passdb {\n  driver = passwd-file\n  master = yes\n  pass = yes\n"
        f"  args = scheme=PLAIN {d.dir / 'master-users'}\n}}\n"
    )


@pytest.fixture
def master_cluster(workdir):
    c = Cluster(workdir / "mc", USERS, extra=master_users).start()
    yield c
    c.stop()


@pytest.fixture
def make_on(certs, workdir):
    """A Postern factory in front of a given cluster."""
    started = []

    def make(cluster, edit=None, start=False):
        config = base_config(cluster, certs, workdir)
        if edit:
            edit(config)
        p = Postern(workdir / f"postern{len(started)}", config)
        started.append(p)
        return p.start() if start else p

    yield make
    for p in started:
        p.stop()


@pytest.mark.parametrize("style", ["separator", "authzid"])
def test_proxy_mode_logs_in_as_master_user(make_on, master_cluster, workdir, certs, style):
    def master(c):
        c["auth"]["master"] = {"user": MASTER, "password": MASTER_PW, "style": style}

    p = start_proxy(lambda e, start: make_on(master_cluster, e), workdir, proxy_edit(master))
    for user in (ALICE, BOB, CAROL):
        m = SourceIMAP4(*p.addr("imap-plain"))
        assert m.login(user, PROXY_PW[user])[0] == "OK", user
        assert m.select("INBOX")[0] == "OK"
        m.logout()
    deadline = time.monotonic() + 10
    while True:
        logins = master_cluster["b1"].logins() + master_cluster["b2"].logins()
        if {ALICE, BOB, CAROL} <= set(logins) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert ALICE in logins and BOB in logins and CAROL in logins, logins
    # The backend's own password no longer works through Postern: Postern judged it.
    m = SourceIMAP4(*p.addr("imap-plain"))
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        m.login(ALICE, USERS[ALICE])
    p.wait_log(r"wrong password \(proxy authentication\)")
    # POP3 too (STLS listener: use POP3S).
    c = poplib.POP3_SSL(*p.addr("pop3s"), context=certs.client_context())
    c.user(BOB)
    assert c.pass_(PROXY_PW[BOB]).startswith(b"+OK")
    c.quit()
    log = p.log()
    for secret in list(PROXY_PW.values()) + [MASTER_PW, USERS[ALICE]]:
        assert secret not in log


def test_proxy_mode_with_same_credentials(make_postern, cluster, workdir):
    # The store holds hashes of the backends' real passwords: both sides check.
    rows = {ALICE: ("b1", doveadm_pw("SSHA256", USERS[ALICE])),
            BOB: ("b2", doveadm_pw("MD5-CRYPT", USERS[BOB]))}
    p = start_proxy(lambda e, start: make_postern(e, start=False), workdir, proxy_edit(), rows)
    before = len(cluster["b1"].log())
    m = SourceIMAP4(*p.addr("imap-plain"))
    with pytest.raises(imaplib.IMAP4.error):
        m.login(ALICE, "wrong")
    # A wrong password never reaches the backend.
    assert "auth failed" not in cluster["b1"].log()[before:]
    m = SourceIMAP4(*p.addr("imap-plain"))
    assert m.login(ALICE, USERS[ALICE])[0] == "OK"
    m.logout()
    m = SourceIMAP4(*p.addr("imap-plain"))
    assert m.login(BOB, USERS[BOB])[0] == "OK"
    m.logout()


def test_unknown_user_costs_as_much_as_a_wrong_password(make_postern, workdir):
    rows = {CAROL: ("b1", doveadm_pw("ARGON2ID", PROXY_PW[CAROL]))}

    def edit(c):
        proxy_edit()(c)
        c["auth"]["dummy_scheme"] = "ARGON2ID"

    p = start_proxy(lambda e, start: make_postern(e, start=False), workdir, edit, rows)

    def attempt(user):
        m = SourceIMAP4(*p.addr("imap-plain"))
        start = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error):
            m.login(user, "wrong")
        secs = time.monotonic() - start
        m.shutdown()
        return secs

    attempt(CAROL)  # warm up
    wrong = statistics.median(attempt(CAROL) for _ in range(5))
    unknown = statistics.median(attempt("nobody@example.test") for _ in range(5))
    # Argon2ID with Dovecot's cost takes tens of milliseconds at least; without the
    # stand-in check an unknown user would be answered in well under a millisecond.
    assert wrong > 0.02, wrong
    assert unknown > wrong * 0.5, (unknown, wrong)


def test_unusable_stored_hash_is_refused_and_logged(make_postern, workdir):
    rows = {ALICE: ("b1", "{NOSUCH}c2VjcmV0"), BOB: ("b2", "{SHA512-CRYPT}$6$short")}
    p = start_proxy(lambda e, start: make_postern(e, start=False), workdir, proxy_edit(), rows)
    for user in (ALICE, BOB):
        m = SourceIMAP4(*p.addr("imap-plain"))
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            m.login(user, "secret")
    p.wait_log("stored password cannot be checked")
    assert "c2VjcmV0" not in p.log() and "$6$short" not in p.log()


def test_submission_proxy_mode_uses_xclient_login(make_postern, cluster, postfixes, certs,
                                                   workdir):
    def edit(c):
        smtp = smtp_config(cluster, postfixes, certs, workdir)
        c["backends"] = smtp["backends"]
        c["server"] = smtp["server"]
        c["listeners"] += [l for l in smtp["listeners"] if l["name"] == "submission"]
        proxy_edit()(c)

    p = start_proxy(lambda e, start: make_postern(e, start=False), workdir, edit)
    s = smtplib.SMTP(*p.addr("submission"), timeout=20)
    s.starttls(context=certs.client_context())
    s.login(ALICE, PROXY_PW[ALICE])  # not the password Postfix/Dovecot know
    s.sendmail(ALICE, [BOB], "Subject: proxy auth\r\n\r\nvia XCLIENT LOGIN\r\n")
    s.quit()
    postfixes["b1"].wait_log(r"sasl_username=alice@example.test")
    s = smtplib.SMTP(*p.addr("submission"), timeout=20)
    s.starttls(context=certs.client_context())
    with pytest.raises(smtplib.SMTPAuthenticationError):
        s.login(ALICE, USERS[ALICE])
    s.close()


def test_oauth_tokens_still_go_to_the_backend_in_proxy_mode(make_postern, cluster, workdir):
    def edit(c):
        proxy_edit()(c)
        c["imap"] = {"oauth": True}

    p = start_proxy(lambda e, start: make_postern(e, start=False), workdir, edit)
    m = SourceIMAP4(*p.addr("imap-plain"))
    msg = f"user={ALICE}\x01auth=Bearer not-a-real-token\x01\x01".encode()
    with pytest.raises(imaplib.IMAP4.error):
        m.authenticate("XOAUTH2", lambda _: msg)
    # Refused by the backend (which has no oauth2 passdb), not by Postern's hash check.
    p.wait_log("login refused by backend")
    assert "wrong password (proxy authentication)" not in p.log()


@pytest.mark.parametrize("edit,error", [
    (lambda c: c.update(auth={"mode": "proxy"}), "lookup_query"),
    (lambda c: c.update(auth={"mode": "http"}), "[auth.http]"),
    (lambda c: c.update(auth={"dummy_scheme": "ROT13"}), "auth.dummy_scheme"),
    (lambda c: c.update(auth={"master": {"user": "m"}}), "password"),
])
def test_auth_config_errors(make_postern, edit, error):
    p = make_postern(edit, seed=False, start=False)
    r = p.cli("check")
    assert r.returncode != 0 and error in r.stderr, r.stderr
