#!/usr/bin/env bash
# dovecot-conf.sh NAME DIR MAILROOT IMAP_PORT POP3_PORT LMTP_PORT AUTH_PORT [ADDRESS]
#
# Renders fixtures/dovecot/dovecot.conf.in into DIR/dovecot.conf for one Dovecot
# backend on loopback, and prepares DIR and MAILROOT. Used by the quickstart
# (deploy/local/up.sh) and the system tests (tests/harness), so both run the very same
# backend configuration. The caller writes DIR/users (passwd-file format), and may add
# settings in DIR/extra.conf. AUTH_PORT serves SASL to Postfix; ADDRESS (default
# 127.0.0.1) is where Dovecot listens.
#
# As root (CI), mail belongs to Debian's `mail` user, since Dovecot refuses uid 0 for
# mail access; as anyone else, every Dovecot process runs as that user.
set -euo pipefail
[ $# -eq 7 ] || [ $# -eq 8 ] || {
    echo "usage: $0 NAME DIR MAILROOT IMAP_PORT POP3_PORT LMTP_PORT AUTH_PORT [ADDRESS]" >&2
    exit 2
}
name=$1 dir=$2 mailroot=$3 imap=$4 pop3=$5 lmtp=$6 auth=$7 address=${8:-127.0.0.1}
here=$(cd "$(dirname "$0")/.." && pwd)

if [ "$(id -u)" = 0 ]; then
    login_user=dovenull internal_user=dovecot
    uid=$(id -u mail) gid=$(id -g mail)
else
    login_user=$(id -un) internal_user=$(id -un)
    uid=$(id -u) gid=$(id -g)
fi

mkdir -p "$dir" "$mailroot"
chmod 755 "$dir" "$mailroot"
[ "$(id -u)" = 0 ] && chown "$uid:$gid" "$mailroot"

sed -e "s#@NAME@#$name#g" -e "s#@DIR@#$dir#g" -e "s#@MAILROOT@#$mailroot#g" \
    -e "s#@IMAP_PORT@#$imap#g" -e "s#@POP3_PORT@#$pop3#g" -e "s#@LMTP_PORT@#$lmtp#g" \
    -e "s#@AUTH_PORT@#$auth#g" \
    -e "s#@LOGIN_USER@#$login_user#g" -e "s#@INTERNAL_USER@#$internal_user#g" \
    -e "s#@UID@#$uid#g" -e "s#@GID@#$gid#g" -e "s#@ADDRESS@#$address#g" \
    "$here/fixtures/dovecot/dovecot.conf.in" > "$dir/dovecot.conf"
if grep -q '@[A-Z_]*@' "$dir/dovecot.conf"; then
    echo "error: unrendered placeholder in $dir/dovecot.conf" >&2
    exit 1
fi
echo "$dir/dovecot.conf"
