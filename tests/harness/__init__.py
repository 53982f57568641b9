"""Test harness: real Dovecot backends and a real Postern process on loopback.

Everything runs in temporary directories on free ports, so tests can run in parallel
(pytest-xdist) on a machine where other services hold the standard ports.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
