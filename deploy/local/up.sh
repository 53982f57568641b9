#!/usr/bin/env bash
# Postern quickstart: builds Postern, installs Dovecot (Debian packages, idempotent),
# starts two Dovecot backends on loopback that share one maildir root (the stand-in for
# an NFS-mounted store), and Postern in front of them with routes in embedded SQLite.
# Returns once everything answers, leaving it running; deploy/local/down.sh stops it.
# Running it again while the quickstart is up only prints where to connect.
#
# State (certificates, routes, mail, logs) lives in var/quickstart/ (or
# $POSTERN_QUICKSTART_DIR) and survives down.sh; `down.sh --purge` removes it.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
. scripts/lib.sh
need_cargo

state=${POSTERN_QUICKSTART_DIR:-$repo/var/quickstart}
bin=$repo/target/release/postern
imap_port=1143 imaps_port=1993 pop3_port=1110 pop3s_port=1995
smtp_port=1025 submission_port=1587 smtps_port=1465 lmtp_port=1024
admin_port=9190

# Pid files may pad the number with spaces (Postfix does).
alive() { [ -s "$1" ] && kill -0 "$(tr -dc '0-9' < "$1")" 2>/dev/null; }
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
greets() { timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1 && head -c 4 <&3" 2>/dev/null | grep -q "$2"; }
wait_greeting() {
    local port=$1 want=$2 what=$3 i
    for i in $(seq 1 100); do
        greets "$port" "$want" && return 0
        sleep 0.1
    done
    echo "error: $what did not answer on 127.0.0.1:$port" >&2
    return 1
}
# free_port PREFERRED: the preferred port if nothing listens there, else a free one.
free_port() {
    local p=$1
    while port_taken "$p"; do p=$((20000 + RANDOM % 20000)); done
    echo "$p"
}

summary() {
    . "$state/ports.env"
    cat <<EOT

Postern quickstart is running.
  IMAP  (STARTTLS)  127.0.0.1:$imap_port
  IMAPS             127.0.0.1:$imaps_port
  POP3  (STLS)      127.0.0.1:$pop3_port
  POP3S             127.0.0.1:$pop3s_port
  SMTP (MX)         127.0.0.1:$smtp_port (STARTTLS)
  submission        127.0.0.1:$submission_port (STARTTLS), 127.0.0.1:$smtps_port (implicit TLS)
  LMTP              127.0.0.1:$lmtp_port (the backends' Postfix delivers through it)
  backends          b1 = Dovecot 127.0.0.1:$B1_IMAP (IMAP) :$B1_POP3 (POP3) :$B1_LMTP (LMTP)
                         Postfix 127.0.0.1:$B1_SMTP (SMTP) :$B1_SUB (submission)
                    b2 = Dovecot 127.0.0.1:$B2_IMAP (IMAP) :$B2_POP3 (POP3) :$B2_LMTP (LMTP)
                         Postfix 127.0.0.1:$B2_SMTP (SMTP) :$B2_SUB (submission)
                    (sharing the maildir root $state/mail)
  routes            SQLite $state/routes.db
  demo users        alice@example.test -> b1, bob@example.test -> b2
                    password "demo" for both (quickstart only: never use these elsewhere)
  CA certificate    $state/tls/ca.pem
  status page       http://127.0.0.1:$admin_port/  (metrics: /metrics, JSON API: /api/status)
  access log        $state/access.log (one JSON line per session)

Try:
  curl --ssl-reqd --cacert $state/tls/ca.pem -u alice@example.test:demo imap://localhost:$imap_port/
  curl --cacert $state/tls/ca.pem -u bob@example.test:demo imaps://localhost:$imaps_port/INBOX
  curl --ssl-reqd --cacert $state/tls/ca.pem -u bob@example.test:demo pop3://localhost:$pop3_port/
  swaks --server 127.0.0.1:$submission_port --tls --auth-user alice@example.test --auth-password demo --to bob@example.test
  openssl s_client -quiet -crlf -starttls imap -connect 127.0.0.1:$imap_port -CAfile $state/tls/ca.pem
  $bin -c $state/postern.toml route Bob
  curl -s http://127.0.0.1:$admin_port/api/backends
  $bin -c $state/postern.toml reload

Logs: $state/postern.log, $state/b1/dovecot.log, $state/b2/dovecot.log,
      $state/pf-b1/maillog, $state/pf-b2/maillog
Stop: deploy/local/down.sh
EOT
}

if alive "$state/postern.pid" && alive "$state/b1/run/master.pid" && alive "$state/b2/run/master.pid" \
    && alive "$state/pf-b1/queue/pid/master.pid" && alive "$state/pf-b2/queue/pid/master.pid"; then
    summary
    exit 0
fi
# Something is missing: start cleanly (data is kept).
[ -d "$state" ] && deploy/local/down.sh >/dev/null

phase "installing Debian packages (only the missing ones)"
# swaks and libnet-ssleay-perl (its TLS, only Recommended by Debian's swaks): the
# summary's swaks example.
apt_install "${MAIL_PACKAGES[@]}" postfix swaks libnet-ssleay-perl
phase "building postern (release)"
cargo build --release --locked -p postern

mkdir -p "$state"
chmod 755 "$state"
for p in $imap_port $imaps_port $pop3_port $pop3s_port $smtp_port $submission_port $smtps_port $lmtp_port $admin_port; do
    if port_taken "$p"; then
        echo "error: 127.0.0.1:$p is in use; the quickstart listens there (see config/quickstart.toml)" >&2
        exit 1
    fi
done
if ! grep -q '^B2_SUB=' "$state/ports.env" 2>/dev/null; then
    b1_imap=$(free_port 1431); b2_imap=$(free_port 1432)
    b1_pop3=$(free_port 1101); b2_pop3=$(free_port 1102)
    b1_lmtp=$(free_port 2401); b2_lmtp=$(free_port 2402)
    b1_auth=$(free_port 12345); b2_auth=$(free_port 12346)
    b1_smtp=$(free_port 2501); b2_smtp=$(free_port 2502)
    b1_sub=$(free_port 5871); b2_sub=$(free_port 5872)
    {
        printf 'B1_IMAP=%s\nB2_IMAP=%s\nB1_POP3=%s\nB2_POP3=%s\n' "$b1_imap" "$b2_imap" "$b1_pop3" "$b2_pop3"
        printf 'B1_LMTP=%s\nB2_LMTP=%s\nB1_AUTH=%s\nB2_AUTH=%s\n' "$b1_lmtp" "$b2_lmtp" "$b1_auth" "$b2_auth"
        printf 'B1_SMTP=%s\nB2_SMTP=%s\nB1_SUB=%s\nB2_SUB=%s\n' "$b1_smtp" "$b2_smtp" "$b1_sub" "$b2_sub"
    } > "$state/ports.env"
fi
. "$state/ports.env"

phase "certificates (a throwaway CA in $state/tls)"
scripts/gen-certs.sh "$state/tls"

phase "starting Dovecot backends b1 and b2"
for b in b1 b2; do
    imap_var=${b^^}_IMAP pop3_var=${b^^}_POP3 lmtp_var=${b^^}_LMTP auth_var=${b^^}_AUTH
    conf=$(scripts/dovecot-conf.sh "$b" "$state/$b" "$state/mail" \
        "${!imap_var}" "${!pop3_var}" "${!lmtp_var}" "${!auth_var}")
    printf 'alice@example.test:{PLAIN}demo::::::\nbob@example.test:{PLAIN}demo::::::\n' \
        > "$state/$b/users"
    dovecot -c "$conf" </dev/null >/dev/null 2>>"$state/$b/stderr.log"
    wait_greeting "${!imap_var}" '\* OK' "Dovecot $b"
done

phase "starting postern"
sed -e "s/^port = 1431$/port = $B1_IMAP/" -e "s/^port = 1432$/port = $B2_IMAP/" \
    -e "s/^port = 1101$/port = $B1_POP3/" -e "s/^port = 1102$/port = $B2_POP3/" \
    -e "s/^port = 2401$/port = $B1_LMTP/" -e "s/^port = 2402$/port = $B2_LMTP/" \
    -e "s/^port = 2501$/port = $B1_SMTP/" -e "s/^port = 2502$/port = $B2_SMTP/" \
    -e "s/^port = 5871$/port = $B1_SUB/" -e "s/^port = 5872$/port = $B2_SUB/" \
    config/quickstart.toml > "$state/postern.toml"
# The demo pins (the same as fixtures/sqlite/seed.sql), written through Postern so they
# work whatever database routing.sql.url points at.
"$bin" -c "$state/postern.toml" route pin alice@example.test b1 >/dev/null
"$bin" -c "$state/postern.toml" route pin bob@example.test b2 >/dev/null
"$bin" -c "$state/postern.toml" check >/dev/null
nohup "$bin" -c "$state/postern.toml" run </dev/null >> "$state/postern.log" 2>&1 &
echo $! > "$state/postern.pid"
wait_greeting "$imap_port" '\* OK' "Postern"

phase "starting Postfix on b1 and b2 (delivering through Postern's LMTP)"
for b in b1 b2; do
    smtp_var=${b^^}_SMTP sub_var=${b^^}_SUB auth_var=${b^^}_AUTH
    as_root scripts/postfix-conf.sh "$b" "$state/pf-$b" "${!smtp_var}" "${!sub_var}" \
        "inet:127.0.0.1:$lmtp_port" "inet:127.0.0.1:${!auth_var}" >/dev/null
    as_root nohup /usr/lib/postfix/sbin/master -c "$state/pf-$b" -d </dev/null \
        >> "$state/pf-$b/maillog" 2>&1 &
    wait_greeting "${!smtp_var}" 220 "Postfix $b"
done
phase "quickstart up"
summary
