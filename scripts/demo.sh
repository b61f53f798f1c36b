#!/usr/bin/env bash
# The demo command of the README: a complete keyless deployment on loopback.
#   PKI (keyless-certs init) -> key server (keyless-origin, holds the site keys)
#   -> the edge enrolls with a one-time token (keyless-edge enroll: its own key pair,
#      a short-lived certificate from the key server; no certificate copied by hand)
#   -> content origin (keyless-test-origin) -> DNS (dnsmasq answers for the origin's name)
#   -> edge (keyless-edge, no site key) -> curl through the edge.
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
wait_for http://127.0.0.1:$KS_METRICS/healthz

# Add an edge: a one-time token on the key server, enrollment on the edge.
"$BIN/keyless-origin" token create --config "$DIR/origin.toml" --group default --ttl 10m \
    > "$DIR/edge-token"
"$BIN/keyless-edge" enroll --server localhost:$ENROLL --ca "$DIR/edge/keyserver-ca.crt" \
    --id demo-edge --token-file "$DIR/edge-token" --out "$DIR/edge/enrolled" > "$DIR/edge-group.toml"
rm -f "$DIR/edge-token"
cat > "$DIR/edge.toml" <<TOML
# keyless-edge configuration of the demo
[listen]
https = "127.0.0.1:$HTTPS"
http = "127.0.0.1:$HTTP"
admin = "127.0.0.1:$ADMIN"

[dns]
nameservers = ["127.0.0.1:$DNS"]

[[site]]
domains = ["example.com", "*.example.com"]
origin = "http://origin.example.com:$ORIGIN"

[keyserver]
TOML
# The lines keyless-edge enroll printed, with the demo's key server filled in.
sed "s/KEY-SERVER:2407/localhost:$KS/" "$DIR/edge-group.toml" >> "$DIR/edge.toml"
"$BIN/keyless-edge" --config "$DIR/edge.toml" 2> "$DIR/edge.log" &
pids+=($!)
wait_for http://127.0.0.1:$ADMIN/healthz

CURL="curl -sS --resolve example.com:$HTTPS:127.0.0.1 --cacert $DIR/client/ca.pem https://example.com:$HTTPS/"
echo
echo "running on loopback:"
echo "  key server   127.0.0.1:$KS (metrics :$KS_METRICS)   holds $DIR/origin/keys/*"
echo "  origin       127.0.0.1:$ORIGIN, named origin.example.com by dnsmasq on :$DNS"
echo "  edge         https :$HTTPS, http :$HTTP, admin :$ADMIN   holds no site key ($DIR/edge/)"
echo "               enrolled as demo-edge with a one-time token; its certificate ($DIR/edge/enrolled/)"
echo "               is renewed by the edge at 2/3 of its lifetime (enrollment API on :$ENROLL)"
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
echo "try it yourself:  $CURL"
echo "                  curl -s http://127.0.0.1:$ADMIN/metrics | grep keyless_edge_handshakes"
echo "Ctrl-C stops everything"
wait
