#!/usr/bin/env bash
# make demo: starts the bundled local test server (ws and wss, with a CA made at start-up),
# runs examples-c/demo.js through wsjs over wss, trusting that CA through SSL_CERT_FILE, and
# stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
coproc SERVER { exec target/release/examples/testserver; }
read -r ports <&"${SERVER[0]}"
eval "$ports"   # ws_port=.. wss_port=.. blackhole_port=.. ca=..
server="wss://localhost:$wss_port"
echo "[demo] local app service at $server (throwaway CA $ca)"
script=$(mktemp --suffix=.js)
sed "s|%SERVER%|$server|" examples-c/demo.js >"$script"
status=0
SSL_CERT_FILE="$ca" examples-c/build/wsjs "$script" || status=$?
rm -f "$script"
exec {SERVER[1]}>&-   # closing its stdin stops the server
wait "$SERVER_PID" || true
echo "[demo] wsjs exited with $status"
exit $status
