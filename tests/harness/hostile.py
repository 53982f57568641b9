"""Helpers for the hostile-input system tests (tests/test_hostile.py): raw connections
that survive the peer resetting them, measurements of the Postern process from /proc,
and the checks that Postern is still alive and serving after an attack.

Every connection comes from its own loopback source address (127.0.x.y, never
127.0.0.0/24, which the PROXY tests use), so per-address abuse limits (connection count
and rate, the failed-login delay) never mix one test step with the next.
"""

import itertools
import os
import re
import socket
import ssl
import threading
import time
from pathlib import Path

_sources = itertools.count()


def fresh_source() -> str:
    """A loopback address not used by an earlier connection of this process (wraps
    after 62 500 connections)."""
    n = next(_sources) % (250 * 250)
    return f"127.0.{1 + n // 250}.{1 + n % 250}"


# --- the Postern process ---------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    """Open file descriptors of `pid`."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def panics(log: str) -> list[str]:
    """Lines of a Postern log that report a panic (a Rust panic never reaches a client,
    tokio catches it in the session task, so the log is where it shows)."""
    return [line for line in log.splitlines() if "panicked" in line or "RUST_BACKTRACE" in line]


def assert_alive(postern) -> None:
    """The process is running and never panicked."""
    assert postern.proc is not None and postern.proc.poll() is None, (
        f"postern exited ({postern.proc.returncode if postern.proc else None}):\n"
        + postern.log()[-3000:]
    )
    found = panics(postern.log())
    assert not found, "postern panicked:\n" + "\n".join(found[:20])


def wait_session_log(postern, conn: "Conn", pattern: str, timeout: float = 10.0) -> str:
    """Waits for a log line of the session of `conn` (matched by the client address and
    port in the session span) that matches `pattern`; returns the line."""
    ip, port = conn.local
    who = re.compile(rf"client={re.escape(ip)}:{port}[ }}]")
    want = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        for line in postern.log().splitlines():
            if who.search(line) and want.search(line):
                return line
        if time.monotonic() > deadline:
            mine = [line for line in postern.log().splitlines() if who.search(line)]
            raise AssertionError(
                f"no log line of {ip}:{port} matching {pattern!r}; its lines:\n"
                + "\n".join(mine[-30:])
            )
        time.sleep(0.05)


def session_lines(postern, conn: "Conn") -> list[str]:
    ip, port = conn.local
    who = re.compile(rf"client={re.escape(ip)}:{port}[ }}]")
    return [line for line in postern.log().splitlines() if who.search(line)]


# --- raw connections -------------------------------------------------------------------


class Closed(Exception):
    """The peer closed or reset the connection."""


class Conn:
    """A raw client connection for byte-exact checks. Reads never hang (every read has a
    deadline) and a reset by the peer counts as a close, not an error: Postern closing a
    socket that still holds unread client bytes makes the kernel send RST."""

    def __init__(
        self,
        addr,
        source: str | None = None,
        tls: ssl.SSLContext | None = None,
        greeting: bool = True,
        timeout: float = 15.0,
    ):
        self.sock = socket.create_connection(
            addr, timeout=timeout, source_address=(source or fresh_source(), 0)
        )
        self.local = self.sock.getsockname()[:2]
        self.buf = b""
        self.eof = False
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        self.greeting = self.line() if greeting else b""

    # writing

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def try_send(self, data: bytes) -> bool:
        """Sends; False if the peer has closed or reset the connection."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            return False

    # reading

    def _fill(self, timeout: float) -> bool:
        """Reads once into the buffer; False at EOF or reset. Raises socket.timeout."""
        if self.eof:
            return False
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            chunk = b""
        except ssl.SSLError as e:  # e.g. a TLS alert after the server gave up
            if "EOF" in str(e) or "closed" in str(e).lower():
                chunk = b""
            else:
                raise
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def until(self, marker: bytes, timeout: float = 15.0) -> bytes:
        """Everything up to and including `marker`. Raises AssertionError on a timeout
        and Closed if the connection ends first."""
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {marker!r} within {timeout}s; got {self.buf[-400:]!r}")
            try:
                if not self._fill(left):
                    raise Closed(f"closed before {marker!r}; got {self.buf[-400:]!r}")
            except socket.timeout:
                continue
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def line(self, timeout: float = 15.0) -> bytes:
        return self.until(b"\r\n", timeout)

    def lines(self, n: int, timeout: float = 15.0) -> list[bytes]:
        return [self.line(timeout) for _ in range(n)]

    def ask(self, data: bytes, timeout: float = 15.0) -> bytes:
        """Sends `data` and returns the next line."""
        self.send(data)
        return self.line(timeout)

    def imap(self, data: bytes, tag: bytes, timeout: float = 15.0) -> bytes:
        """Sends `data` and reads through the tagged reply to `tag`."""
        self.send(data)
        out = b""
        while True:
            line = self.line(timeout)
            out += line
            if line.startswith(tag + b" "):
                return out

    def rest(self, timeout: float = 15.0) -> bytes:
        """Everything until the peer closes. Raises AssertionError if it is still open
        after `timeout` seconds (a hang)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"connection still open after {timeout}s; got {self.buf[-400:]!r}"
                )
            try:
                if not self._fill(left):
                    out, self.buf = self.buf, b""
                    return out
            except socket.timeout:
                continue

    def quiet(self, wait: float = 0.5) -> bytes:
        """Whatever arrives within `wait` seconds (the connection may stay open)."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                if not self._fill(left):
                    break
            except socket.timeout:
                break
        out, self.buf = self.buf, b""
        return out

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert self.buf == b"", f"plaintext left before the handshake: {self.buf!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Conn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream(conn: Conn, chunk: bytes, total: int, stall: float = 10.0) -> tuple[int, str]:
    """Sends `chunk` repeatedly, up to `total` bytes, until the peer closes the
    connection. Returns (bytes the kernel accepted, how it ended: "closed" when the peer
    closed or reset it, "complete" when everything was sent, "stalled" when the peer
    stopped reading for `stall` seconds without closing)."""
    sent = 0
    conn.sock.settimeout(stall)
    while sent < total:
        try:
            sent += conn.sock.send(chunk[: total - sent])
        except socket.timeout:
            return sent, "stalled"
        except (BrokenPipeError, ConnectionResetError):
            return sent, "closed"
        except OSError:
            return sent, "closed"
    return sent, "complete"


class Reader(threading.Thread):
    """Drains a socket in the background (while the test writes), keeping what it read."""

    def __init__(self, conn: Conn, limit: int = 64 * 1024 * 1024):
        super().__init__(daemon=True)
        self.conn = conn
        self.data = bytearray(conn.buf)
        conn.buf = b""
        self.limit = limit
        self.ended = threading.Event()

    def run(self) -> None:
        self.conn.sock.settimeout(0.2)
        try:
            while len(self.data) < self.limit:
                try:
                    chunk = self.conn.sock.recv(65536)
                except socket.timeout:
                    continue
                except (ConnectionResetError, OSError):
                    break
                if not chunk:
                    break
                self.data += chunk
        finally:
            self.ended.set()

    def wait(self, timeout: float) -> bytes:
        assert self.ended.wait(timeout), (
            f"connection still open after {timeout}s; got {bytes(self.data[-400:])!r}"
        )
        return bytes(self.data)
