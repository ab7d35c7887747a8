#!/usr/bin/env bash
# Scheduler overhead with many lanes: 100,000 queued recipients in 1,000 recipient domains,
# whose MX hosts (served by a DNS server on loopback, bench/dns_sites.py) belong to 20
# providers: 20 provider lanes of 1 connection each, against the same load through one
# smarthost lane of 20 connections. Both deliver to one smtp-sink. The mail is queued with
# delivery paused, then Tern restarts with delivery on; the clock runs until the queue is
# empty.
#
#   bench/lanes.sh [MESSAGES]     # default 10000 messages of 10 recipients each
#
# Prints recipients/s for each and Tern's peak RSS. Binds only 127.0.0.1; stops what it
# starts by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES="${1:-10000}"
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/tern-lanes.XXXXXX")
chmod 755 "$WORK"
TERN_PORT=22565; SINK_PORT=22566; DNS_PORT=22567
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
. bench/common.sh

swift build -c release --product tern >/dev/null
python3 bench/dns_sites.py $DNS_PORT > "$WORK/dns.log" 2>&1 &
PIDS+=($!)
smtp-sink -u postfix "127.0.0.1:$SINK_PORT" 256 > /dev/null 2>&1 &
PIDS+=($!)
wait_port $SINK_PORT

config() {  # config NAME PAUSED ROUTING
    cat > "$WORK/$1.yaml" <<YAML
hostname: bench.tern
spool: $WORK/$1-spool
listeners:
  - { name: bench, kind: smtp, address: "127.0.0.1:$TERN_PORT" }
access: { mynetworks: ["127.0.0.0/8"] }
limits: { max_connections: 1000, max_connections_per_client: 1000 }
delivery: { paused: $2, resolver: "127.0.0.1:$DNS_PORT", mx_port: $SINK_PORT, mx_tls: none }
log: { level: warning }
$3
YAML
}

PROVIDERS="providers:"
for i in $(seq 0 19); do PROVIDERS="$PROVIDERS
  - { name: p$i, mx: [\"*.p$i.sites.example\"], lane: { max_connections: 1, initial_connections: 1 } }"; done
SINGLE="routes:
  - { name: one, domains: [\"*\"], transport: smarthost, smarthost: { host: 127.0.0.1, port: $SINK_PORT, tls: none }, lane: { max_connections: 20 } }"

run() {  # run NAME ROUTING -> "recipients_per_s peak_rss_kb"
    config "$1" true "$2"
    .build/release/tern serve --config "$WORK/$1.yaml" 2>>"$WORK/$1.log" &
    local pid=$!
    wait_port $TERN_PORT
    python3 - "$TERN_PORT" "$MESSAGES" <<'PY'
import smtplib, sys, threading
port, total = int(sys.argv[1]), int(sys.argv[2])
def worker(k):
    s = smtplib.SMTP("127.0.0.1", port)
    for m in range(k, total, 8):
        rcpts = [f"u{m}.{j}@d{(m * 10 + j) % 1000}.bench.example" for j in range(10)]
        s.sendmail("bench@client.test", rcpts, b"Subject: lanes\r\n\r\n" + b"x" * 1000 + b"\r\n")
    s.quit()
threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
[t.start() for t in threads]; [t.join() for t in threads]
PY
    kill $pid; wait $pid 2>/dev/null || true
    sed -i "s/paused: true/paused: false/" "$WORK/$1.yaml"
    local queued
    queued=$(ls "$WORK/$1-spool/queue" | wc -l)
    [ "$queued" = "$MESSAGES" ] || { echo "only $queued of $MESSAGES messages queued" >&2; exit 1; }
    local t0 t1
    t0=$(date +%s.%N)
    .build/release/tern serve --config "$WORK/$1.yaml" 2>>"$WORK/$1.log" &
    pid=$!
    while [ -n "$(ls -A "$WORK/$1-spool/queue")" ]; do sleep 0.2; done
    t1=$(date +%s.%N)
    local rss
    rss=$(awk '/VmHWM/{print $2}' /proc/$pid/status)
    kill $pid; wait $pid 2>/dev/null || true
    awk -v n=$((MESSAGES * 10)) -v a="$t0" -v b="$t1" -v r="$rss" 'BEGIN { printf "%.0f %d", n / (b - a), r }'
}

echo "$((MESSAGES * 10)) recipients in $MESSAGES messages, 1,000 domains"
read -r many many_rss <<<"$(run many "$PROVIDERS")"
read -r one one_rss <<<"$(run one "$SINGLE")"
printf "%-34s %14s %14s\n" case "recipients/s" "peak RSS kB"
printf "%-34s %14s %14s\n" "20 provider lanes (MX, DNS)" "$many" "$many_rss"
printf "%-34s %14s %14s\n" "1 smarthost lane" "$one" "$one_rss"
echo "20 lanes / 1 lane: $(awk -v a="$many" -v b="$one" 'BEGIN{printf "%.2f", a/b}')"
grep -h "error\|warning" "$WORK"/*.log | head -5 || true
