#!/usr/bin/env bash
# Accept throughput with the default filter chain: smtp-source against Tern without filters,
# Tern with header_rewrite + dkim_sign (rsa-sha256, 2048 bits), and Postfix with OpenDKIM
# as its milter (same key), in the same run. Everything only accepts and queues (Tern's
# delivery paused, Postfix's defer_transports = smtp).
#
#   bench/filters.sh [MESSAGES]      # default 3000 per case; needs opendkim (scripts/setup --test)
#
# Must run as root. Binds only 127.0.0.1. Everything it starts it stops by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES="${1:-3000}"
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/tern-filters.XXXXXX")
chmod 755 "$WORK"
PLAIN_PORT=22555; FILTERED_PORT=22556; POSTFIX_PORT=22557; MILTER_PORT=22558
PF="$WORK/postfix"
cleanup() {
    stop_started
    [ -f "$PF/conf/main.cf" ] && script -qec "postfix -c $PF/conf stop" /dev/null >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
. bench/common.sh
trap cleanup EXIT
TERN_BIN=$(tern_binary)
"$TERN_BIN" dkim keygen --domain client.test --selector bench --out "$WORK/dkim.key" >/dev/null

for name in plain filtered; do
    port=$PLAIN_PORT; [ $name = filtered ] && port=$FILTERED_PORT
    mkdir -p "$WORK/$name"
    cat > "$WORK/$name/tern.yaml" <<YAML
hostname: bench.tern
spool: $WORK/$name/spool
listeners:
  - { name: bench, kind: smtp, address: "127.0.0.1:$port" }
access: { mynetworks: ["127.0.0.0/8"] }
limits: { max_connections: 1000, max_connections_per_client: 1000 }
delivery: { paused: true }
log: { level: warning }
YAML
    if [ $name = filtered ]; then
        cat >> "$WORK/$name/tern.yaml" <<YAML
filters:
  - { name: cleanup, type: header_rewrite }
  - name: dkim
    type: dkim_sign
    settings: { keys: [ { domain: client.test, selector: bench, key_file: $WORK/dkim.key } ] }
YAML
    fi
    "$TERN_BIN" serve --config "$WORK/$name/tern.yaml" 2>"$WORK/$name/log" &
    PIDS+=($!)
done

# OpenDKIM with the same key, signing everything from 127.0.0.0/8, for Postfix.
cat > "$WORK/opendkim.conf" <<CF
Syslog no
Background no
Mode s
Socket inet:$MILTER_PORT@127.0.0.1
Domain client.test
Selector bench
KeyFile $WORK/dkim.key
Canonicalization relaxed/relaxed
InternalHosts 127.0.0.0/8
RequireSafeKeys false
PidFile $WORK/opendkim.pid
CF
opendkim -f -x "$WORK/opendkim.conf" 2>"$WORK/opendkim.log" &
PIDS+=($!)

postfix_instance "$PF" $POSTFIX_PORT "defer_transports = smtp
smtpd_milters = inet:127.0.0.1:$MILTER_PORT
milter_default_action = tempfail"
pf check
pf start

for p in $PLAIN_PORT $FILTERED_PORT $POSTFIX_PORT $MILTER_PORT; do wait_port $p; done

rate() {
    local t0 t1
    t0=$(date +%s.%N)
    smtp-source -s "$2" -m "$MESSAGES" -l 1024 -f bench@client.test -t user@example.org "127.0.0.1:$1" >/dev/null
    t1=$(date +%s.%N)
    awk -v n="$MESSAGES" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }'
}

echo "messages per case: $MESSAGES, 1 KB (smtp-source; a new connection per message)"
printf "%-10s %14s %16s %16s %14s %16s\n" sessions "tern msg/s" "tern+chain msg/s" "postfix+opendkim" "chain/plain" "chain/postfix"
for sessions in 1 20; do
    plain=$(rate $PLAIN_PORT $sessions)
    filtered=$(rate $FILTERED_PORT $sessions)
    postfix=$(rate $POSTFIX_PORT $sessions)
    printf "%-10s %14s %16s %16s %14s %16s\n" "$sessions" "$plain" "$filtered" "$postfix" \
        "$(awk -v a="$filtered" -v b="$plain" 'BEGIN{printf "%.2fx", a/b}')" "$(awk -v a="$filtered" -v b="$postfix" 'BEGIN{printf "%.2fx", a/b}')"
done
signed=$(find "$WORK/filtered/spool/queue" -type f -size +0c -print -quit)
grep -q "DKIM-Signature" "$signed" && echo "tern's queued mail is signed" || echo "tern's queued mail is NOT signed"
grep -rlq "DKIM-Signature" "$PF/queue/deferred" && echo "postfix's queued mail is signed" || echo "postfix's queued mail is NOT signed"
