# Sourced by the benchmarks: helpers, and a Postfix instance of their own (never
# /etc/postfix).
#
#   PIDS+=($!)            after starting a peer: stop_started ends it, by its PID
#   wait_port PORT        until 127.0.0.1:PORT accepts connections (10 s at most)
#   busy_ticks            the machine's busy CPU time so far, in clock ticks (HZ per second)
#
#   postfix_instance DIR PORT "extra main.cf lines"
#
# writes DIR/conf (master.cf with the public smtp listener moved to 127.0.0.1:PORT, and a
# main.cf for a relay that trusts 127.0.0.0/8), DIR/queue and DIR/data, and defines
# `pf ARGS`, which runs `postfix -c DIR/conf ARGS` under a terminal (postfix reports errors
# only to syslog or a terminal).
postfix_instance() {
    local dir=$1 port=$2 extra=$3
    mkdir -p "$dir/conf" "$dir/queue" "$dir/data"
    chown postfix "$dir/data"
    cp /etc/postfix/master.cf "$dir/conf/master.cf"
    sed -i -E "s/^smtp( +)inet/127.0.0.1:$port\1inet/" "$dir/conf/master.cf"
    cat > "$dir/conf/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $dir/queue
data_directory = $dir/data
myhostname = bench.postfix
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
message_size_limit = 10485760
default_process_limit = 200
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
maillog_file = $dir/maillog
maillog_file_prefixes = $(dirname "$dir")
$extra
CF
    PF_CONF="$dir/conf"
}
pf() { script -qec "postfix -c $PF_CONF $*" /dev/null; }

PIDS=()
stop_started() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 did not open" >&2; exit 1; }
busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
HZ=$(getconf CLK_TCK)

# The tern binary to measure: $TERN_BIN when set (to compare two builds in one run of the
# same machine), else a release build of this tree.
tern_binary() {
    if [ -n "${TERN_BIN:-}" ]; then echo "$TERN_BIN"; return; fi
    swift build -c release --product tern >/dev/null
    echo "$PWD/.build/release/tern"
}

# Messages in a Tern spool's queue/: its slots that end in a trailer (a free slot is empty
# or zeros).
tern_queued() {
    python3 - "$1" <<'PY'
import os, sys
d = sys.argv[1]
count = 0
for name in os.listdir(d) if os.path.isdir(d) else []:
    with open(os.path.join(d, name), "rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - 81))
        count += f.read().startswith(b"TERN-SPOOL-")
print(count)
PY
}
