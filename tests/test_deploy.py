"""The packaging in deploy/: the systemd unit (checked by systemd-analyze, offline),
the Docker image and compose topology (no Docker engine here: parsed and cross-checked
file by file), and the compose backends' real configurations, run for real: the
MariaDB init SQL in a private MariaDB, the backend Dovecot configuration with its SQL
passdb, the Postfix configuration through postconf, and Postern with the compose
postern.toml in front of them (addresses and paths rewritten to this machine)."""

import imaplib
import ipaddress
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from harness import REPO
from harness.dovecot import Dovecot
from harness.net import free_port
from harness.postern import Postern, binary
from imap_client import backend_id

SYSTEMD = REPO / "deploy" / "systemd"
DOCKER = REPO / "deploy" / "docker"
BACKEND = DOCKER / "backend"
MAIL_PORTS = {25, 110, 143, 465, 587, 993, 995}
DEMO_PASSWORD = "demo"
POSTERN_IP = "172.28.89.10"


# ---------------------------------------------------------------- systemd


def unit_entries(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]} (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def service() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in unit_entries(SYSTEMD / "postern.service")["Service"]:
        out.setdefault(k, []).append(v)
    return out


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for n, u in re.findall(r"(\d+)\s*([a-z]*)", value):
        total += int(n) * units[u or "s"]
    return total


def verifiable_unit(tmp: Path, text: str | None = None) -> Path:
    """The unit with the binary path pointing at the built Postern, so that
    systemd-analyze can check the executable exists."""
    text = text if text is not None else (SYSTEMD / "postern.service").read_text()
    path = tmp / "postern.service"
    path.write_text(text.replace("/usr/local/bin/postern", str(binary())))
    return path


def systemd_analyze(*args: str) -> subprocess.CompletedProcess:
    assert shutil.which("systemd-analyze"), (
        "systemd-analyze is not installed (scripts/install-deps.sh installs systemd)")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60)


def test_systemd_unit_verifies_offline(tmp_path):
    r = systemd_analyze("verify", str(verifiable_unit(tmp_path)))
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_systemd_verify_would_catch_a_typo(tmp_path):
    """The check above means something: a misspelt hardening key is reported."""
    text = (SYSTEMD / "postern.service").read_text().replace("ProtectSystem=", "ProtectSystm=")
    r = systemd_analyze("verify", str(verifiable_unit(tmp_path, text)))
    assert "ProtectSystm" in r.stdout + r.stderr


def test_systemd_unit_is_hardened(tmp_path):
    s = service()
    one = {k: v[-1] for k, v in s.items()}
    assert one["User"] == "postern" or one.get("DynamicUser") == "yes"
    assert one["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert one["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    for key, want in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "KillSignal": "SIGTERM",
        "StateDirectory": "postern",
    }.items():
        assert one[key] == want, key
    assert set(one["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in s["SystemCallFilter"]
    assert int(one["LimitNOFILE"]) >= 1 << 20
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # Longer than any sensible shutdown grace (relayed sessions draining).
    assert seconds(one["TimeoutStopSec"]) >= 90
    # systemd's own scoring of the sandbox: 0 (locked down) .. 10 (exposed).
    r = systemd_analyze("security", "--offline=yes", str(verifiable_unit(tmp_path)))
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m and float(m.group(1)) <= 2.0, r.stdout[-3000:]


def test_systemd_commands_exist_in_the_cli():
    """ExecStartPre/ExecStart name subcommands and flags the binary really has."""
    s = service()
    for line in s["ExecStartPre"] + s["ExecStart"]:
        argv = shlex.split(line.lstrip("-+!@:").replace("${POSTERN_CONFIG}", "/nonexistent"))
        assert argv[0] == "/usr/local/bin/postern"
        sub = argv[1]
        assert sub in ("check", "run")
        r = subprocess.run([str(binary()), sub, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "--config" in r.stdout, r.stderr
    assert "check" in s["ExecStartPre"][0]
    assert s["Environment"] == ["POSTERN_CONFIG=/etc/postern/postern.toml"]


def test_sysusers_and_tmpfiles_snippets_apply(tmp_path):
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        assert shutil.which(tool), f"{tool} is not installed (scripts/install-deps.sh)"
    (tmp_path / "usr/lib/sysusers.d").mkdir(parents=True)
    (tmp_path / "usr/lib/tmpfiles.d").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    shutil.copy(SYSTEMD / "postern.sysusers", tmp_path / "usr/lib/sysusers.d/postern.conf")
    shutil.copy(SYSTEMD / "postern.tmpfiles", tmp_path / "usr/lib/tmpfiles.d/postern.conf")
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}"], check=True, capture_output=True)
    passwd = (tmp_path / "etc/passwd").read_text()
    m = re.search(r"^postern:x:(\d+):(\d+):[^:]*:/var/lib/postern:/usr/sbin/nologin$", passwd, re.M)
    assert m, passwd
    subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create"], check=True,
                   capture_output=True)
    st = (tmp_path / "etc/postern").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, int(m.group(2)), 0o750)


# ---------------------------------------------------------------- Docker


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """Instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def copy_sources(instructions, context: Path) -> list[Path]:
    sources = []
    for word, args in instructions:
        if word in ("COPY", "ADD") and "--from=" not in args:
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            sources += [context / p for p in parts[:-1]]
    return sources


def dockerignored(rel: str) -> bool:
    patterns = [line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    return any(rel == p or rel.startswith(p + "/") for p in patterns)


def test_postern_dockerfile():
    ins = dockerfile(DOCKER / "Dockerfile")
    froms = [a for w, a in ins if w == "FROM"]
    assert len(froms) == 2 and froms[0].startswith("rust:") and " AS build" in froms[0]
    assert froms[1] == "debian:bookworm-slim"
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert "cargo build --release --locked -p postern" in runs
    assert "ca-certificates" in runs
    users = [a for w, a in ins if w == "USER"]
    assert users and not users[-1].startswith(("root", "0"))
    exposed = {int(p) for w, a in ins if w == "EXPOSE" for p in a.split()}
    assert MAIL_PORTS <= exposed
    assert any(w == "HEALTHCHECK" for w, _ in ins)
    for src in copy_sources(ins, REPO):
        assert src.exists(), src
        assert not dockerignored(str(src.relative_to(REPO))), src
    # The build context keeps what cargo needs and drops the build output.
    for needed in ("Cargo.toml", "Cargo.lock", "crates", "config/postern.toml"):
        assert (REPO / needed).exists() and not dockerignored(needed), needed
    assert dockerignored("target") and dockerignored(".git")


def test_backend_dockerfile_copies_existing_files():
    ins = dockerfile(BACKEND / "Dockerfile")
    sources = copy_sources(ins, BACKEND)
    assert {p.name for p in sources} >= {"dovecot.conf", "dovecot-sql.conf.ext", "main.cf",
                                         "master.cf", "entrypoint.sh"}
    for src in sources:
        assert src.exists(), src
    assert os.access(BACKEND / "entrypoint.sh", os.X_OK)
    subprocess.run(["bash", "-n", str(BACKEND / "entrypoint.sh")], check=True)
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert "dovecot-mysql" in runs and "postfix" in runs


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_file_structure():
    c = compose()
    services = c["services"]
    assert {"postern", "mariadb", "b1", "b2"} <= set(services)
    declared_volumes = set(c.get("volumes") or {})
    declared_networks = set(c.get("networks") or {})
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        build = svc.get("build")
        if build is not None:
            ctx = DOCKER / (build if isinstance(build, str) else build["context"])
            df = ctx / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            assert ctx.is_dir() and df.is_file(), (name, ctx, df)
        for vol in svc.get("volumes", []):
            src, target = vol.split(":")[:2]
            assert target.startswith("/"), vol
            if src.startswith((".", "/")):
                assert (DOCKER / src).exists(), (name, vol)
            else:
                assert src in declared_volumes, (name, vol)
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for net in svc.get("networks", {}):
            assert net in declared_networks, (name, net)
        for port in svc.get("ports", []):
            host, _, container = str(port).rpartition(":")
            assert int(container) and int(host), port
    # The two backends share ONE maildir volume (the NFS stand-in), from one image.
    assert services["b1"]["volumes"] == services["b2"]["volumes"] == ["vmail:/var/vmail"]
    assert services["b1"]["build"] == services["b2"]["build"] == "./backend"
    assert {services[b]["environment"]["BACKEND_NAME"] for b in ("b1", "b2")} == {"b1", "b2"}
    # Postern publishes the mail ports, runs without root or capabilities, and is given
    # time to drain on stop.
    p = services["postern"]
    assert {int(str(x).rpartition(":")[2]) for x in p["ports"]} == MAIL_PORTS
    assert "./postern.toml:/etc/postern/postern.toml:ro" in p["volumes"]
    assert p["cap_drop"] == ["ALL"] and p["read_only"] is True
    assert p["user"].split(":")[0] != "0"
    assert seconds(p["stop_grace_period"]) >= 90
    for dep in ("mariadb", "b1", "b2"):
        assert dep in p["depends_on"]
    assert p["depends_on"]["mariadb"]["condition"] == "service_healthy"
    assert p["networks"]["mail"]["ipv4_address"] == POSTERN_IP
    subnet = c["networks"]["mail"]["ipam"]["config"][0]["subnet"]
    net = ipaddress.ip_network(subnet)
    for name, svc in services.items():
        ip = (svc.get("networks") or {}).get("mail", {}).get("ipv4_address")
        if ip:
            assert ipaddress.ip_address(ip) in net, name


def test_compose_pieces_agree():
    """Names, passwords and addresses that must match across the compose files."""
    c = compose()
    env = c["services"]["mariadb"]["environment"]
    cfg = tomllib.loads((DOCKER / "postern.toml").read_text())
    url = cfg["routing"]["sql"]["url"]
    assert url == (f"mysql://{env['MARIADB_USER']}:{env['MARIADB_PASSWORD']}@mariadb:3306/"
                   f"{env['MARIADB_DATABASE']}")
    assert cfg["pools"]["default"]["mode"] == "shared"
    assert {b["host"] for b in cfg["backends"].values()} == {"b1", "b2"}
    init = (DOCKER / "mariadb" / "01-mail.sql").read_text()
    sql_conf = (BACKEND / "dovecot-sql.conf.ext").read_text()
    m = re.search(r"user=(\S+) password=(\S+)", sql_conf)
    assert f"'{m.group(1)}'@'%' IDENTIFIED BY '{m.group(2)}'" in init
    assert f"dbname={env['MARIADB_DATABASE']}" in sql_conf
    # Only Postern's fixed address is trusted by the backends.
    assert f"login_trusted_networks = {POSTERN_IP}/32" in (BACKEND / "dovecot.conf").read_text()
    assert f"smtpd_authorized_xclient_hosts = {POSTERN_IP}" in (BACKEND / "main.cf").read_text()
    assert "lmtp:inet:postern:24" in (BACKEND / "main.cf").read_text()
    # The ports Postern uses on the backends are the ones they listen on.
    master = (BACKEND / "master.cf").read_text()
    dovecot = (BACKEND / "dovecot.conf").read_text()
    for b in cfg["backends"].values():
        assert re.search(rf"^{b['smtp']['port']}\s+inet", master, re.M)
        assert re.search(rf"^{b['submission']['port']}\s+inet", master, re.M)
        for proto in ("imap", "pop3", "lmtp"):
            assert f"port = {b[proto]['port']}" in dovecot, proto
    # The certs service writes what [tls] reads, for Postern's user.
    certs = " ".join(c["services"]["certs"]["command"])
    assert "/tls/cert.pem" in certs and "/tls/key.pem" in certs
    assert cfg["tls"] == {"cert": "/etc/postern/tls/cert.pem", "key": "/etc/postern/tls/key.pem"}
    assert c["services"]["postern"]["user"].split(":")[0] in certs


# ------------------------------------------- the compose backends, run for real


def sub(text: str, old: str, new: str) -> str:
    """Replaces `old`, which must be there: a rewrite that silently stops matching
    would test the wrong configuration."""
    assert old in text, old
    return text.replace(old, new)


class DeployBackend(Dovecot):
    """A Dovecot started from deploy/docker/backend/dovecot.conf, with only the
    container's addresses, paths and ports rewritten to a temporary directory."""

    def __init__(self, name, directory, mailroot, db_port, db_name):
        super().__init__(name, directory, mailroot, users={})
        self.db_port, self.db_name = db_port, db_name

    def _render(self) -> Path:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        self.mailroot.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            uid, gid = pwd.getpwnam("mail").pw_uid, pwd.getpwnam("mail").pw_gid
            os.chown(self.mailroot, uid, gid)
            login_user, internal_user = "dovenull", "dovecot"
        else:
            uid, gid = os.getuid(), os.getgid()
            login_user = internal_user = pwd.getpwuid(uid).pw_name
        self.mailroot.chmod(0o755)
        conf = (BACKEND / "dovecot.conf").read_text()
        for old, new in [
            ("listen = *", "listen = 127.0.0.1"),
            ("base_dir = /run/dovecot", f"base_dir = {d}/run"),
            ("state_dir = /var/lib/dovecot", f"state_dir = {d}/state"),
            ("log_path = /dev/stderr", f"log_path = {d}/dovecot.log"),
            (f"login_trusted_networks = {POSTERN_IP}/32", "login_trusted_networks = 127.0.0.0/8"),
            ("default_login_user = dovenull", f"default_login_user = {login_user}"),
            ("default_internal_user = dovecot", f"default_internal_user = {internal_user}"),
            ("first_valid_uid = 5000", f"first_valid_uid = {uid}"),
            ("first_valid_gid = 5000", f"first_valid_gid = {gid}"),
            ("uid=vmail gid=vmail home=/var/vmail/", f"uid={uid} gid={gid} home={self.mailroot}/"),
            ("/etc/dovecot/dovecot-sql.conf.ext", f"{d}/dovecot-sql.conf.ext"),
            ("port = 143", f"port = {self.imap_port}"),
            ("port = 110", f"port = {self.pop3_port}"),
            ("port = 24", f"port = {self.lmtp_port}"),
            ("port = 12345", f"port = {self.auth_port}"),
            ("/etc/dovecot/instance.conf", f"{d}/instance.conf"),
        ]:
            conf = sub(conf, old, new)
        (d / "dovecot.conf").write_text(conf)
        # What the container's entrypoint writes.
        (d / "instance.conf").write_text(
            f"instance_name = dovecot-{self.name}\n"
            f"login_greeting = Dovecot {self.name} ready.\n"
            f"imap_id_send = name postern-backend-{self.name}\n"
        )
        sql = (BACKEND / "dovecot-sql.conf.ext").read_text()
        sql = sub(sql, "host=mariadb", f"host=127.0.0.1 port={self.db_port}")
        sql = sub(sql, "dbname=mail", f"dbname={self.db_name}")
        (d / "dovecot-sql.conf.ext").write_text(sql)
        return d / "dovecot.conf"


@pytest.fixture
def mail_db(mariadb):
    """The compose MariaDB's init SQL, loaded into a fresh database."""
    assert shutil.which("dovecot"), "dovecot is not installed (scripts/install-deps.sh)"
    assert list(Path("/usr/lib/dovecot/modules").glob("libdriver_mysql.so")), (
        "dovecot-mysql is not installed (scripts/install-deps.sh installs it)")
    name = mariadb.new_database(f"mail_{os.getpid()}_{free_port()}")
    mariadb.sql((DOCKER / "mariadb" / "01-mail.sql").read_text(), database=name)
    return name


def test_init_sql_creates_the_users(mariadb, mail_db):
    rows = mariadb.sql("SELECT username, backend, active FROM mailbox ORDER BY username",
                       database=mail_db)
    assert rows.splitlines() == [
        "alice@example.test\tb1\t1", "bob@example.test\tb2\t1", "carol@example.test\tNULL\t1",
    ]


def test_postfix_configuration_is_clean(tmp_path):
    assert shutil.which("postconf"), "postfix is not installed (scripts/install-deps.sh)"
    for f in ("main.cf", "master.cf"):
        shutil.copy(BACKEND / f, tmp_path / f)
    r = subprocess.run(["postconf", "-c", str(tmp_path), "-n"], capture_output=True, text=True)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert "smtpd_sasl_type = dovecot" in r.stdout
    r = subprocess.run(["postconf", "-c", str(tmp_path), "-M"], capture_output=True, text=True)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    services = {tuple(line.split()[:2]) for line in r.stdout.splitlines()}
    assert {("25", "inet"), ("587", "inet"), ("postlog", "unix-dgram")} <= services


@pytest.fixture
def deploy_backends(workdir, mariadb, mail_db):
    backends = {}
    try:
        for name in ("b1", "b2"):
            backends[name] = DeployBackend(name, workdir / name, workdir / "vmail",
                                           mariadb.port, mail_db).start()
        yield backends
    finally:
        for b in backends.values():
            b.stop()


def test_backend_dovecot_authenticates_against_mariadb(deploy_backends):
    b1 = deploy_backends["b1"]
    m = imaplib.IMAP4("127.0.0.1", b1.imap_port)
    m.login("alice@example.test", DEMO_PASSWORD)
    assert "postern-backend-b1" in backend_id(m)
    assert m.select("INBOX")[0] == "OK"
    m.logout()
    m = imaplib.IMAP4("127.0.0.1", b1.imap_port)
    with pytest.raises(imaplib.IMAP4.error):
        m.login("alice@example.test", "wrong")
    assert (b1.mailroot / "example.test" / "alice" / "Maildir").is_dir()


def deploy_postern(workdir, mariadb, mail_db, backends, certs) -> Postern:
    """deploy/docker/postern.toml with the container's addresses replaced by this
    machine's. The SMTP-family listeners are left out: no Postfix runs here."""
    cfg = tomllib.loads((DOCKER / "postern.toml").read_text())
    cfg["tls"] = {"cert": str(certs.cert), "key": str(certs.key)}
    cfg["limits"] = {"trusted_networks": ["127.0.0.1"]}
    cfg["routing"]["sql"]["url"] = mariadb.url(database=mail_db)
    for name, b in cfg["backends"].items():
        d = backends[name]
        b["host"] = "127.0.0.1"
        b["imap"]["port"], b["pop3"]["port"], b["lmtp"]["port"] = (
            d.imap_port, d.pop3_port, d.lmtp_port)
        del b["submission"], b["smtp"]
    cfg["listeners"] = [
        dict(l, bind="127.0.0.1:0") for l in cfg["listeners"]
        if l["protocol"] in ("imap", "pop3", "lmtp")
    ]
    return Postern(workdir / "postern", cfg)


def test_compose_topology_end_to_end(workdir, mariadb, mail_db, deploy_backends, certs):
    """Postern with the compose configuration, the compose MariaDB schema and the
    compose backends' Dovecot: pins come from the operator's `mailbox` table, a user
    without one is assigned and pinned in Postern's own table, logins land where the
    pins say."""
    p = deploy_postern(workdir, mariadb, mail_db, deploy_backends, certs)
    r = p.cli("check")
    assert r.returncode == 0, r.stderr
    assert "mysql" in r.stdout and "unreachable" not in r.stdout, r.stdout
    r = p.cli("route", "Alice")
    assert r.returncode == 0 and "b1" in r.stdout, r.stdout + r.stderr
    p.start()
    try:
        for user, want in (("alice", "b1"), ("bob@example.test", "b2")):
            m = imaplib.IMAP4(*p.addr("imap"))
            m.starttls(ssl_context=certs.client_context())
            m.login(user, DEMO_PASSWORD)
            assert f"postern-backend-{want}" in backend_id(m), user
            m.logout()
        # carol has no backend in `mailbox`: assigned at first login, then pinned.
        m = imaplib.IMAP4_SSL(*p.addr("imaps"), ssl_context=certs.client_context())
        m.login("carol@example.test", DEMO_PASSWORD)
        got = re.search(r"postern-backend-(b\d)", backend_id(m)).group(1)
        m.logout()
        pinned = mariadb.sql("SELECT backend FROM routes WHERE username = 'carol@example.test'",
                             database=mail_db).strip()
        assert pinned == got
    finally:
        assert p.stop() == 0, p.log()[-3000:]
    # Postern created its tables next to the operator's.
    tables = set(mariadb.sql("SHOW TABLES", database=mail_db).split())
    assert {"mailbox", "routes", "route_events", "instances"} <= tables
