#!/usr/bin/env bash
# Scheduler overhead with many lanes: 100,000 queued recipients in 1,000 recipient domains,
# whose MX hosts (served by a DNS server on loopback, bench/dns_sites.py) belong to 20
# providers. Each message has 10 recipients in 10 consecutive domains, so in 10 provider
# lanes: 100,000 transactions of one recipient. Cases, all delivering to one smtp-sink:
#
#   20 provider lanes       providers table, 1 connection per lane (20 in all), MX via DNS
#   1,000 domain lanes      no providers: a lane per domain, 1 connection each
#   1 lane, 1 rcpt/txn      one smarthost lane of 20 connections, max_recipients 1: the same
#                           100,000 transactions in a single lane (the overhead baseline)
#   1 lane, 10 rcpt/txn     the same lane carrying each message in one transaction
#
# The mail is queued with delivery paused, then Tern restarts with delivery on; the clock
# runs until the queue is empty.
#
#   bench/lanes.sh [MESSAGES]     # default 10000 messages of 10 recipients each
#
# Prints recipients/s, transactions/s and Tern's peak RSS for each. Binds only 127.0.0.1;
# stops what it starts by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES="${1:-10000}"
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/tern-lanes.XXXXXX")
chmod 755 "$WORK"
TERN_PORT=22565; SINK_PORT=22566; DNS_PORT=22567
cleanup() {
    stop_started
    rm -rf "$WORK"
}
. bench/common.sh
trap cleanup EXIT

TERN_BIN=$(tern_binary)
python3 bench/dns_sites.py $DNS_PORT > "$WORK/dns.log" 2>&1 &
PIDS+=($!)
smtp-sink -u postfix "127.0.0.1:$SINK_PORT" 1024 > /dev/null 2>&1 &
PIDS+=($!)
wait_port $SINK_PORT

config() {  # config NAME PAUSED ROUTING [DELIVERY_EXTRA]
    cat > "$WORK/$1.yaml" <<YAML
hostname: bench.tern
spool: $WORK/$1-spool
listeners:
  - { name: bench, kind: smtp, address: "127.0.0.1:$TERN_PORT" }
access: { mynetworks: ["127.0.0.0/8"] }
limits: { max_connections: 1000, max_connections_per_client: 1000 }
delivery: { paused: $2, resolver: "127.0.0.1:$DNS_PORT", mx_port: $SINK_PORT, mx_tls: none${4:-} }
log: { level: warning }
$3
YAML
}

PROVIDERS="providers:"
for i in $(seq 0 19); do PROVIDERS="$PROVIDERS
  - { name: p$i, mx: [\"*.p$i.sites.example\"], lane: { max_connections: 1, initial_connections: 1 } }"; done
single() {  # single MAX_RECIPIENTS
    echo "routes:
  - { name: one, domains: [\"*\"], transport: smarthost, smarthost: { host: 127.0.0.1, port: $SINK_PORT, tls: none }, lane: { max_connections: 20, initial_connections: 20, max_recipients: $1 } }"
}

run() {  # run NAME ROUTING [DELIVERY_EXTRA] -> "recipients_per_s peak_rss_kb"
    config "$1" true "$2" "${3:-}"
    "$TERN_BIN" serve --config "$WORK/$1.yaml" 2>>"$WORK/$1.log" &
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
    queued=$(tern_queued "$WORK/$1-spool/queue")
    [ "$queued" = "$MESSAGES" ] || { echo "only $queued of $MESSAGES messages queued" >&2; exit 1; }
    local t0 t1
    t0=$(date +%s.%N)
    "$TERN_BIN" serve --config "$WORK/$1.yaml" 2>>"$WORK/$1.log" &
    pid=$!
    while [ "$(tern_queued "$WORK/$1-spool/queue")" != 0 ]; do sleep 0.2; done
    t1=$(date +%s.%N)
    local rss
    rss=$(awk '/VmHWM/{print $2}' /proc/$pid/status)
    kill $pid; wait $pid 2>/dev/null || true
    awk -v n=$((MESSAGES * 10)) -v a="$t0" -v b="$t1" -v r="$rss" 'BEGIN { printf "%.0f %d", n / (b - a), r }'
}

echo "$((MESSAGES * 10)) recipients in $MESSAGES messages, 1,000 domains, 20 providers"
printf "%-28s %14s %16s %14s\n" case "recipients/s" "transactions/s" "peak RSS kB"
row() {  # row LABEL RCPT_PER_TXN NAME ROUTING [DELIVERY_EXTRA]
    local rate rss
    read -r rate rss <<<"$(run "$3" "$4" "${5:-}")"
    printf "%-28s %14s %16s %14s\n" "$1" "$rate" "$((rate / $2))" "$rss" >&2
    echo "$rate"
}
many=$(row "20 provider lanes" 1 many "$PROVIDERS")
domains=$(row "1,000 domain lanes" 1 domains "" ", lane: { max_connections: 1, initial_connections: 1 }")
one=$(row "1 lane, 1 rcpt/txn" 1 one "$(single 1)")
batched=$(row "1 lane, 10 rcpt/txn" 10 batched "$(single 10)")
echo "20 provider lanes / 1 lane, same transactions: $(awk -v a="$many" -v b="$one" 'BEGIN{printf "%.2f", a/b}')"
echo "1,000 domain lanes / 1 lane, same transactions: $(awk -v a="$domains" -v b="$one" 'BEGIN{printf "%.2f", a/b}')"
grep -h "error\|warning" "$WORK"/*.log | head -5 || true
