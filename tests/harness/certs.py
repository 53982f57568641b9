"""Throwaway TLS material, made by scripts/gen-certs.sh (the same script the
quickstart uses)."""

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import REPO


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the throwaway CA and checks the name."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        return ctx


def make(directory: Path) -> Certs:
    subprocess.run([str(REPO / "scripts" / "gen-certs.sh"), str(directory)], check=True)
    return Certs(ca=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem")
