#!/usr/bin/env bash
# Checks, before any test runs, that every external program the system tests call is
# there and can do what the tests need of it (swaks with TLS, curl with the mail
# protocols, a Chromium that runs headless, ...). scripts/test.sh runs it right after
# scripts/install-deps.sh, so a machine that lacks something fails in seconds with the
# Debian package to install, not half an hour later in the middle of a test.
#
# One line per failure, each naming its Debian package, then exit 1; on success one
# line, "preflight ok (N checks)". Programs are looked up on $PATH and run in this
# environment (PERL5LIB included), exactly as the tests will run them.
set -uo pipefail
cd "$(dirname "$0")/.."

checks=0
failed=()
packages=()

fail() { # fail PACKAGE WHAT
    failed+=("$1")
    printf 'preflight: FAIL: %s (Debian package: %s)\n' "$2" "$1" >&2
}

# have PACKAGE PROGRAM: the program is on $PATH.
have() {
    checks=$((checks + 1))
    if command -v "$2" >/dev/null 2>&1; then return 0; fi
    fail "$1" "$2 not found on PATH"
    return 1
}

# file_there PACKAGE PATH WHAT: a file the tests use by its absolute path.
file_there() {
    checks=$((checks + 1))
    if [ -e "$2" ]; then return 0; fi
    fail "$1" "$3 ($2) is missing"
    return 1
}

# capable PACKAGE WHAT COMMAND...: the command succeeds (its output is kept in $out).
capable() {
    local pkg=$1 what=$2
    shift 2
    checks=$((checks + 1))
    if out=$("$@" 2>&1); then return 0; fi
    fail "$pkg" "$what: \`$*\` failed: $(printf '%s' "$out" | tail -n 1)"
    return 1
}

# ---------------------------------------------------------------- Dovecot
if have dovecot-core dovecot; then
    capable dovecot-core "dovecot cannot report its version" dovecot --version
fi
have dovecot-core doveadm && capable dovecot-core "doveadm pw cannot hash a password" \
    doveadm pw -s SHA512-CRYPT -p preflight
file_there dovecot-imapd /usr/lib/dovecot/imap "Dovecot's IMAP server"
file_there dovecot-pop3d /usr/lib/dovecot/pop3 "Dovecot's POP3 server"
file_there dovecot-lmtpd /usr/lib/dovecot/lmtp "Dovecot's LMTP server"
checks=$((checks + 1))
compgen -G '/usr/lib/dovecot/modules/*/libdriver_mysql.so' >/dev/null \
    || compgen -G '/usr/lib/dovecot/modules/libdriver_mysql.so' >/dev/null \
    || fail dovecot-mysql "Dovecot's MySQL driver (/usr/lib/dovecot/modules/libdriver_mysql.so) is missing"
if [ "$(id -u)" = 0 ]; then
    # dovecot-conf.sh runs the backends' processes as these users when root.
    for u in dovecot dovenull mail; do
        capable dovecot-core "no system user $u (Dovecot runs as it)" id -u "$u"
    done
fi

# ---------------------------------------------------------------- Postfix
have postfix postconf && capable postfix "postconf cannot read Postfix's defaults" postconf -d mail_version
file_there postfix /usr/lib/postfix/sbin/master "Postfix's master daemon"
if [ "$(id -u)" = 0 ]; then
    capable postfix "no system user postfix (the queue belongs to it)" id -u postfix
    capable postfix "no group postdrop (the queue's maildrop belongs to it)" getent group postdrop
fi

# ---------------------------------------------------------------- MariaDB
have mariadb-server mariadbd && capable mariadb-server "mariadbd does not run" mariadbd --version
have mariadb-server mariadb-install-db
have mariadb-client mariadb
# The Galera tests (tests/harness/galera.py): the wsrep provider, and the rsync SST.
file_there galera-4 /usr/lib/galera/libgalera_smm.so "Galera's wsrep provider"
have mariadb-server wsrep_sst_rsync
have rsync rsync && capable rsync "rsync does not run" rsync --version
have iproute2 ss
if [ "$(id -u)" = 0 ]; then
    # As root the cluster's nodes run as `mysql`: the rsync SST daemon would drop to
    # `nobody` otherwise and could not write the joiner's datadir.
    capable mariadb-server "no system user mysql (the Galera nodes run as it)" id -u mysql
fi

# ---------------------------------------------------------------- PostgreSQL
# The harness takes the newest /usr/lib/postgresql/N/bin.
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n | tail -n 1)
checks=$((checks + 1))
if [ -z "$pgbin" ]; then
    fail postgresql "PostgreSQL's server binaries (/usr/lib/postgresql/*/bin) are missing"
else
    for p in initdb postgres pg_ctl; do
        file_there postgresql "$pgbin/$p" "PostgreSQL's $p"
    done
    [ -x "$pgbin/postgres" ] && capable postgresql "postgres does not run" "$pgbin/postgres" --version
fi
have postgresql-client psql
if [ "$(id -u)" = 0 ]; then
    # PostgreSQL refuses root: as root the harness runs it as `postgres`, through runuser.
    capable postgresql "no system user postgres (the test clusters run as it)" id -u postgres
    have util-linux runuser
fi

# ---------------------------------------------------------------- clients
if have swaks swaks; then
    # `swaks --support` lists each feature: "=== TLS supported", or
    # "*** TLS not available: requires Net::SSLeay" (which Debian's swaks only Recommends).
    support=$(swaks --support 2>&1)
    checks=$((checks + 1))
    grep -q '^=== TLS supported' <<<"$support" \
        || fail libnet-ssleay-perl "swaks cannot do STARTTLS/TLS: $(grep -m1 'TLS' <<<"$support" || echo 'no TLS line in swaks --support')"
    checks=$((checks + 1))
    grep -q '^=== Basic AUTH supported' <<<"$support" \
        || fail swaks "swaks cannot do SMTP AUTH: $(grep -m1 'AUTH' <<<"$support" || echo 'no AUTH line in swaks --support')"
fi

if have curl curl; then
    protocols=$(curl -V 2>/dev/null | sed -n 's/^Protocols: //p')
    for p in imap imaps pop3 pop3s smtp smtps; do
        checks=$((checks + 1))
        grep -qw "$p" <<<"$protocols" || fail curl "curl does not speak $p (curl -V protocols: ${protocols:-none})"
    done
fi

if have openssl openssl; then
    capable openssl "openssl has no s_client" openssl s_client -help
    checks=$((checks + 1))
    grep -q -- '-starttls' <<<"$out" || fail openssl "openssl s_client has no -starttls"
fi

# The status page test drives a real headless browser.
browser=""
for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then browser=$name; break; fi
done
checks=$((checks + 1))
if [ -z "$browser" ]; then
    fail chromium "chromium not found on PATH"
else
    checks=$((checks + 1))
    dom=$(timeout 90 "$browser" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
        --no-first-run --dump-dom about:blank 2>/dev/null)
    grep -q '<body' <<<"$dom" || fail chromium "$browser does not run headless (--headless --dump-dom about:blank printed no page)"
fi

# ---------------------------------------------------------------- systemd's offline tools
for p in systemd-analyze systemd-sysusers systemd-tmpfiles; do
    have systemd "$p" && capable systemd "$p does not run" "$p" --version
done

# ---------------------------------------------------------------- Python
if have python3 python3; then
    capable python3-venv "python3 cannot make a virtualenv with pip" python3 -c 'import venv, ensurepip'
fi
checks=$((checks + 1))
if [ ! -x .venv/bin/python ]; then
    fail python3-venv "no .venv (scripts/install-deps.sh makes it)"
else
    capable python3 ".venv's Python lacks ssl or tomllib (3.11 or newer needed)" \
        .venv/bin/python -c 'import ssl, tomllib'
    # Not a Debian package: pip installs these from tests/requirements.txt.
    checks=$((checks + 1))
    .venv/bin/python -c 'import pytest, xdist, pytest_timeout, yaml' 2>/dev/null \
        || fail "none: pip install -r tests/requirements.txt into .venv" \
            ".venv lacks pytest, pytest-xdist, pytest-timeout or PyYAML"
fi

if [ ${#failed[@]} -gt 0 ]; then
    for p in "${failed[@]}"; do
        case $p in none:*) ;; *) [[ " ${packages[*]} " == *" $p "* ]] || packages+=("$p") ;; esac
    done
    if [ ${#packages[@]} -gt 0 ]; then
        echo "preflight: ${#failed[@]} of $checks checks failed; fix: apt-get install --no-install-recommends ${packages[*]} (or run scripts/install-deps.sh)" >&2
    else
        echo "preflight: ${#failed[@]} of $checks checks failed; run scripts/install-deps.sh" >&2
    fi
    exit 1
fi
echo "preflight ok ($checks checks)"
