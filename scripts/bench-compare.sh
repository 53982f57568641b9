#!/usr/bin/env bash
# bench-compare.sh: direct vs nginx's mail module vs HAProxy vs Postern, side by side,
# in one run.
#
# Builds Postern and postern-bench (release), installs nginx with the mail module and
# HAProxy from Debian when missing, starts the bench's fake IMAP/POP3 backend (or, with
# --dovecot, two real Dovecot backends), a fake auth_http for nginx, nginx (its own
# master, prefix in a temp dir), HAProxy (TCP mode, its own process) and Postern, all on
# loopback and free ports, runs the same load against each, interleaved, and writes a
# markdown table (docs/benchmarks.md explains every column). Everything it started is
# stopped on exit, failure included.
#
#   scripts/bench-compare.sh                 # full run, about 10 minutes plus the build
#   scripts/bench-compare.sh --quick         # smaller runs, about 4 minutes
#   scripts/bench-compare.sh --dovecot       # logins and relay against real Dovecot
#   scripts/bench-compare.sh --out DIR       # where results go (default var/bench/DATE)
#   scripts/bench-compare.sh --repeat N      # repetitions of the login and relay runs
#   scripts/bench-compare.sh --max-load L    # after the build, wait (<= 10 min) for load < L
#   scripts/bench-compare.sh --no-build --no-install --keep
#
# Writes DIR/results.md (the table, also printed on stdout), DIR/results.jsonl (one
# JSON object per measurement) and DIR/run.log (the human summaries).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
args_given="$*"
quick=0 repeat="" out="" keep=0 build=1 install=1 max_load="" dovecot=0
while [ $# -gt 0 ]; do
    case $1 in
        --quick) quick=1 ;;
        --dovecot) dovecot=1 ;;
        --repeat) repeat=$2; shift ;;
        --out) out=$2; shift ;;
        --keep) keep=1 ;;
        --no-build) build=0 ;;
        --no-install) install=0 ;;
        --max-load) max_load=$2; shift ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$quick" = 1 ]; then
    : "${repeat:=1}"
    login_n=1000 pop3_n=1000 tls_n=400 hs_n=1000 relay_n=20 idle_sizes=1000,2000
else
    : "${repeat:=3}"
    login_n=5000 pop3_n=3000 tls_n=2000 hs_n=4000 relay_n=100 idle_sizes=4000,8000
fi
login_rate=500 tls_rate=200 hs_conc=128 idle_conc=128 relay_size=20000000
# Dovecot forks and authenticates for every login: on 2 shared cores it keeps up with
# about half the fake backend's rate, and a backend that falls behind measures queues.
[ "$dovecot" = 1 ] && login_rate=200

target_dir=${CARGO_TARGET_DIR:-$here/target}
bench=$target_dir/release/postern-bench
postern=$target_dir/release/postern
out=${out:-$here/var/bench/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
results=$out/results.jsonl
log=$out/run.log
: > "$results"
: > "$log"

die() { echo "bench-compare: $*" >&2; exit 1; }
# say, wait_for, wait_port, json_port, the bench's Postern and Dovecot.
. "$here/scripts/bench-lib.sh"

# --- everything started here is stopped here, whatever happens ----------------------
tmp=$(mktemp -d /tmp/postern-bench.XXXXXX)
declare -A started=()          # role -> pid
created_policy=0
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for role in "${!started[@]}"; do
        kill -TERM "${started[$role]}" 2>/dev/null || true
    done
    for role in "${!started[@]}"; do
        wait "${started[$role]}" 2>/dev/null || true
    done
    if [ "$created_policy" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    if [ "$keep" = 1 ]; then
        echo "bench-compare: kept $tmp" >&2
    else
        rm -rf "$tmp"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stop() { # stop ROLE
    local pid=${started[$1]:-}
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "started[$1]"
}

# --- machine ------------------------------------------------------------------------
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 1048576 2>/dev/null || true
idle_max=${idle_sizes##*,}
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((2 * idle_max + 200)) ]; then
    die "open-files limit $(ulimit -n) is too low for $idle_max proxied sessions (need $((2 * idle_max + 200)))"
fi

# --- build and install --------------------------------------------------------------
if [ "$build" = 1 ]; then
    say "building Postern and postern-bench (release) in $target_dir"
    (cd "$here" && CARGO_TARGET_DIR=$target_dir cargo build --release -p postern -p postern-bench)
fi
[ -x "$bench" ] && [ -x "$postern" ] || die "missing $bench or $postern (run without --no-build)"

mail_module=/usr/lib/nginx/modules/ngx_mail_module.so
missing=()
{ command -v nginx >/dev/null && [ -f "$mail_module" ]; } || missing+=(nginx libnginx-mod-mail)
command -v haproxy >/dev/null || missing+=(haproxy)
if [ "$dovecot" = 1 ] && ! command -v dovecot >/dev/null; then
    missing+=(dovecot-imapd dovecot-pop3d)
fi
if [ "$install" = 1 ] && [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} from Debian"
    [ "$(id -u)" = 0 ] || die "installing ${missing[*]} needs root (or install them yourself)"
    # Debian starts a freshly installed nginx (port 80), HAProxy or Dovecot (143, 110);
    # policy-rc.d forbids that.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >> "$log" 2>&1
    if [ "$created_policy" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
        created_policy=0
    fi
fi
command -v nginx >/dev/null && [ -f "$mail_module" ] || die "nginx with $mail_module is not installed"
command -v haproxy >/dev/null || die "haproxy is not installed"
[ "$dovecot" = 0 ] || command -v dovecot >/dev/null || die "dovecot is not installed"

# --- a quiet machine, as far as we can tell (after the build, which is load too) --------
if [ -n "$max_load" ]; then
    for _ in $(seq 120); do
        awk -v max="$max_load" '{ exit !($1 < max) }' /proc/loadavg && break
        sleep 5
    done
fi
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
if awk '{ exit !($1 > 1.0) }' /proc/loadavg; then
    say "warning: load average is $load_start on $(nproc) cores; others are using the CPU and figures will be noisy"
fi

# --- stand-ins: TLS pair, fake backend, fake auth_http --------------------------------
"$here/scripts/gen-certs.sh" "$tmp/tls"

"$bench" fake-backend > "$tmp/backend.out" 2> "$tmp/backend.err" &
started[backend]=$!
wait_for "$tmp/backend.out" '"event":"ready"' "the fake backend"
f_imap=$(json_port "$tmp/backend.out" imap)
f_pop3=$(json_port "$tmp/backend.out" pop3)

start_auth() { # start_auth ROLE IMAP_PORT POP3_PORT: a fake auth_http for nginx
    "$bench" fake-auth-http --imap-port "$2" --pop3-port "$3" \
        > "$tmp/$1.out" 2> "$tmp/$1.err" &
    started[$1]=$!
    wait_for "$tmp/$1.out" '"event":"ready"' "the fake auth_http"
    json_port "$tmp/$1.out" addr > "$tmp/$1.port"
}
start_auth auth_fake "$f_imap" "$f_pop3"

# --- with --dovecot: two real Dovecot backends, the system tests' configuration -------
users=100
start_dovecot() { # start_dovecot NAME
    bench_start_dovecot "$1" "$tmp/dovecot" "$users"
    started[dovecot_$1]=$bench_dovecot_pid
}
if [ "$dovecot" = 1 ]; then
    # Dovecot's unprivileged processes read their users file under the temp dir.
    chmod 711 "$tmp"
    start_dovecot b1
    start_dovecot b2
    read -r d1_imap d1_pop3 < "$tmp/dovecot/b1/ports"
    read -r d2_imap d2_pop3 < "$tmp/dovecot/b2/ports"
    start_auth auth_dovecot "$d1_imap" "$d1_pop3"
    # The relay's message: the first INBOX message of bench0 (the relay logs in as
    # session 0), big enough for one FETCH of relay_size bytes, in the shared mail root.
    md=$tmp/dovecot/mail/example.test/bench0/Maildir
    mkdir -p "$md/cur" "$md/new" "$md/tmp"
    {
        printf 'From: bench@example.test\nTo: bench0@example.test\nSubject: relay\n\n'
        head -c $((relay_size * 3 / 4 + 1000000)) /dev/zero | base64 -w 76
    } > "$md/cur/1000000000.M1P1.bench:2,S"
    [ "$(id -u)" = 0 ] && chown -R mail:mail "$tmp/dovecot/mail"
fi

# use_backends fake|dovecot: where the proxies (rendered by start_*) send logins.
# Postern routes each user to b1 or b2 from its table, HAProxy balances round robin,
# nginx's fake auth_http sends everyone to b1 (it knows one backend), direct is b1.
use_backends() {
    case $1 in
        fake) b1_imap=$f_imap b1_pop3=$f_pop3 b2_imap=$f_imap b2_pop3=$f_pop3 auth_role=auth_fake ;;
        dovecot) b1_imap=$d1_imap b1_pop3=$d1_pop3 b2_imap=$d2_imap b2_pop3=$d2_pop3 auth_role=auth_dovecot ;;
    esac
    auth_port=$(cat "$tmp/$auth_role.port")
}
backend_kind=fake
[ "$dovecot" = 1 ] && backend_kind=dovecot
use_backends "$backend_kind"

# --- nginx: its own master process, prefix and config in the temp dir ---------------
start_nginx() {
    local ports
    mkdir -p "$tmp/nginx"
    mapfile -t ports < <("$bench" free-ports 3)
    n_imap=${ports[0]} n_imaps=${ports[1]} n_pop3=${ports[2]}
    cat > "$tmp/nginx/nginx.conf" <<EOF
load_module $mail_module;
# One worker per core, as nginx is deployed; the bench measures master + workers.
worker_processes $(nproc);
worker_rlimit_nofile 20000;
daemon off;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log error;
events { worker_connections 19000; }
mail {
    auth_http 127.0.0.1:$auth_port/auth;
    proxy_pass_error_message on;
    server { listen 127.0.0.1:$n_imap; protocol imap; proxy on; }
    server { listen 127.0.0.1:$n_pop3; protocol pop3; proxy on; }
    server {
        listen 127.0.0.1:$n_imaps ssl;
        protocol imap;
        proxy on;
        # The same ECDSA P-256 pair as Postern; TLS 1.3 like Postern (1.22's default
        # stops at 1.2); full handshakes only, like Postern without a ticketer.
        ssl_certificate $tmp/tls/cert.pem;
        ssl_certificate_key $tmp/tls/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets off;
    }
}
EOF
    nginx -t -q -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" -e "$tmp/nginx/error.log" \
        || die "nginx rejected $tmp/nginx/nginx.conf"
    nginx -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" -e "$tmp/nginx/error.log" \
        2>> "$tmp/nginx/stderr.log" &
    started[nginx]=$!
    for _ in $(seq 100); do
        [ "$(pgrep -c -P "${started[nginx]}" || true)" -ge "$(nproc)" ] && break
        sleep 0.1
    done
    nginx_pids=$(echo "${started[nginx]}" $(pgrep -P "${started[nginx]}") | tr ' ' ',')
    [ "$nginx_pids" != "${started[nginx]}" ] || die "nginx did not start; see $tmp/nginx/error.log"
}

# --- HAProxy: TCP mode, its own process (threads, not workers), config in the temp dir
cat "$tmp/tls/cert.pem" "$tmp/tls/key.pem" > "$tmp/tls/haproxy.pem"
start_haproxy() {
    local ports maxconn
    mkdir -p "$tmp/haproxy"
    mapfile -t ports < <("$bench" free-ports 3)
    h_imap=${ports[0]} h_imaps=${ports[1]} h_pop3=${ports[2]}
    # Two descriptors per session and some to spare; HAProxy reserves two more for
    # each of maxpipes (default maxconn / 4), which would not fit this shell's limit.
    maxconn=$((idle_max + 500))
    cat > "$tmp/haproxy/haproxy.cfg" <<EOF
global
    # One thread per core, as HAProxy 2.x is deployed.
    nbthread $(nproc)
    maxconn $maxconn
    maxpipes 256
    # TLS 1.2 and 1.3, full handshakes only, like nginx and Postern here.
    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets

defaults
    mode tcp
    maxconn $maxconn
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    # Zero-copy forwarding between plaintext sockets, as Postern's relay does.
    option splice-auto

frontend imap
    bind 127.0.0.1:$h_imap
    default_backend imap
frontend imaps
    # TLS terminated here, plaintext IMAP to the backend, like the other two.
    bind 127.0.0.1:$h_imaps ssl crt $tmp/tls/haproxy.pem
    default_backend imap
frontend pop3
    bind 127.0.0.1:$h_pop3
    default_backend pop3

backend imap
    balance roundrobin
    server b1 127.0.0.1:$b1_imap
    server b2 127.0.0.1:$b2_imap
backend pop3
    balance roundrobin
    server b1 127.0.0.1:$b1_pop3
    server b2 127.0.0.1:$b2_pop3
EOF
    haproxy -c -q -f "$tmp/haproxy/haproxy.cfg" > "$tmp/haproxy/check.log" 2>&1 \
        || { cat "$tmp/haproxy/check.log" >&2; die "haproxy rejected $tmp/haproxy/haproxy.cfg"; }
    haproxy -db -f "$tmp/haproxy/haproxy.cfg" > "$tmp/haproxy/stdout.log" \
        2>> "$tmp/haproxy/stderr.log" &
    started[haproxy]=$!
    wait_port "$h_pop3" "HAProxy (see $tmp/haproxy/stderr.log)"
}

# --- Postern: routes pinned in SQLite, served from the route cache ------------------
bench_seed_sql "$users" > "$tmp/seed.sql"
write_postern_conf() {
    dir=$tmp bench_postern_conf "$b1_imap" "$b1_pop3" "$b2_imap" "$b2_pop3"
}
write_postern_conf
"$postern" -c "$tmp/postern.toml" check > "$tmp/check.log" 2>&1 || { cat "$tmp/check.log" >&2; die "postern check failed"; }
"$postern" -c "$tmp/postern.toml" db seed "$tmp/seed.sql" >> "$tmp/check.log" 2>&1

start_postern() {
    write_postern_conf
    : > "$tmp/postern.log"
    "$postern" -c "$tmp/postern.toml" run 2> "$tmp/postern.log" &
    started[postern]=$!
    wait_for "$tmp/postern.log" 'listener=pop3 .*addr=' "Postern"
    p_addr() { sed -n "s/.*listening listener=$1 .*addr=\([0-9.:]*\).*/\1/p" "$tmp/postern.log" | head -n1; }
    p_imap=$(p_addr imap) p_imaps=$(p_addr imaps) p_pop3=$(p_addr pop3)
}

start_nginx
start_haproxy
start_postern

# --- measurements ---------------------------------------------------------------------
# addr TARGET PROTO TLS -> host:port
addr() {
    case $1/$2/$3 in
        direct/imap/none) echo "127.0.0.1:$b1_imap" ;;
        direct/pop3/none) echo "127.0.0.1:$b1_pop3" ;;
        nginx/imap/none) echo "127.0.0.1:$n_imap" ;;
        nginx/imap/implicit) echo "127.0.0.1:$n_imaps" ;;
        nginx/pop3/none) echo "127.0.0.1:$n_pop3" ;;
        haproxy/imap/none) echo "127.0.0.1:$h_imap" ;;
        haproxy/imap/implicit) echo "127.0.0.1:$h_imaps" ;;
        haproxy/pop3/none) echo "127.0.0.1:$h_pop3" ;;
        postern/imap/none) echo "$p_imap" ;;
        postern/imap/implicit) echo "$p_imaps" ;;
        postern/pop3/none) echo "$p_pop3" ;;
        *) die "no address for $1/$2/$3" ;;
    esac
}
# measured TARGET -> the bench's --pid/--aux-pid options for that target
measured() {
    case $1 in
        direct) ;;
        nginx) echo "--pid $nginx_pids --aux-pid ${started[$auth_role]}" ;;
        haproxy) echo "--pid ${started[haproxy]}" ;;
        postern) echo "--pid ${started[postern]}" ;;
    esac
}
bench_run() { # bench_run TARGET SCENARIO SUBCOMMAND ARGS...
    local target=$1 scenario=$2 sub=$3
    shift 3
    # shellcheck disable=SC2046 # measured prints separate options on purpose
    "$bench" "$sub" --name "$target" --scenario "$scenario" $(measured "$target") "$@" \
        >> "$results" 2> >(tee -a "$log" >&2)
}
tls_opts=(--tls implicit --ca "$tmp/tls/ca.pem")
haproxy_version() { haproxy -v | sed -n 's/^HAProxy version \([^ ]*\).*/HAProxy \1/p'; }

say "load $load_start; $backend_kind backend; nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), $(haproxy_version), $("$postern" --version); results in $out"

for r in $(seq "$repeat"); do
    say "IMAP logins, plaintext, $login_rate/s, $login_n sessions (run $r of $repeat)"
    for t in direct nginx haproxy postern; do
        bench_run "$t" imap-login logins --addr "$(addr $t imap none)" \
            --sessions "$login_n" --rate "$login_rate"
    done
done
say "POP3 logins, plaintext, $login_rate/s, $pop3_n sessions"
for t in direct nginx haproxy postern; do
    bench_run "$t" pop3-login logins --protocol pop3 --addr "$(addr $t pop3 none)" \
        --sessions "$pop3_n" --rate "$login_rate"
done
for r in $(seq "$repeat"); do
    say "relay: $relay_n FETCHes of $relay_size bytes on one connection, then on 4 at once (run $r of $repeat)"
    for t in direct nginx haproxy postern; do
        bench_run "$t" relay relay --addr "$(addr $t imap none)" \
            --size "$relay_size" --repeat "$relay_n"
        bench_run "$t" relay-4 relay --addr "$(addr $t imap none)" \
            --size "$relay_size" --repeat $((relay_n / 4)) --connections 4
    done
done
say "IMAP logins, implicit TLS, $tls_rate/s, $tls_n sessions"
for t in nginx haproxy postern; do
    bench_run "$t" imap-login-tls logins "${tls_opts[@]}" --addr "$(addr $t imap implicit)" \
        --sessions "$tls_n" --rate "$tls_rate"
done
say "TLS handshakes, as fast as $hs_conc concurrent sessions go, $hs_n sessions"
for t in nginx haproxy postern; do
    bench_run "$t" tls-handshake logins "${tls_opts[@]}" --addr "$(addr $t imap implicit)" \
        --no-login --rate 0 --concurrency "$hs_conc" --sessions "$hs_n"
done
# Idle memory: a fresh proxy for every run, or memory freed by earlier runs and kept by
# the allocator would be reused and hide the cost of these sessions. Always in front of
# the fake backend: thousands of sessions in IDLE would be thousands of Dovecot
# processes, and what is measured is the proxy's RSS, which the backend does not change.
use_backends fake
for mode in none implicit; do
    scenario=idle-plain opts=()
    [ "$mode" = implicit ] && scenario=idle-tls opts=("${tls_opts[@]}")
    for t in nginx haproxy postern; do
        say "idle IMAP sessions ($scenario) through $t: $idle_sizes"
        stop "$t"
        "start_$t"
        bench_run "$t" "$scenario" idle "${opts[@]}" --addr "$(addr $t imap "$mode")" \
            --sessions "$idle_sizes" --concurrency "$idle_conc"
    done
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

# --- results --------------------------------------------------------------------------
commit=$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$here" status --porcelain 2>/dev/null | wc -l)
{
    echo "## Results $(date -u +'%Y-%m-%d %H:%M UTC')"
    echo
    echo "- Machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r)"
    echo "- nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') (Debian, mail module, $(nproc) workers); $(haproxy_version) (Debian, TCP mode, $(nproc) threads, splice-auto, TLS terminated on IMAPS); $("$postern" --version) at $commit$([ "$dirty" -gt 0 ] && echo " (plus $dirty uncommitted changes)")"
    if [ "$dovecot" = 1 ]; then
        echo "- Backends: two Dovecot $(dovecot --version | cut -d' ' -f1) (fixtures/dovecot, high-performance login processes) for logins and relay; the fake backend for the idle runs"
    else
        echo "- Backend: the bench's fake IMAP/POP3 backend"
    fi
    echo "- Load average (1, 5, 15 min): $load_start at the start, $load_end at the end"
    echo "- Command: \`scripts/bench-compare.sh${args_given:+ $args_given}\`; logins: $login_n sessions × $repeat runs at $login_rate/s (POP3 $pop3_n), relay: $relay_n × $((relay_size / 1000000)) MB × $repeat runs, TLS: $tls_n logins at $tls_rate/s and $hs_n handshakes, idle: $idle_sizes sessions"
    echo "- Figures are medians over the runs, with the range in parentheses when there were several."
    echo
    "$bench" report "$results"
} > "$out/results.md"
cat "$out/results.md"
say "wrote $out/results.md and $out/results.jsonl"
