#!/usr/bin/env bash
# End-to-end relay benchmark: smtp-source -> relay -> smtp-sink, counted at the sink until
# every message has arrived, for Tern and for a Postfix instance relaying to the same sink
# (relayhost) in the same run.
#
#   bench/relay.sh [MESSAGES]              # default 5000 per case
#   QUEUE=100000 bench/relay.sh 0          # only the queue case: RSS with that many queued
#   BENCH_DIR=/some/dir bench/relay.sh     # where the spools go (default /var/tmp)
#
# Prints, for 1 and 20 sessions and 1 KB and 100 KB messages, each on a new connection, and
# for 20 sessions of 1 KB messages over kept connections (smtp-source -d, as pooled
# application clients send): end-to-end messages/s for each, the ratio, server CPU per
# message (machine busy time minus smtp-source and smtp-sink), context switches per message
# (Tern's own threads; and machine-wide, load generator included, for both) and peak RSS
# (Tern: VmHWM; Postfix: the largest sum over its processes, sampled), then accept-to-delivered
# latency at 20 sessions of 1 KB (p50, p99, max; bench/latency.py). Both
# servers fsync what they accept before answering 250. Must run as root (Postfix drops to
# its own user). Binds only 127.0.0.1. Everything it starts it stops by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES="${1:-5000}"
QUEUE="${QUEUE:-0}"
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/tern-relay.XXXXXX")
chmod 755 "$WORK"
TERN_PORT=22535
POSTFIX_PORT=22536
SINK_PORT=22537
TERN_PID=""
SINK_PID=""
PF="$WORK/postfix"

cleanup() {
    [ -n "$TERN_PID" ] && kill "$TERN_PID" 2>/dev/null && wait "$TERN_PID" 2>/dev/null || true
    [ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null && wait "$SINK_PID" 2>/dev/null || true
    [ -f "$PF/conf/main.cf" ] && script -qec "postfix -c $PF/conf stop" /dev/null >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

. bench/common.sh
TERN_BIN=$(tern_binary)

start_tern() {
    "$TERN_BIN" serve --config "$WORK/tern/tern.yaml" 2>>"$WORK/tern/log" &
    TERN_PID=$!
}

mkdir -p "$WORK/tern"
cat > "$WORK/tern/tern.yaml" <<YAML
hostname: bench.tern
spool: $WORK/tern/spool
listeners:
  - { name: bench, kind: smtp, address: "127.0.0.1:$TERN_PORT" }
access:
  mynetworks: ["127.0.0.0/8"]
limits: { max_message_size: 10MB, max_connections: 1000, max_connections_per_client: 1000 }
delivery: { paused: ${TERN_PAUSED:-false} }
routes:
  - name: sink
    domains: ["*"]
    transport: smarthost
    smarthost: { host: 127.0.0.1, port: $SINK_PORT, tls: none }
    lane: { max_connections: 20 }
log: { level: warning }
YAML

postfix_instance "$PF" $POSTFIX_PORT "relayhost = [127.0.0.1]:$SINK_PORT
smtp_tls_security_level = none
default_destination_concurrency_limit = 20"

proc_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

start_sink() {
    : > "$WORK/sink.out"
    smtp-sink -u postfix -c "127.0.0.1:$SINK_PORT" 256 > "$WORK/sink.out" 2>&1 &
    SINK_PID=$!
    wait_port $SINK_PORT
}
stop_sink() { kill "$SINK_PID"; wait "$SINK_PID" 2>/dev/null || true; SINK_PID=""; }
# The last counter line only: reading the whole output each time would bill the benchmark's
# own polling to the server under test.
sink_count() { tail -c 48 "$WORK/sink.out" | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -1 | cut -d= -f2; }

# Largest total RSS (KB) of Postfix's processes, sampled while a case runs.
postfix_rss_sampler() {
    local master peak=0 now
    master=$(head -1 "$PF/queue/pid/master.pid" | tr -d ' ')
    while [ -f "$WORK/sampling" ]; do
        now=$( (echo "$master"; pgrep -P "$master") | xargs -r ps -o rss= -p 2>/dev/null | awk '{s+=$1} END {print s+0}')
        [ "$now" -gt "$peak" ] && peak=$now && echo "$peak" > "$WORK/pf_rss"
        sleep 0.2
    done
}

# Context switches so far: the machine's, and those of Tern's threads.
machine_switches() { awk '/^ctxt /{print $2}' /proc/stat; }
tern_switches() { cat /proc/"$TERN_PID"/task/*/status 2>/dev/null | awk '/ctxt_switches/{s+=$2} END {print s+0}'; }

# run PORT SESSIONS SIZE [-d] -> "msgs_per_s server_cpu_ms_per_msg machine_switches_per_msg"
run() {
    local port=$1 sessions=$2 size=$3 keep=${4:-}
    start_sink
    local b0 t0 t1 b1 client s0 s1 c0 c1
    b0=$(busy_ticks); s0=$(proc_ticks "$SINK_PID"); c0=$(machine_switches); t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    client=$( { /usr/bin/time -f "%U %S" smtp-source $keep -s "$sessions" -m "$MESSAGES" -l "$size" \
        -f bench@client.test -t user@example.org "127.0.0.1:$port" >/dev/null; } 2>&1 | tail -1)
    local deadline=$((SECONDS + 600))
    while [ "$(sink_count || echo 0)" != "$MESSAGES" ]; do
        [ $SECONDS -gt $deadline ] && { echo "sink got $(sink_count) of $MESSAGES" >&2; exit 1; }
        sleep 0.02
    done
    t1=$(date +%s.%N); b1=$(busy_ticks); s1=$(proc_ticks "$SINK_PID"); c1=$(machine_switches)
    stop_sink
    awk -v n="$MESSAGES" -v t0="$t0" -v t1="$t1" -v b0="$b0" -v b1="$b1" -v s0="$s0" -v s1="$s1" -v hz="$HZ" -v c="$client" \
        -v c0="$c0" -v c1="$c1" 'BEGIN {
        split(c, u, " "); server = (b1 - b0 - (s1 - s0)) / hz - (u[1] + u[2]);
        printf "%.0f %.2f %.1f", n / (t1 - t0), server * 1000 / n, (c1 - c0) / n }'
}

if [ "$MESSAGES" -gt 0 ]; then
    start_tern
    pf check
    pf start
    wait_port $TERN_PORT
    wait_port $POSTFIX_PORT
    touch "$WORK/sampling"; echo 0 > "$WORK/pf_rss"
    postfix_rss_sampler &
    SAMPLER=$!
    echo "messages per case: $MESSAGES (smtp-source; counted at smtp-sink). CPU: server ms per message."
    echo "switches: context switches per message, Tern's threads / machine-wide (load generator included)"
    printf "%-22s %10s %12s %7s %9s %11s %15s %9s\n" case "tern msg/s" "postfix msg/s" ratio "tern CPU" "postfix CPU" "tern switches" "postfix sw"
    for spec in "1 1024" "20 1024" "1 102400" "20 102400" "20 1024 -d"; do
        read -r sessions size keep <<<"$spec"
        x0=$(tern_switches)
        read -r t_rate t_cpu t_sw <<<"$(run $TERN_PORT "$sessions" "$size" "$keep")"
        x1=$(tern_switches)
        read -r p_rate p_cpu p_sw <<<"$(run $POSTFIX_PORT "$sessions" "$size" "$keep")"
        label="${sessions} sess, $((size / 1024)) KB${keep:+, kept conn}"
        printf "%-22s %10s %12s %7s %9s %11s %15s %9s\n" "$label" "$t_rate" "$p_rate" \
            "$(awk -v a="$t_rate" -v b="$p_rate" 'BEGIN{printf "%.2fx", a/b}')" "$t_cpu" "$p_cpu" \
            "$(awk -v a="$x0" -v b="$x1" -v n="$MESSAGES" 'BEGIN{printf "%.1f", (b - a) / n}') / $t_sw" "$p_sw"
    done
    rm -f "$WORK/sampling"; wait "$SAMPLER" 2>/dev/null || true
    echo "peak RSS: tern $(awk '/VmHWM/{print $2, $3}' /proc/$TERN_PID/status); postfix (all processes) $(cat "$WORK/pf_rss") kB"
    echo "left in queue: tern $(tern_queued "$WORK/tern/spool/queue"); postfix $(find "$PF/queue/deferred" "$PF/queue/active" "$PF/queue/incoming" -type f | wc -l)"
    kill "$TERN_PID"; wait "$TERN_PID" 2>/dev/null || true; TERN_PID=""
    # Latency, in a pass of its own: Tern logs each message (level info) only here, so the
    # throughput above is not paying for it.
    sed -i "s/level: warning/level: info/" "$WORK/tern/tern.yaml"
    : > "$WORK/tern/log"; : > "$PF/maillog"
    start_tern
    wait_port $TERN_PORT
    run $TERN_PORT 20 1024 >/dev/null
    run $POSTFIX_PORT 20 1024 >/dev/null
    echo "accept to delivered, 20 sess, 1 KB: tern $(python3 bench/latency.py tern "$WORK/tern/log")"
    echo "                                 postfix $(python3 bench/latency.py postfix "$PF/maillog") (its delay=)"
    kill "$TERN_PID"; wait "$TERN_PID" 2>/dev/null || true; TERN_PID=""
    sed -i "s/level: info/level: warning/" "$WORK/tern/tern.yaml"
fi

if [ "$QUEUE" -gt 0 ]; then
    # Tern's memory with a large queue: accept QUEUE messages with delivery paused, then
    # restart so the scheduler loads them all from the spool.
    sed -i "s/paused: .*}/paused: true }/" "$WORK/tern/tern.yaml"
    start_tern
    wait_port $TERN_PORT
    smtp-source -s 20 -m "$QUEUE" -l 1024 -f bench@client.test -t user@example.org "127.0.0.1:$TERN_PORT" >/dev/null
    echo "tern with $QUEUE messages accepted: RSS $(awk '/VmRSS/{print $2, $3}' /proc/$TERN_PID/status), peak $(awk '/VmHWM/{print $2, $3}' /proc/$TERN_PID/status)"
    kill "$TERN_PID"; wait "$TERN_PID" 2>/dev/null || true
    start_tern
    wait_port $TERN_PORT
    echo "tern restarted over $(tern_queued "$WORK/tern/spool/queue") queued messages: RSS $(awk '/VmRSS/{print $2, $3}' /proc/$TERN_PID/status)"
fi
