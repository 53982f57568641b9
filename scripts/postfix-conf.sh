#!/usr/bin/env bash
# postfix-conf.sh NAME DIR SMTP_PORT SUBMISSION_PORT LMTP_TARGET SASL_TARGET [XCLIENT_HOSTS] [ADDRESS]
#
# Prepares a private Postfix instance in DIR from fixtures/postfix/*.in: main.cf,
# master.cf and the queue directory with the ownership Postfix insists on. Start it
# with `/usr/lib/postfix/sbin/master -c DIR -d` (foreground; the log is its stdout):
# the `postfix` command itself refuses configuration directories that the system's
# main.cf does not list, and this must not touch /etc/postfix. Needs root.
#   LMTP_TARGET  where local mail goes, e.g. inet:127.0.0.1:2401 (Dovecot or Postern)
#   SASL_TARGET  Dovecot's SASL listener, e.g. inet:127.0.0.1:12345
set -euo pipefail
[ $# -ge 6 ] && [ $# -le 8 ] || {
    echo "usage: $0 NAME DIR SMTP_PORT SUBMISSION_PORT LMTP_TARGET SASL_TARGET [XCLIENT_HOSTS] [ADDRESS]" >&2
    exit 2
}
name=$1 dir=$2 smtp=$3 submission=$4 lmtp=$5 sasl=$6
xclient=${7:-127.0.0.0/8} address=${8:-127.0.0.1}
here=$(cd "$(dirname "$0")/.." && pwd)

mkdir -p "$dir"
chmod 755 "$dir"
for f in main.cf master.cf; do
    sed -e "s#@NAME@#$name#g" -e "s#@DIR@#$dir#g" -e "s#@SMTP_PORT@#$smtp#g" \
        -e "s#@SUBMISSION_PORT@#$submission#g" -e "s#@LMTP_TARGET@#$lmtp#g" \
        -e "s#@SASL_TARGET@#$sasl#g" -e "s#@XCLIENT_HOSTS@#$xclient#g" \
        -e "s#@ADDRESS@#$address#g" \
        "$here/fixtures/postfix/$f.in" > "$dir/$f"
done
if grep -q '@[A-Z_]*@' "$dir/main.cf" "$dir/master.cf"; then
    echo "error: unrendered placeholder in $dir" >&2
    exit 1
fi
# What `postfix set-permissions` would do for this queue.
q=$dir/queue
mkdir -p "$q/pid" "$dir/data"
for d in active bounce corrupt defer deferred flush hold incoming private saved trace; do
    mkdir -p "$q/$d"
    chown postfix:root "$q/$d"
    chmod 700 "$q/$d"
done
mkdir -p "$q/maildrop" "$q/public"
chown postfix:postdrop "$q/maildrop" "$q/public"
chmod 730 "$q/maildrop"
chmod 710 "$q/public"
chown postfix:postfix "$dir/data"
chmod 700 "$dir/data"
echo "$dir"
