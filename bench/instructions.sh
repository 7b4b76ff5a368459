#!/bin/bash
# Instructions the tunneld server executes per visitor connection, counted by
# valgrind's callgrind: exact and repeatable on a noisy shared machine, where
# connection rates and CPU times spread by ±10-20 % from round to round.
#
#   bench/instructions.sh [--connections N] [--config-extra TOML] [BINARY]
#
# Starts BINARY (default target/release/tunneld) under callgrind with one direct
# mapping to loadgen's echo, warms it with 200 connections, zeroes the counters,
# runs N sequential connect -> 1-byte echo -> close (default 1,000), waits for
# the connection log's writer (it gathers for 200 ms), dumps, and prints the
# instructions per connection over all the server's threads, then the ten
# functions costing most (inclusive). Needs valgrind and a release loadgen
# (`cargo build --release --example loadgen`). Instructions are user space only:
# the kernel's share of a connection (accept, connect, epoll) is not in them.
#
# Issue 21's figures: `bench/instructions.sh` against
# `bench/instructions.sh --config-extra $'[history]\nconnection_log = false'`
# and against a build from before connections were tracked.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
connections=1000
extra=""
binary="${CARGO_TARGET_DIR:-$here/target}/release/tunneld"
while [ $# -gt 0 ]; do
    case "$1" in
        --connections) connections=$2; shift 2 ;;
        --config-extra) extra=$2; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) binary=$1; shift ;;
    esac
done
loadgen="${CARGO_TARGET_DIR:-$here/target}/release/examples/loadgen"
for tool in valgrind callgrind_control callgrind_annotate curl "$loadgen" "$binary"; do
    command -v "$tool" >/dev/null || [ -x "$tool" ] || { echo "missing: $tool" >&2; exit 2; }
done
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
echo_port=$(free_port) api_port=$(free_port) tunnel_port=$(free_port) mapped=$(free_port)

"$loadgen" echo --listen "127.0.0.1:$echo_port" >/dev/null 2>&1 & pids+=($!)
printf '[server]\nbind_addr = "127.0.0.1"\n%s\n' "$extra" >"$dir/tunneld.toml"
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" "$binary" server \
    --config "$dir/tunneld.toml" --api-listen "127.0.0.1:$api_port" --tunnel-listen "127.0.0.1:$tunnel_port" \
    --state-dir "$dir/state" --secret "instructions-$RANDOM$RANDOM" >"$dir/server.log" 2>&1 & server=$!
pids+=($server)
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$api_port/health" >/dev/null && break; sleep 0.2; done
curl -sf -H 'Content-Type: application/json' "http://127.0.0.1:$api_port/api/mapping/create" \
    -d "{\"source_port\": $mapped, \"target_host\": \"127.0.0.1\", \"target_port\": $echo_port}" >/dev/null
"$loadgen" connrate --target "127.0.0.1:$mapped" --count 200 >/dev/null
sleep 1
callgrind_control --zero "$server" >/dev/null 2>&1
"$loadgen" connrate --target "127.0.0.1:$mapped" --count "$connections" >/dev/null
sleep 1.5
callgrind_control --dump "$server" >/dev/null 2>&1
sleep 1
dump=$(ls "$dir"/callgrind.out.* | head -1)
total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
echo "$(basename "$binary")${extra:+ ($extra)}: $total instructions over $connections connections = $((total / connections)) per connection"
callgrind_annotate --inclusive=yes --auto=no --threshold=99 "$dump" 2>/dev/null \
    | grep -E '^ *[0-9,]+ \(' | grep -v 'PROGRAM TOTALS' | sed -n '1,200p' \
    | grep -E 'tunneld::|sqlite3_step|rusqlite' | head -10
