#!/usr/bin/env bash
# Tern alone, for A/B runs of two builds: smtp-source -> Tern -> smtp-sink, and Tern's own CPU
# time (user and system, from /proc/PID/stat), context switches (every thread's) and minor
# page faults per message, and the messages per second until the queue is empty. No Postfix:
# quicker than relay.sh, and for comparing Tern with Tern only (run the builds interleaved).
#
#   bench/cpu.sh [MESSAGES] [SESSIONS] [SIZE]     # default 30000 messages, 20 sessions, 1024 bytes
#   TERN_BIN=/path/to/tern bench/cpu.sh           # measure another build
#   SOURCE_FLAGS=-d bench/cpu.sh                  # kept connections (smtp-source -d)
#
# Binds only 127.0.0.1 (ports 22550 and 22551). Everything it starts it stops by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES="${1:-30000}"
SESSIONS="${2:-20}"
SIZE="${3:-1024}"
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/tern-cpu.XXXXXX")
chmod 755 "$WORK"
cleanup() {
    stop_started
    rm -rf "$WORK"
}
. bench/common.sh
trap cleanup EXIT
TERN_BIN=$(tern_binary)
cat > "$WORK/tern.yaml" <<YAML
hostname: bench.tern
spool: $WORK/spool
listeners:
  - { name: bench, kind: smtp, address: "127.0.0.1:22550" }
access:
  mynetworks: ["127.0.0.0/8"]
limits: { max_message_size: 10MB, max_connections: 1000, max_connections_per_client: 1000 }
routes:
  - name: sink
    domains: ["*"]
    transport: smarthost
    smarthost: { host: 127.0.0.1, port: 22551, tls: none }
    lane: { max_connections: 20 }
log: { level: warning }
YAML
smtp-sink -u postfix -c 127.0.0.1:22551 256 > /dev/null 2>&1 &
PIDS+=($!)
"$TERN_BIN" serve --config "$WORK/tern.yaml" 2> "$WORK/tern.log" &
TERN=$!
PIDS+=("$TERN")
wait_port 22550
# user, system (ticks), minor faults; switches summed over every thread.
usage() { awk '{print $14, $15, $10}' "/proc/$TERN/stat"; }
switches() { cat /proc/"$TERN"/task/*/status 2>/dev/null | awk '/^(non)?voluntary_ctxt_switches/ {s += $2} END {print s}'; }
read -r u0 s0 f0 < <(usage)
c0=$(switches)
t0=$(date +%s.%N)
# shellcheck disable=SC2086
smtp-source ${SOURCE_FLAGS:-} -s "$SESSIONS" -m "$MESSAGES" -l "$SIZE" -f a@client.test -t u@example.org 127.0.0.1:22550
until [ -z "$(find "$WORK/spool/queue" -type f -size +0c -print -quit)" ]; do sleep 0.02; done
t1=$(date +%s.%N)
read -r u1 s1 f1 < <(usage)
c1=$(switches)
awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$(getconf CLK_TCK)" -v n="$MESSAGES" -v a="$t0" -v b="$t1" \
    -v c=$((c1 - c0)) -v f=$((f1 - f0)) -v label="$SESSIONS sess, $SIZE bytes${SOURCE_FLAGS:+ ($SOURCE_FLAGS)}" 'BEGIN {
    printf "%s: %.0f msg/s; Tern CPU %.3f ms/msg (user %.3f, system %.3f); %.1f switches/msg; %.1f minor faults/msg\n",
        label, n / (b - a), (u + s) * 1000 / hz / n, u * 1000 / hz / n, s * 1000 / hz / n, c / n, f / n
}'
