#!/usr/bin/env bash
# bench-compare.sh: direct vs nginx's mail module vs Postern, side by side, in one run.
#
# Builds Postern and postern-bench (release), installs nginx with the mail module from
# Debian when missing, starts the bench's fake IMAP/POP3 backend, a fake auth_http for
# nginx, nginx (its own master, prefix in a temp dir) and Postern, all on loopback and
# free ports, runs the same load against each, and writes a markdown table
# (docs/benchmarks.md explains every column). Everything it started is stopped on exit,
# failure included.
#
#   scripts/bench-compare.sh                 # full run, about 7 minutes plus the build
#   scripts/bench-compare.sh --quick         # smaller runs, about 3 minutes
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
quick=0 repeat="" out="" keep=0 build=1 install=1 max_load=""
while [ $# -gt 0 ]; do
    case $1 in
        --quick) quick=1 ;;
        --repeat) repeat=$2; shift ;;
        --out) out=$2; shift ;;
        --keep) keep=1 ;;
        --no-build) build=0 ;;
        --no-install) install=0 ;;
        --max-load) max_load=$2; shift ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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

say() { echo "== $*" | tee -a "$log" >&2; }
die() { echo "bench-compare: $*" >&2; exit 1; }

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
if [ "$install" = 1 ] && ! { command -v nginx >/dev/null && [ -f "$mail_module" ]; }; then
    say "installing nginx and its mail module from Debian"
    [ "$(id -u)" = 0 ] || die "installing nginx needs root (or install nginx and libnginx-mod-mail yourself)"
    # Debian starts a freshly installed nginx on port 80; policy-rc.d forbids that.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        nginx libnginx-mod-mail >> "$log" 2>&1
    if [ "$created_policy" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
        created_policy=0
    fi
fi
command -v nginx >/dev/null && [ -f "$mail_module" ] || die "nginx with $mail_module is not installed"

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

wait_for() { # wait_for FILE PATTERN WHAT
    for _ in $(seq 300); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    die "$3 did not start; see $1"
}
json_port() { sed -n "s/.*\"$2\":\"127\.0\.0\.1:\([0-9]*\)\".*/\1/p" "$1" | head -n1; }

"$bench" fake-backend > "$tmp/backend.out" 2> "$tmp/backend.err" &
started[backend]=$!
wait_for "$tmp/backend.out" '"event":"ready"' "the fake backend"
b_imap=$(json_port "$tmp/backend.out" imap)
b_pop3=$(json_port "$tmp/backend.out" pop3)

"$bench" fake-auth-http --imap-port "$b_imap" --pop3-port "$b_pop3" \
    > "$tmp/auth.out" 2> "$tmp/auth.err" &
started[auth]=$!
wait_for "$tmp/auth.out" '"event":"ready"' "the fake auth_http"
auth_port=$(json_port "$tmp/auth.out" addr)

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

# --- Postern: routes pinned in SQLite, served from the route cache ------------------
users=100
{
    for i in $(seq 0 $((users - 1))); do
        echo "INSERT INTO routes (username, backend) VALUES ('bench$i@example.test', 'fake') ON CONFLICT (username) DO UPDATE SET backend = excluded.backend;"
    done
} > "$tmp/seed.sql"
cat > "$tmp/postern.toml" <<EOF
[log]
# Per-session info lines off during load, listener addresses on.
level = "warn,postern_server::server=info"

[tls]
cert = "$tmp/tls/cert.pem"
key = "$tmp/tls/key.pem"

[routing]
store = "sql"
unknown_users = "hash"

[routing.sql]
url = "sqlite:$tmp/routes.db"

[routing.cache]
# Every measured login is a route-cache hit (the warm-up logs every user in first).
ttl = "1h"

[limits]
# Every session comes from 127.0.0.1 and 100 users share 8 000 idle sessions: keep the
# accounting running (it is part of a login's cost) but out of the way.
trusted_networks = []
max_connections_per_ip = 1000000
connection_rate_per_ip = 100000000
max_sessions_per_user = 1000000

[backends.fake]
host = "127.0.0.1"
[backends.fake.imap]
port = $b_imap
[backends.fake.pop3]
port = $b_pop3

[[listeners]]
name = "imap"
protocol = "imap"
bind = "127.0.0.1:0"
tls = "none"
insecure_plaintext_auth = true

[[listeners]]
name = "imaps"
protocol = "imap"
bind = "127.0.0.1:0"
tls = "implicit"

[[listeners]]
name = "pop3"
protocol = "pop3"
bind = "127.0.0.1:0"
tls = "none"
insecure_plaintext_auth = true
EOF
"$postern" -c "$tmp/postern.toml" check > "$tmp/check.log" 2>&1 || { cat "$tmp/check.log" >&2; die "postern check failed"; }
"$postern" -c "$tmp/postern.toml" db seed "$tmp/seed.sql" >> "$tmp/check.log" 2>&1

start_postern() {
    : > "$tmp/postern.log"
    "$postern" -c "$tmp/postern.toml" run 2> "$tmp/postern.log" &
    started[postern]=$!
    wait_for "$tmp/postern.log" 'listener=pop3 .*addr=' "Postern"
    p_addr() { sed -n "s/.*listening listener=$1 .*addr=\([0-9.:]*\).*/\1/p" "$tmp/postern.log" | head -n1; }
    p_imap=$(p_addr imap) p_imaps=$(p_addr imaps) p_pop3=$(p_addr pop3)
}

start_nginx
start_postern

# --- measurements ---------------------------------------------------------------------
# addr TARGET PROTO TLS -> host:port
addr() {
    case $1/$2/$3 in
        direct/imap/none) echo "127.0.0.1:$b_imap" ;;
        direct/pop3/none) echo "127.0.0.1:$b_pop3" ;;
        nginx/imap/none) echo "127.0.0.1:$n_imap" ;;
        nginx/imap/implicit) echo "127.0.0.1:$n_imaps" ;;
        nginx/pop3/none) echo "127.0.0.1:$n_pop3" ;;
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
        nginx) echo "--pid $nginx_pids --aux-pid ${started[auth]}" ;;
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

say "load $load_start; nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), $("$postern" --version); results in $out"

for r in $(seq "$repeat"); do
    say "IMAP logins, plaintext, $login_rate/s, $login_n sessions (run $r of $repeat)"
    for t in direct nginx postern; do
        bench_run "$t" imap-login logins --addr "$(addr $t imap none)" \
            --sessions "$login_n" --rate "$login_rate"
    done
done
say "POP3 logins, plaintext, $login_rate/s, $pop3_n sessions"
for t in direct nginx postern; do
    bench_run "$t" pop3-login logins --protocol pop3 --addr "$(addr $t pop3 none)" \
        --sessions "$pop3_n" --rate "$login_rate"
done
for r in $(seq "$repeat"); do
    say "relay: $relay_n FETCHes of $relay_size bytes (run $r of $repeat)"
    for t in direct nginx postern; do
        bench_run "$t" relay relay --addr "$(addr $t imap none)" \
            --size "$relay_size" --repeat "$relay_n"
    done
done
say "IMAP logins, implicit TLS, $tls_rate/s, $tls_n sessions"
for t in nginx postern; do
    bench_run "$t" imap-login-tls logins "${tls_opts[@]}" --addr "$(addr $t imap implicit)" \
        --sessions "$tls_n" --rate "$tls_rate"
done
say "TLS handshakes, as fast as $hs_conc concurrent sessions go, $hs_n sessions"
for t in nginx postern; do
    bench_run "$t" tls-handshake logins "${tls_opts[@]}" --addr "$(addr $t imap implicit)" \
        --no-login --rate 0 --concurrency "$hs_conc" --sessions "$hs_n"
done
# Idle memory: a fresh proxy for every run, or memory freed by earlier runs and kept by
# the allocator would be reused and hide the cost of these sessions.
for mode in none implicit; do
    scenario=idle-plain opts=()
    [ "$mode" = implicit ] && scenario=idle-tls opts=("${tls_opts[@]}")
    for t in nginx postern; do
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
    echo "- nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') (Debian, mail module, $(nproc) workers); $("$postern" --version) at $commit$([ "$dirty" -gt 0 ] && echo " (plus $dirty uncommitted changes)")"
    echo "- Load average (1, 5, 15 min): $load_start at the start, $load_end at the end"
    echo "- Command: \`scripts/bench-compare.sh${args_given:+ $args_given}\`; logins: $login_n sessions × $repeat runs at $login_rate/s (POP3 $pop3_n), relay: $relay_n × $((relay_size / 1000000)) MB × $repeat runs, TLS: $tls_n logins at $tls_rate/s and $hs_n handshakes, idle: $idle_sizes sessions"
    echo "- Figures are medians over the runs, with the range in parentheses when there were several."
    echo
    "$bench" report "$results"
} > "$out/results.md"
cat "$out/results.md"
say "wrote $out/results.md and $out/results.jsonl"
