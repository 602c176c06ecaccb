#!/usr/bin/env bash
# Smoke test of one hearth binary, as systemd would run it, without systemd or containers:
#   packaging/smoke-test.sh [--config FILE] BINARY
# With --config, the file must have no server_name (the packaged one): the start is first refused for it.
# An aarch64 binary on another host runs under qemu-aarch64-static (Debian: qemu-user-static, libc6-arm64-cross).
#
# With the given config (default: none, the embedded defaults) plus HEARTH_* overrides for a scratch database and a
# free port, it: checks the config (`config check`), creates a user with the CLI, starts the server with a
# NOTIFY_SOCKET and waits for READY=1, checks /_hearth/health and /metrics, logs in, creates a room, sends a message
# and reads it back over HTTP, takes `hearth backup` while the server runs, sends SIGTERM and expects STOPPING=1, exit
# status 0 and a checkpointed (empty) WAL, then restores the backup into a new database and finds the message there.
set -euo pipefail

config=""
if [ "${1:-}" = "--config" ]; then
    config=$2
    shift 2
fi
bin=${1:?usage: smoke-test.sh [--config FILE] BINARY}
bin=$(readlink -f "$bin")
for tool in curl jq python3; do
    command -v "$tool" >/dev/null || { echo "smoke-test: needs $tool" >&2; exit 1; }
done

# Run through qemu when the binary is for another machine.
machine=$(readelf -h "$bin" | sed -n 's/^ *Machine: *//p')
run=()
case "$machine:$(uname -m)" in
    *AArch64*:aarch64 | *X86-64*:x86_64) ;;
    *AArch64*:*)
        command -v qemu-aarch64-static >/dev/null || { echo "smoke-test: needs qemu-aarch64-static (apt-get install qemu-user-static)" >&2; exit 1; }
        sysroot=/usr/aarch64-linux-gnu
        [ -e "$sysroot/lib/ld-linux-aarch64.so.1" ] || { echo "smoke-test: needs an aarch64 glibc in $sysroot (apt-get install libc6-arm64-cross)" >&2; exit 1; }
        run=(qemu-aarch64-static -L "$sysroot")
        ;;
    *) echo "smoke-test: cannot run a '$machine' binary on $(uname -m)" >&2; exit 1 ;;
esac
echo "== smoke test of $bin ($machine${run:+, under ${run[0]}})"

work=$(mktemp -d)
server_pid=""
cleanup() {
    [ -n "$server_pid" ] && kill -KILL "$server_pid" 2>/dev/null || true
    [ -n "${notify_pid:-}" ] && kill "$notify_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
# Only our HEARTH_* variables: every HEARTH_* variable is a config key to hearth.
for v in $(env | sed -n 's/^\(HEARTH_[A-Za-z0-9_]*\)=.*/\1/p'); do unset "$v"; done
export HEARTH_SERVER_NAME=smoke.test
export HEARTH_DATABASE__PATH=$work/state/hearth.db
export HEARTH_LISTEN__CLIENT=127.0.0.1:$port
export HEARTH_FEDERATION__ENABLED=false
export HEARTH_METRICS__ENABLED=true
mkdir -p "$work/state"
cfg=()
[ -n "$config" ] && cfg=(-c "$config")
hearth() { "${run[@]}" "$bin" "${cfg[@]}" "$@"; }

if [ -n "$config" ]; then
    # The packaged config names no server: the service refuses to start, naming the key and the file.
    if env -u HEARTH_SERVER_NAME "${run[@]}" "$bin" -c "$config" serve > "$work/refused.log" 2>&1; then
        echo "smoke-test: the server started without server_name" >&2; exit 1
    fi
    grep -q "server_name" "$work/refused.log" && grep -q "$config" "$work/refused.log" \
        || { cat "$work/refused.log"; echo "smoke-test: the refusal does not name server_name and $config" >&2; exit 1; }
    [ ! -e "$work/state/hearth.db" ] || { echo "smoke-test: the refused start left a database" >&2; exit 1; }
    echo "without server_name the start is refused: $(head -1 "$work/refused.log")"
fi

hearth --version
hearth config check
# The management commands never create a database: before the first start they say where they looked.
if hearth user list > "$work/no-db.log" 2>&1; then echo "smoke-test: user list worked without a database" >&2; exit 1; fi
grep -q "no database at" "$work/no-db.log" || { cat "$work/no-db.log"; echo "smoke-test: unclear message without a database" >&2; exit 1; }

# A stand-in for systemd's notify socket: records every datagram, one per line.
notify_sock=$work/notify.sock
python3 - "$notify_sock" "$work/notify.log" <<'EOF' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "a", buffering=1) as log:
    while True:
        log.write(s.recv(4096).decode().replace("\n", " ") + "\n")
EOF
notify_pid=$!
for _ in $(seq 50); do [ -S "$notify_sock" ] && break; sleep 0.1; done

started=$(date +%s.%N)
NOTIFY_SOCKET=$notify_sock "${run[@]}" "$bin" "${cfg[@]}" serve > "$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 600); do
    grep -q READY=1 "$work/notify.log" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; echo "smoke-test: server exited" >&2; exit 1; }
    sleep 0.1
done
grep -q READY=1 "$work/notify.log" || { cat "$work/server.log"; echo "smoke-test: no READY=1 within 60 s" >&2; exit 1; }
echo "READY=1 after $(python3 -c "import time; print(round(time.time() - $started, 2))") s: $(grep READY=1 "$work/notify.log")"

# READY means serving: the very first request must succeed.
health=$(curl -fsS "$base/_hearth/health")
echo "health: $health"
[ "$(jq -r .database <<<"$health")" = ok ]

# The admin CLI works on the database of the running server.
hearth user create alice --password 'smoke-pw-1' --admin
# (Into a file first: with pipefail, `grep -q` leaving early would fail the pipeline by SIGPIPE.)
hearth user list > "$work/users.txt"
grep -q '@alice:smoke.test' "$work/users.txt" || { cat "$work/users.txt"; echo "smoke-test: user list lacks alice" >&2; exit 1; }

token=$(curl -fsS -X POST "$base/_matrix/client/v3/login" \
    -d '{"type":"m.login.password","identifier":{"type":"m.id.user","user":"alice"},"password":"smoke-pw-1"}' | jq -r .access_token)
auth=(-H "Authorization: Bearer $token")
room=$(curl -fsS "${auth[@]}" -X POST "$base/_matrix/client/v3/createRoom" -d '{"name":"smoke"}' | jq -r .room_id)
enc_room=$(jq -rn --arg r "$room" '$r|@uri')
event=$(curl -fsS "${auth[@]}" -X PUT "$base/_matrix/client/v3/rooms/$enc_room/send/m.room.message/t1" \
    -d '{"msgtype":"m.text","body":"hello from the smoke test"}' | jq -r .event_id)
echo "sent $event to $room"
body=$(curl -fsS "${auth[@]}" "$base/_matrix/client/v3/rooms/$enc_room/messages?dir=b&limit=5" \
    | jq -r '.chunk[] | select(.type=="m.room.message") | .content.body')
[ "$body" = "hello from the smoke test" ] || { echo "smoke-test: message not read back: $body" >&2; exit 1; }
echo "read back: $body"

metrics=$(curl -fsS "$base/metrics")
for m in hearth_http_requests_total hearth_http_request_duration_seconds_bucket hearth_federation_outbox_depth hearth_database_size_bytes; do
    grep -q "^$m" <<<"$metrics" || { echo "smoke-test: /metrics lacks $m" >&2; exit 1; }
done
echo "metrics: $(grep -c '^hearth_' <<<"$metrics") samples, database $(sed -n 's/^hearth_database_size_bytes //p' <<<"$metrics") bytes"

hearth backup "$work/backup.db"

kill -TERM "$server_pid"
stop_started=$(date +%s)
status=0
wait "$server_pid" || status=$?
server_pid=""
echo "stopped with status $status in $(( $(date +%s) - stop_started )) s; notify: $(tr '\n' '|' < "$work/notify.log")"
[ "$status" = 0 ] || { cat "$work/server.log"; echo "smoke-test: exit status $status after SIGTERM" >&2; exit 1; }
grep -q STOPPING=1 "$work/notify.log" || { echo "smoke-test: no STOPPING=1" >&2; exit 1; }
wal_size=$(stat -c %s "$work/state/hearth.db-wal" 2>/dev/null || echo 0)
[ "$wal_size" = 0 ] || { echo "smoke-test: WAL not checkpointed on shutdown ($wal_size bytes)" >&2; exit 1; }

# Restore the backup as a new database and find the message in it.
export HEARTH_DATABASE__PATH=$work/restored/hearth.db
mkdir -p "$work/restored"
hearth restore "$work/backup.db"
NOTIFY_SOCKET=$notify_sock "${run[@]}" "$bin" "${cfg[@]}" serve > "$work/server2.log" 2>&1 &
server_pid=$!
for _ in $(seq 600); do curl -fsS "$base/_hearth/health" >/dev/null 2>&1 && break; sleep 0.1; done
got=$(curl -fsS "${auth[@]}" "$base/_matrix/client/v3/rooms/$enc_room/event/$(jq -rn --arg e "$event" '$e|@uri')" | jq -r .content.body)
[ "$got" = "hello from the smoke test" ] || { echo "smoke-test: restored database lacks the message" >&2; exit 1; }
echo "restored backup has the message"
kill -TERM "$server_pid"
wait "$server_pid"
server_pid=""
echo "== smoke test passed ($machine)"
