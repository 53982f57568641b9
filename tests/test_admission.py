"""Admission control against a real Dovecot: a backend frozen with SIGSTOP and a cap of
two logins in flight sees at most two of Postern's connections; two more logins wait
in the queue and the rest get `NO [UNAVAILABLE]` at once; the waiters and the stuck
logins get it at the pre-auth deadline. Nobody hangs, and the other backend's users
are served throughout."""

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request

from conftest import USERS
from harness.net import read_until
from imap_client import Raw
from test_backends import own_cluster, start  # noqa: F401  (the fixtures)

ALICE, BOB = "alice@example.test", "bob@example.test"
CAP, QUEUE, CLIENTS = 2, 2, 8


def connections_to(port: int) -> int:
    """Established TCP connections to `port` on this machine (Postern's side of them:
    a frozen Dovecot's kernel still completes the handshakes)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def metric(p, name: str, **labels) -> float:
    text = urllib.request.urlopen(p.admin_url + "/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_frozen_backend_gets_at_most_the_cap_and_the_rest_a_temporary_failure(
    start, own_cluster
):
    def edit(c):
        # No checks: the frozen backend stays routable, so only admission stands
        # between the logins and it.
        c["health"] = {"enabled": False}
        c["timeouts"] = {"preauth": "6s", "backend_login": "30s"}
        c["backends"]["b1"]["admission"] = {"max_in_flight": CAP, "queue": QUEUE}
        c["admin"] = {"bind": "127.0.0.1:0"}

    p = start(edit)
    b1 = own_cluster["b1"]
    port = b1.imap_port
    assert connections_to(port) == 0
    os.killpg(b1.proc.pid, signal.SIGSTOP)
    answers: dict[int, bytes] = {}
    try:
        def client(i):
            s = socket.create_connection(p.addr("imap-plain"), timeout=30)
            read_until(s, b"\r\n")
            s.sendall(f"a{i} LOGIN {ALICE} {USERS[ALICE]}\r\n".encode())
            got = b""
            while not re.search(rb"(^|\n)a%d [^\r]*\r\n" % i, got):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            answers[i] = got
            s.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        # The refusals beyond the queue come at once; wait (bounded) for all of them.
        deadline = time.monotonic() + 5
        while len(answers) < CLIENTS - CAP - QUEUE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(answers) == CLIENTS - CAP - QUEUE, (answers, p.log()[-3000:])
        # Now CAP logins are connected to the frozen backend and QUEUE wait.
        assert connections_to(port) == CAP
        state = json.load(urllib.request.urlopen(p.admin_url + "/api/backends", timeout=10))
        b1_state = next(b for b in state["backends"] if b["name"] == "b1")
        gate = b1_state["services"]["imap"]["admission"]
        assert (gate["in_flight"], gate["queued"]) == (CAP, QUEUE), gate
        assert (gate["max_in_flight"], gate["queue_limit"]) == (CAP, QUEUE)
        assert metric(p, "postern_backend_logins_in_flight", backend="b1", protocol="imap") == CAP
        assert metric(p, "postern_backend_login_queue", backend="b1", protocol="imap") == QUEUE
        # No head-of-line blocking: bob's backend serves him meanwhile.
        bob = Raw(p.addr("imap-plain"))
        assert bob.cmd(f"b LOGIN {BOB} {USERS[BOB]}\r\n".encode(), b"b").startswith(b"b OK")
        bob.cmd(b"c LOGOUT\r\n", b"c")
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a client hung"
        # Every client heard the temporary failure, the queued and stuck ones at the
        # pre-auth deadline; never more than CAP connections reached b1.
        assert len(answers) == CLIENTS
        for i, got in answers.items():
            assert re.search(rb"a%d NO \[UNAVAILABLE\]" % i, got), got
        assert connections_to(port) <= CAP
        full = metric(p, "postern_backend_admission_refused_total",
                      backend="b1", protocol="imap", reason="queue_full")
        late = metric(p, "postern_backend_admission_refused_total",
                      backend="b1", protocol="imap", reason="deadline")
        assert (full, late) == (CLIENTS - CAP - QUEUE, QUEUE)
        assert len(re.findall(r"backend busy: no login slot", p.log())) == CLIENTS - CAP
    finally:
        os.killpg(b1.proc.pid, signal.SIGCONT)
    # The backend thawed: logins go through again, and the gate is empty.
    raw = Raw(p.addr("imap-plain"))
    assert raw.cmd(f"z LOGIN {ALICE} {USERS[ALICE]}\r\n".encode(), b"z").startswith(b"z OK")
    raw.cmd(b"y LOGOUT\r\n", b"y")
    gate_deadline = time.monotonic() + 10
    while metric(p, "postern_backend_logins_in_flight", backend="b1", protocol="imap") != 0:
        assert time.monotonic() < gate_deadline, "slots were never released"
        time.sleep(0.1)
