#!/usr/bin/env bash
# make demo: starts the bundled local test server (ws and wss, with a CA made at start-up),
# runs examples-c/demo.js through wsjs over wss, trusting that CA through SSL_CERT_FILE, and
# stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
coproc SERVER { exec target/release/examples/testserver; }
# Copies: bash unsets SERVER and SERVER_PID as soon as it reaps the server, which can happen
# before the `wait` below (set -u would then stop the script).
server_pid=$SERVER_PID
server_in=${SERVER[1]}
read -r ports <&"${SERVER[0]}"
eval "$ports"   # ws_port=.. wss_port=.. blackhole_port=.. ca=..
server="wss://localhost:$wss_port"
echo "[demo] local app service at $server (throwaway CA $ca)"
script=$(mktemp --suffix=.js)
sed "s|%SERVER%|$server|" examples-c/demo.js >"$script"
status=0
SSL_CERT_FILE="$ca" examples-c/build/wsjs "$script" || status=$?
rm -f "$script"
exec {server_in}>&-   # closing its stdin stops the server
wait "$server_pid" || true
echo "[demo] wsjs exited with $status"
exit $status
