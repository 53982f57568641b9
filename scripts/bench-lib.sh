# Shared by bench-compare.sh and bench-idle.sh: the Postern the bench measures, so
# that an idle-only before/after runs exactly the configuration of the full comparison,
# and the helpers both use to wait for what they start. Expects `die` to be defined.

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

# bench_seed_sql USERS: the SQL that pins benchN@example.test to b1 and b2 in turn.
bench_seed_sql() {
    local i
    for i in $(seq 0 $(($1 - 1))); do
        echo "INSERT INTO routes (username, backend) VALUES ('bench$i@example.test', 'b$((i % 2 + 1))') ON CONFLICT (username) DO UPDATE SET backend = excluded.backend;"
    done
}
