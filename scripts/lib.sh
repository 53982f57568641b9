# Shared shell helpers for Postern's scripts. Source it; do not run it.

# phase NAME...: announces a step of a long script, "==> NAME", with the seconds since
# the script started and how long the previous step took, so a silent step (apt, a
# first cargo build) shows where the time goes.
_phase_last=$SECONDS
phase() {
    local now=$SECONDS
    echo "==> $*  [${now}s since start; previous step $((now - _phase_last))s]"
    _phase_last=$now
}

# Run a command as root (directly, or through sudo when we are not root).
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# apt_install PKG...: install the Debian packages that are missing, and only those.
# Idempotent: when everything is present, apt-get is not even called.
apt_install() {
    local missing=()
    local p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "==> installing Debian packages: ${missing[*]}"
    # Debian's maintainer scripts would start a system-wide Dovecot or Postfix on the
    # standard ports; the project starts its own, on loopback and free ports. A
    # policy-rc.d that refuses every start keeps the machine clean.
    local policy=/usr/sbin/policy-rc.d created=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod +x "$policy"
        created=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
    local rc=$?
    [ -n "$created" ] && as_root rm -f "$policy"
    return $rc
}

# need_cargo: the Rust toolchain must be there (Debian's cargo is too old for edition 2024).
need_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "error: cargo not found; install Rust 1.94 or newer (https://rustup.rs)" >&2
        exit 1
    fi
}

# Everything the quickstart and the system tests need from Debian.
MAIL_PACKAGES=(dovecot-core dovecot-imapd dovecot-pop3d dovecot-lmtpd openssl curl ca-certificates)
