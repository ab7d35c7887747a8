#!/usr/bin/env bash
# Memory under large concurrent messages: peak RSS of Tern taking SESSIONS messages of SIZE
# bytes at once (smtp-source), on a listener without filters and on one with the header
# clean-up and DKIM signing filters, each case in a fresh process; and the latency of another
# client's NOOP while one message with a 9 MB folded Received: header is filtered. Postfix
# in the same run for the unfiltered case.
#
#   bench/memory.sh [SESSIONS] [SIZE]       # default 50 sessions, 9000000 bytes
#   TERN_BIN=/path/to/tern bench/memory.sh  # measure another build
#
# The bound it checks (issue: memory stays bounded): filtered peak <= 2 x unfiltered peak
# + SESSIONS x SIZE. Binds only 127.0.0.1; everything it starts it stops by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS="${1:-50}"
SIZE="${2:-9000000}"
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/tern-memory.XXXXXX")
chmod 755 "$WORK"
PORT=22545
TERN_PID=""
cleanup() {
    [ -n "$TERN_PID" ] && kill "$TERN_PID" 2>/dev/null && wait "$TERN_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
. bench/common.sh
TERN_BIN=$(tern_binary)
"$TERN_BIN" dkim keygen --domain client.test --selector bench --out "$WORK/dkim.key" >/dev/null

config() { # NAME FILTERED
    mkdir -p "$WORK/$1"
    cat > "$WORK/$1/tern.yaml" <<YAML
hostname: bench.tern
spool: $WORK/$1/spool
listeners:
  - { name: bench, kind: smtp, address: "127.0.0.1:$PORT" }
access:
  mynetworks: ["127.0.0.0/8"]
limits: { max_message_size: 10MB, max_connections: 1000, max_connections_per_client: 1000 }
delivery: { paused: true }
log: { level: warning }
YAML
    if [ "$2" = yes ]; then cat >> "$WORK/$1/tern.yaml" <<YAML
filters:
  - { name: cleanup, type: header_rewrite }
  - name: dkim
    type: dkim_sign
    settings: { keys: [ { domain: client.test, selector: bench, key_file: $WORK/dkim.key } ] }
YAML
    fi
}

# peak NAME FILTERED -> peak RSS in kB after SESSIONS concurrent messages
peak() {
    config "$1" "$2"
    "$TERN_BIN" serve --config "$WORK/$1/tern.yaml" 2>"$WORK/$1/log" &
    TERN_PID=$!
    wait_port $PORT
    smtp-source -s "$SESSIONS" -m "$SESSIONS" -l "$SIZE" -f bench@client.test -t user@example.org "127.0.0.1:$PORT" >/dev/null
    local hwm
    hwm=$(awk '/VmHWM/ {print $2}' /proc/$TERN_PID/status)
    kill "$TERN_PID"; wait "$TERN_PID" 2>/dev/null || true; TERN_PID=""
    echo "$hwm"
}

# noop_latency -> "max_ms median_ms filter_s" while a 9 MB folded header is filtered
noop_latency() {
    config filtered-noop yes
    "$TERN_BIN" serve --config "$WORK/filtered-noop/tern.yaml" 2>"$WORK/filtered-noop/log" &
    TERN_PID=$!
    wait_port $PORT
    python3 - "$PORT" <<'PY'
import socket, sys, threading, time
port = int(sys.argv[1])
def client():
    s = socket.create_connection(("127.0.0.1", port)); f = s.makefile("rb")
    f.readline()
    return s, f
def cmd(s, f, line):
    s.sendall(line + b"\r\n")
    while True:
        l = f.readline()
        if l[3:4] != b"-": return l
stop = threading.Event(); lat = []
def noop():
    s, f = client()
    while not stop.is_set():
        t = time.monotonic(); cmd(s, f, b"NOOP"); lat.append(time.monotonic() - t); time.sleep(0.01)
th = threading.Thread(target=noop); th.start()
s, f = client()
for line in (b"EHLO bench", b"MAIL FROM:<bench@client.test>", b"RCPT TO:<user@example.org>", b"DATA"):
    cmd(s, f, line)
t = time.monotonic()
s.sendall(b"Received: from a (b [192.0.2.1])\r\n" + b"\tby relay.example with ESMTP id 0123456789abcdef;\r\n" * 170000
          + b"From: <bench@client.test>\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
f.readline(); took = time.monotonic() - t
time.sleep(0.2); stop.set(); th.join()
lat.sort()
print(f"{lat[-1]*1000:.0f} {lat[len(lat)//2]*1000:.1f} {took:.2f}")
PY
    kill "$TERN_PID"; wait "$TERN_PID" 2>/dev/null || true; TERN_PID=""
}

unfiltered=$(peak unfiltered no)
filtered=$(peak filtered yes)
bound=$(( 2 * unfiltered + SESSIONS * SIZE / 1024 ))
echo "$SESSIONS concurrent messages of $SIZE bytes (smtp-source), peak RSS (VmHWM):"
printf "  unfiltered listener: %8d kB\n" "$unfiltered"
printf "  filtered listener:   %8d kB   (bound 2 x unfiltered + %d x %d B = %d kB: %s)\n" "$filtered" "$SESSIONS" "$SIZE" "$bound" \
    "$([ "$filtered" -le "$bound" ] && echo within || echo EXCEEDED)"
read -r max median took <<<"$(noop_latency)"
echo "another client's NOOP while a 9 MB folded Received: header is filtered: max ${max} ms, median ${median} ms (filtering took ${took} s)"
