"""Small helpers over Python's imaplib and raw sockets for the IMAP system tests."""

import imaplib
import socket
import ssl

from harness.net import read_until

# imaplib does not know ID (RFC 2971); registered here for every state, or xatom would
# register it for whatever state it is first used in.
imaplib.Commands["ID"] = ("NONAUTH", "AUTH", "SELECTED")


class SourceIMAP4(imaplib.IMAP4):
    """imaplib.IMAP4 connecting from a chosen loopback address (127.0.0.2 lets a test
    tell the client's address from Postern's own)."""

    def __init__(self, host, port, source="127.0.0.1", timeout=15):
        self.source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )


class SourceIMAP4_SSL(imaplib.IMAP4_SSL):
    def __init__(self, host, port, ssl_context, source="127.0.0.1", timeout=15):
        self.source = source
        super().__init__(host, port, ssl_context=ssl_context, timeout=timeout)

    def _create_socket(self, timeout):
        sock = socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def backend_id(m: imaplib.IMAP4) -> str:
    """Asks the backend for its ID after login; the test Dovecots answer with their name."""
    m.xatom("ID", "NIL")
    data = m.untagged_responses.pop("ID", [b""])
    return data[-1].decode()


class Raw:
    """A raw IMAP connection for byte-exact tests."""

    def __init__(self, addr, tls_ctx: ssl.SSLContext | None = None, source="127.0.0.1"):
        self.sock = socket.create_connection(addr, timeout=15, source_address=(source, 0))
        if tls_ctx is not None:
            self.sock = tls_ctx.wrap_socket(self.sock, server_hostname="localhost")
        self.greeting = read_until(self.sock, b"\r\n")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until(self, marker: bytes, timeout: float = 15) -> bytes:
        return read_until(self.sock, marker, timeout)

    def cmd(self, data: bytes, tag: bytes) -> bytes:
        """Sends `data` and reads through the tagged answer to `tag`."""
        self.send(data)
        out = b""
        while True:
            chunk = read_until(self.sock, b"\r\n")
            if not chunk:
                return out  # closed
            out += chunk
            if any(line.startswith(tag + b" ") for line in out.split(b"\r\n")):
                return out

    def starttls(self, ctx: ssl.SSLContext) -> None:
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def close(self) -> None:
        self.sock.close()
