#!/usr/bin/env bash
# make bench: runs the shared harness (HARNESS_DIR/run.sh) with examples-c/build/bench added as
# "wsclient", then writes BENCHMARKS.md (date, machine, the report). Harness variables such as
# RUNS=3 or ONLY=W1,W6 pass through.
set -euo pipefail
harness=$1 client=$2
cd "$(dirname "$0")/.."
[[ -x $harness/run.sh ]] || { echo "no benchmark harness at $harness (set SHARED=...)"; exit 1; }
report=$(mktemp)
# Two entries: the library's defaults, and the read buffer raised to 64 KiB (the option for
# hosts that receive large messages; the default is 4 KiB, which keeps idle connections small).
EXTRA_CLIENTS="wsclient|ws|$client;wsclient-rb64k|ws|env WSB_READ_BUFFER=65536 $client" "$harness/run.sh" | tee "$report"
{
  echo "# Benchmarks"
  echo
  echo "Latest \`make bench\` run: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores,"
  echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(uname -sr)."
  echo "Client CPU per message is the figure to compare (user+sys of the client process, pinned to"
  echo "one core, the server on the other); ratios are against tokio-tungstenite in the same run."
  echo "'wsclient' uses the library's defaults; 'wsclient-rb64k' sets a 64 KiB read buffer"
  echo "(ws_options_set_read_buffer_size), the trade-off for hosts that receive large messages."
  echo
  cat "$report"
} >BENCHMARKS.md
rm -f "$report"
echo "[bench] report kept in BENCHMARKS.md"
