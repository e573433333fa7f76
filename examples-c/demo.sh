#!/usr/bin/env bash
# Starts the bundled local test server (ws and wss, with a CA made at start-up), runs the C echo
# example against it over wss, trusting that CA, and stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
coproc SERVER { exec target/release/examples/testserver; }
read -r ports <&"${SERVER[0]}"
eval "$ports"   # ws_port=.. wss_port=.. blackhole_port=.. ca=..
echo "[demo] local server: ws://127.0.0.1:$ws_port  wss://localhost:$wss_port (CA $ca)"
status=0
examples-c/build/echo "wss://localhost:$wss_port/echo" "$ca" || status=$?
exec {SERVER[1]}>&-   # closing its stdin stops the server
wait "$SERVER_PID" || true
exit $status
