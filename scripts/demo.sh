#!/usr/bin/env bash
# The demo command of the README: a complete keyless deployment on loopback.
#   PKI (keyless-certs init) -> key server (keyless-origin, holds the site keys)
#   -> the edge enrolls with a one-time token (keyless-edge enroll: its own key pair,
#      a short-lived certificate from the key server; no certificate copied by hand)
#   -> content origin (keyless-test-origin) -> DNS (dnsmasq answers for the origin's name)
#   -> edge (keyless-edge, no site key) -> curl through the edge
#   -> a second edge sharing ticket keys (from the key server) and a Redis session
#      store with the first: a session made on one resumes on the other, with no
#      private-key operation at the key server.
# Ctrl-C stops all of it.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
install_deps

cargo build --release --locked -p keyless-certs -p keyless-origin -p keyless-edge
cargo build --release --locked -p keyless-tests --bin keyless-test-origin
BIN=$PWD/target/release
DIR=$PWD/demo
KS=2407 KS_METRICS=2406 ENROLL=2408 HTTPS=8443 HTTP=8080 ADMIN=9090 ORIGIN=8000 DNS=5353
HTTPS_B=8444 ADMIN_B=9091 REDIS=6390

rm -rf "$DIR"
"$BIN/keyless-certs" init --out "$DIR" --domain example.com \
    --keyserver-listen 127.0.0.1:$KS --metrics-listen 127.0.0.1:$KS_METRICS \
    --enroll --enroll-listen 127.0.0.1:$ENROLL >/dev/null
# The demo's edge enrolls itself below; the certificate init made for it is not used.
rm -f "$DIR/edge/edge.crt" "$DIR/edge/edge.key"

pids=()
cleanup() {
    trap - EXIT INT TERM
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "demo stopped"
}
trap cleanup EXIT INT TERM
wait_for() { # url
    for _ in $(seq 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "demo: $1 did not come up; logs are in $DIR/*.log" >&2
    exit 1
}

"$BIN/keyless-origin" --config "$DIR/origin.toml" 2> "$DIR/keyserver.log" &
pids+=($!)
"$BIN/keyless-test-origin" --listen 127.0.0.1:$ORIGIN --name "the content origin" 2> "$DIR/origin.log" &
pids+=($!)
/usr/sbin/dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts \
    --listen-address=127.0.0.1 --bind-interfaces --port=$DNS --user=root \
    --address=/origin.example.com/127.0.0.1 --log-facility="$DIR/dns.log" &
pids+=($!)
redis-server --bind 127.0.0.1 --port $REDIS --save "" --appendonly no --dir "$DIR" \
    > "$DIR/redis.log" 2>&1 &
pids+=($!)
wait_for http://127.0.0.1:$KS_METRICS/healthz

# Add an edge: a one-time token on the key server, enrollment on the edge, a config.
add_edge() { # name https-port admin-port [http-port]
    local name=$1 https=$2 admin=$3 http=${4:-}
    "$BIN/keyless-origin" token create --config "$DIR/origin.toml" --group default --ttl 10m \
        > "$DIR/$name-token"
    "$BIN/keyless-edge" enroll --server localhost:$ENROLL --ca "$DIR/edge/keyserver-ca.crt" \
        --id "$name" --token-file "$DIR/$name-token" --out "$DIR/edge/$name" > "$DIR/$name-group.toml"
    rm -f "$DIR/$name-token"
    {
        echo "# keyless-edge configuration of the demo's $name"
        echo "[listen]"
        echo "https = \"127.0.0.1:$https\""
        [ -z "$http" ] || echo "http = \"127.0.0.1:$http\""
        echo "admin = \"127.0.0.1:$admin\""
        cat <<TOML

[dns]
nameservers = ["127.0.0.1:$DNS"]

# Sessions resume on any edge: tickets sealed with the group's keys (from the key
# server), session ids in the shared Redis, sealed with the same keys.
[sessions]
redis = ["redis://127.0.0.1:$REDIS"]

[[site]]
domains = ["example.com", "*.example.com"]
origin = "http://origin.example.com:$ORIGIN"

[keyserver]
TOML
        # The lines keyless-edge enroll printed, with the demo's key server filled in.
        sed "s/KEY-SERVER:2407/localhost:$KS/" "$DIR/$name-group.toml"
    } > "$DIR/$name.toml"
    "$BIN/keyless-edge" --config "$DIR/$name.toml" 2> "$DIR/$name.log" &
    pids+=($!)
    wait_for "http://127.0.0.1:$admin/healthz"
}
add_edge demo-edge $HTTPS $ADMIN $HTTP
add_edge demo-edge-b $HTTPS_B $ADMIN_B
# The edges hold the group's ticket keys once they have fetched them.
for log in "$DIR/demo-edge.log" "$DIR/demo-edge-b.log"; do
    for _ in $(seq 100); do grep -q "session-ticket keys of the group in use" "$log" && break; sleep 0.1; done
done

CURL="curl -sS --resolve example.com:$HTTPS:127.0.0.1 --cacert $DIR/client/ca.pem https://example.com:$HTTPS/"
echo
echo "running on loopback:"
echo "  key server   127.0.0.1:$KS (metrics :$KS_METRICS)   holds $DIR/origin/keys/*"
echo "  origin       127.0.0.1:$ORIGIN, named origin.example.com by dnsmasq on :$DNS"
echo "  edge A       https :$HTTPS, http :$HTTP, admin :$ADMIN   holds no site key ($DIR/edge/)"
echo "               enrolled as demo-edge with a one-time token; its certificate ($DIR/edge/demo-edge/)"
echo "               is renewed by the edge at 2/3 of its lifetime (enrollment API on :$ENROLL)"
echo "  edge B       https :$HTTPS_B, admin :$ADMIN_B   enrolled as demo-edge-b"
echo "  redis        127.0.0.1:$REDIS   the edges' shared session store (sealed entries)"
echo
echo "\$ $CURL"
$CURL
echo
echo "the key server signed that handshake:"
grep "op=ecdsa-sign" "$DIR/keyserver.log" | tail -1 | sed 's/^/  /'
echo
CACHED="https://example.com:$HTTPS/bytes?n=64&cc=max-age%3D60"
echo "the edge caches what the origin allows (twice $CACHED):"
for _ in 1 2; do
    curl -sS -o /dev/null -D - --resolve example.com:$HTTPS:127.0.0.1 --cacert "$DIR/client/ca.pem" "$CACHED" \
        | grep -i '^cache-status' | sed 's/^/  /'
done
echo
key_ops() { # private-key operations the key server has made
    curl -fs http://127.0.0.1:$KS_METRICS/metrics \
        | awk '/^keyless_ops_total\{/ && /result="ok"/ && (/-sign/ || /rsa-decrypt/) {n += $NF} END {print n + 0}'
}
s_client() { # port, extra options...
    local port=$1
    shift
    printf 'GET / HTTP/1.0\r\nHost: example.com\r\n\r\n' | openssl s_client -connect 127.0.0.1:$port \
        -servername example.com -CAfile "$DIR/client/ca.pem" -ign_eof "$@" 2>/dev/null
}
echo "a session made on edge A resumes on edge B (openssl s_client -sess_out, then -sess_in):"
for kind in "TLS 1.3 ticket:-tls1_3" "TLS 1.2 session id (Redis):-tls1_2 -no_ticket"; do
    label=${kind%%:*} opts=${kind#*:}
    s_client $HTTPS $opts -sess_out "$DIR/session.pem" | grep -E '^(New|Reused),' | head -1 \
        | sed "s/^/  edge A, $label: /"
    before=$(key_ops)
    s_client $HTTPS_B $opts -sess_in "$DIR/session.pem" | grep -E '^(New|Reused),' | head -1 \
        | sed "s/^/  edge B, $label: /"
    echo "  key server private-key operations: $before before edge B's handshake, $(key_ops) after"
done
curl -fs http://127.0.0.1:$ADMIN_B/metrics | grep '^keyless_edge_resumptions_total' | sed 's/^/  edge B: /'
echo
echo "try it yourself:  $CURL"
echo "                  curl -s http://127.0.0.1:$ADMIN/metrics | grep keyless_edge_handshakes"
echo "Ctrl-C stops everything"
wait
