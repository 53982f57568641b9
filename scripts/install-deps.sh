#!/usr/bin/env bash
# Installs what Postern's test suite needs on a Debian machine: the mail servers it
# tests against, the command-line clients it drives, and a Python virtualenv with the
# test runner. Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

# The routing tests start their own MariaDB and PostgreSQL servers (never the
# machine's): only the server binaries are needed.
# dovecot-mysql: the Docker backends' Dovecot config is run against MariaDB; systemd:
# only its offline tools (systemd-analyze verify) for the unit file; chromium: the
# admin status page is tested in a real browser. libnet-ssleay-perl: swaks's TLS
# (--tls, STARTTLS), which Debian's swaks only Recommends; swaks needs no other Perl
# module for TLS (not IO::Socket::SSL).
# galera-4, rsync, iproute2: tests/test_galera.py's 3-node Galera cluster (the wsrep
# provider; the rsync SST, whose script checks its daemon's port with `ss`). Debian 12's
# mariadb-server depends on them; named here because the tests use them directly.
apt_install "${MAIL_PACKAGES[@]}" postfix swaks libnet-ssleay-perl mariadb-server mariadb-client \
    galera-4 rsync iproute2 \
    postgresql postgresql-client python3 python3-venv dovecot-mysql systemd chromium

VENV=.venv
# A venv made before python3-venv was installed has no pip: make it again.
if [ ! -x "$VENV/bin/python" ] || [ ! -x "$VENV/bin/pip" ]; then
    echo "==> creating $VENV"
    python3 -m venv --clear "$VENV"
fi
if ! "$VENV/bin/python" -c 'import pytest, xdist, pytest_timeout' 2>/dev/null \
    || ! cmp -s tests/requirements.txt "$VENV/.requirements"; then
    echo "==> installing tests/requirements.txt into $VENV"
    "$VENV/bin/pip" install -q -r tests/requirements.txt
    cp tests/requirements.txt "$VENV/.requirements"
fi
