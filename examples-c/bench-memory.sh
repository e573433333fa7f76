#!/usr/bin/env bash
# The memory benchmark of permessage-deflate: COUNT connections (default 2000) to a compressing
# echo server (Node's ws, tests/peers/node_server.js deflate), one JSON-like text message of
# BYTES bytes echoed on each (default 1024; several sizes: BYTES="256 1024 4096"), with
# compression offered (deflate) and not (plain); prints the peak RSS of each run side by side.
#   examples-c/bench-memory.sh [MANY_BINARY]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
many=${1:-$root/examples-c/build/many}
count=${COUNT:-2000}
ulimit -n $((count * 2 + 256)) 2>/dev/null || true
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# The server serves until its standard input ends: a FIFO this script holds open until it exits.
mkfifo "$dir/stdin"
node "$root/tests/peers/node_server.js" deflate <"$dir/stdin" >"$dir/log" &
exec 3>"$dir/stdin"
log=$dir/log
for _ in $(seq 100); do grep -q '^port=' "$log" && break; sleep 0.1; done
port=$(sed -n 's/^port=//p' "$log")
printf '%-8s %-10s %-16s %-16s %s\n' conns bytes "plain peak KiB" "deflate peak KiB" ratio
for bytes in ${BYTES:-1024}; do
  plain=$("$many" "ws://127.0.0.1:$port/echo" "$count" "$bytes" plain | sed -n 's/.*peak RSS \([0-9]*\) KiB/\1/p')
  deflate=$("$many" "ws://127.0.0.1:$port/echo" "$count" "$bytes" deflate | sed -n 's/.*peak RSS \([0-9]*\) KiB/\1/p')
  printf '%-8s %-10s %-16s %-16s %.2f\n' "$count" "$bytes" "$plain" "$deflate" "$(echo "$deflate / $plain" | bc -l)"
done
