#!/usr/bin/env bash
# Accept-and-queue benchmark: Postfix's smtp-source against Tern, and against a Postfix
# instance set up the same way in the same run (own config directory, loopback port, mail
# held in its queue by defer_transports = smtp), so both only accept and fsync.
#
#   bench/accept.sh [MESSAGES]        # default 5000 per case
#   BENCH_DIR=/some/dir bench/accept.sh   # where the spools go (default /var/tmp)
#
# Prints, for 1 and 20 sessions and 1 KB and 100 KB messages: messages/s for each, the
# ratio, server CPU per message, and Tern's peak RSS. Must run as root (Postfix drops to
# its own user). Binds only 127.0.0.1. Everything it starts it stops by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES="${1:-5000}"
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/tern-bench.XXXXXX")
chmod 755 "$WORK"  # Postfix daemons run as the postfix user and must reach their queue
TERN_PORT=22525
POSTFIX_PORT=22526
TERN_PID=""
PF="$WORK/postfix"

cleanup() {
    [ -n "$TERN_PID" ] && kill "$TERN_PID" 2>/dev/null && wait "$TERN_PID" 2>/dev/null || true
    [ -f "$PF/conf/main.cf" ] && script -qec "postfix -c $PF/conf stop" /dev/null >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

. bench/common.sh
TERN_BIN=$(tern_binary)


# --- Tern ---
mkdir -p "$WORK/tern"
cat > "$WORK/tern/tern.yaml" <<YAML
hostname: bench.tern
spool: $WORK/tern/spool
listeners:
  - { name: bench, kind: smtp, address: "127.0.0.1:$TERN_PORT" }
access:
  mynetworks: ["127.0.0.0/8"]
limits: { max_message_size: 10MB, max_connections: 1000, max_connections_per_client: 1000 }
# Accept and queue only, like the Postfix instance with defer_transports.
delivery: { paused: true }
log: { level: warning }
YAML
"$TERN_BIN" serve --config "$WORK/tern/tern.yaml" 2>"$WORK/tern/log" &
TERN_PID=$!

# --- Postfix ---
# defer_transports: mail stays in Postfix's queue, as Tern's bench config keeps it queued.
postfix_instance "$PF" $POSTFIX_PORT "defer_transports = smtp"
pf check
pf start

wait_port $TERN_PORT
wait_port $POSTFIX_PORT


# run PORT SESSIONS SIZE_BYTES -> "msgs_per_s server_cpu_ms_per_msg"
run() {
    local port=$1 sessions=$2 size=$3
    local b0 t0 t1 b1 client
    b0=$(busy_ticks); t0=$(date +%s.%N)
    client=$( { /usr/bin/time -f "%U %S" smtp-source -s "$sessions" -m "$MESSAGES" -l "$size" \
        -f bench@client.test -t user@example.org "127.0.0.1:$port" >/dev/null; } 2>&1 | tail -1)
    t1=$(date +%s.%N); b1=$(busy_ticks)
    awk -v n="$MESSAGES" -v t0="$t0" -v t1="$t1" -v b0="$b0" -v b1="$b1" -v hz="$HZ" -v c="$client" 'BEGIN {
        split(c, u, " "); server = (b1 - b0) / hz - (u[1] + u[2]);
        printf "%.0f %.2f", n / (t1 - t0), server * 1000 / n }'
}

queued_postfix() { find "$PF/queue/deferred" "$PF/queue/active" "$PF/queue/incoming" -type f 2>/dev/null | wc -l; }

echo "messages per case: $MESSAGES (smtp-source, a new connection per message)"
printf "%-22s %12s %12s %8s %16s %16s\n" case "tern msg/s" "postfix msg/s" ratio "tern CPU ms/msg" "postfix CPU ms/msg"
for size in 1024 102400; do
    for sessions in 1 20; do
        read -r t_rate t_cpu <<<"$(run $TERN_PORT $sessions $size)"
        read -r p_rate p_cpu <<<"$(run $POSTFIX_PORT $sessions $size)"
        printf "%-22s %12s %12s %8s %16s %16s\n" "${sessions} sess, $((size / 1024)) KB" "$t_rate" "$p_rate" \
            "$(awk -v a="$t_rate" -v b="$p_rate" 'BEGIN{printf "%.2fx", a/b}')" "$t_cpu" "$p_cpu"
    done
done
sleep 1
echo "tern queued: $(tern_queued "$WORK/tern/spool/queue") messages; postfix queued: $(queued_postfix) files"
echo "tern peak RSS: $(awk '/VmHWM/{print $2, $3}' /proc/$TERN_PID/status)"
