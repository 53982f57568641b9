"""Ports and sockets."""

import socket
import time


def free_port(host: str = "127.0.0.1") -> int:  # noqa: D401
    """A port that was free a moment ago. Callers retry if someone takes it first."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} did not open within {timeout}s")
            time.sleep(0.05)


def read_until(sock: socket.socket, marker: bytes, timeout: float = 10.0) -> bytes:
    """Reads until `marker` is in the data (or EOF / timeout); returns everything read."""
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Reads until the peer closes."""
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
