# Shared by bench-compare.sh, bench-idle.sh and bench-login.sh: the Postern and the
# Dovecot the bench measures, so that a before/after of one figure runs exactly the
# configuration of the full comparison, the helpers they use to wait for what they
# start, and the run and the rounds of the two before/after scripts. Expects `die`,
# `$here` and `$bench` (postern-bench) to be defined when its functions are called.

# bench_begin KIND: where a before/after run writes ($out, default var/bench/KIND-DATE;
# $results, $log), its temp dir ($tmp), `say`, and `started` (role -> pid): everything
# started there is stopped, and $tmp removed, on exit, failure and Ctrl-C included.
bench_begin() {
    out=${out:-$here/var/bench/$1-$(date -u +%Y%m%dT%H%M%SZ)}
    mkdir -p "$out"
    results=$out/results.jsonl log=$out/run.log
    : > "$results"
    : > "$log"
    tmp=$(mktemp -d "/tmp/postern-bench-$1.XXXXXX")
    declare -gA started=()
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}
bench_cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${started[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${started[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$tmp"
    exit "$rc"
}
say() { echo "== $*" | tee -a "$log" >&2; }

# bench_rounds LISTENER MEASURE: for each of $rounds rounds and each Postern in
# `builds`, a fresh Postern on $tmp/postern.toml, then `MEASURE BUILD ADDR PID` (ADDR
# the LISTENER's address), then the Postern stopped. Fresh each time: what an earlier
# run left in the allocator or the route cache must not flatter the next one.
bench_rounds() {
    local listener=$1 measure=$2 r b addr
    for r in $(seq "$rounds"); do
        for b in "${builds[@]}"; do
            : > "$tmp/postern.log"
            "$b" -c "$tmp/postern.toml" run 2> "$tmp/postern.log" &
            started[postern]=$!
            wait_for "$tmp/postern.log" "listener=$listener .*addr=" "Postern ($b)"
            addr=$(sed -n "s/.*listening listener=$listener .*addr=\([0-9.:]*\).*/\1/p" "$tmp/postern.log" | head -n1)
            say "round $r: $b"
            "$measure" "$b" "$addr" "${started[postern]}"
            kill -TERM "${started[postern]}"
            wait "${started[postern]}" 2>/dev/null || true
            unset "started[postern]"
        done
    done
}

wait_for() { # wait_for FILE PATTERN WHAT
    for _ in $(seq 300); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    die "$3 did not start; see $1"
}

# json_port FILE NAME: the port of "NAME":"127.0.0.1:PORT" in a ready line.
json_port() { sed -n "s/.*\"$2\":\"127\.0\.0\.1:\([0-9]*\)\".*/\1/p" "$1" | head -n1; }

# bench_postern_conf B1_IMAP B1_POP3 B2_IMAP B2_POP3: writes $dir/postern.toml (routes
# in $dir/routes.db, certificates in $dir/tls/).
bench_postern_conf() {
    cat > "$dir/postern.toml" <<EOF
[log]
# Per-session info lines off during load, listener addresses on.
level = "warn,postern_server::server=info"

[tls]
cert = "$dir/tls/cert.pem"
key = "$dir/tls/key.pem"

[routing]
store = "sql"
unknown_users = "hash"

[routing.sql]
url = "sqlite:$dir/routes.db"

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
# Logins in flight from one address count against the failure budget (a burst of
# 128 concurrent logins from 127.0.0.1 would be refused as a brute force).
max_failures_per_ip = 1000000
max_failures_per_user = 1000000

[backends.b1]
host = "127.0.0.1"
[backends.b1.imap]
port = $1
[backends.b1.pop3]
port = $2

[backends.b2]
host = "127.0.0.1"
[backends.b2.imap]
port = $3
[backends.b2.pop3]
port = $4

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
}

# bench_seeded_postern B1_IMAP B1_POP3 B2_IMAP B2_POP3 USERS: bench_postern_conf in
# $tmp, its certificates, and its route table seeded (by the first of `builds`).
bench_seeded_postern() {
    "$here/scripts/gen-certs.sh" "$tmp/tls" > /dev/null
    dir=$tmp bench_postern_conf "$1" "$2" "$3" "$4"
    bench_seed_sql "$5" > "$tmp/seed.sql"
    "${builds[0]}" -c "$tmp/postern.toml" db seed "$tmp/seed.sql" > "$tmp/seed.log" 2>&1 \
        || { cat "$tmp/seed.log" >&2; die "seeding the route table failed"; }
}

# bench_seed_sql USERS: the SQL that pins benchN@example.test to b1 and b2 in turn.
bench_seed_sql() {
    local i
    for i in $(seq 0 $(($1 - 1))); do
        echo "INSERT INTO routes (username, backend) VALUES ('bench$i@example.test', 'b$((i % 2 + 1))') ON CONFLICT (username) DO UPDATE SET backend = excluded.backend;"
    done
}

wait_port() { # wait_port PORT WHAT: until a connection to 127.0.0.1:PORT succeeds
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "$2 did not start"
}

# bench_start_dovecot NAME ROOT USERS: a Dovecot backend in ROOT/NAME, its mail in
# ROOT/mail (shared by every backend under ROOT), users bench0..bench(USERS-1)@example.test
# with the password benchpw. Runs in the background; sets bench_dovecot_pid and writes
# its IMAP and POP3 ports to ROOT/NAME/ports. ROOT's parents must be searchable by
# Dovecot's unprivileged users.
bench_start_dovecot() {
    local name=$1 d=$2/$1 ports i
    mapfile -t ports < <("$bench" free-ports 4)
    "$here/scripts/dovecot-conf.sh" "$name" "$d" "$2/mail" "${ports[@]}" > /dev/null
    # The bench measures the proxies, so Dovecot runs as it would for throughput: login
    # processes serve many connections (its high-performance mode) and mail processes
    # are reused, instead of a fork per connection and per login.
    cat > "$d/extra.conf" <<CONF
service imap-login {
  service_count = 0
  process_min_avail = $(nproc)
  client_limit = 4000
}
service pop3-login {
  service_count = 0
  process_min_avail = $(nproc)
  client_limit = 4000
}
service imap {
  service_count = 1000
  process_min_avail = 4
}
service pop3 {
  service_count = 1000
  process_min_avail = 4
}
mail_max_userip_connections = 10000
auth_cache_size = 1M
CONF
    for i in $(seq 0 $(($3 - 1))); do
        echo "bench$i@example.test:{PLAIN}benchpw::::::"
    done > "$d/users"
    dovecot -F -c "$d/dovecot.conf" > /dev/null 2>> "$d/stderr.log" &
    bench_dovecot_pid=$!
    wait_port "${ports[0]}" "Dovecot $name (see $d/dovecot.log)"
    echo "${ports[0]} ${ports[1]}" > "$d/ports"
}
