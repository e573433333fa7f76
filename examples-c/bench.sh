#!/usr/bin/env bash
# make bench: runs the shared harness (HARNESS_DIR/run.sh) with examples-c/build/bench added as
# "wsclient", then writes BENCHMARKS.md (date, machine, the report). Harness variables such as
# RUNS=3 or ONLY=W1,W6 pass through.
set -euo pipefail
harness=$1 client=$2
cd "$(dirname "$0")/.."
[[ -x $harness/run.sh ]] || { echo "no benchmark harness at $harness (set SHARED=...)"; exit 1; }
if [[ ! -w $harness ]]; then
  # The harness builds and writes its results inside its own folder: use a copy we may write.
  mkdir -p target/bench-harness
  cp -r "$harness/." target/bench-harness/ && chmod -R u+w target/bench-harness
  harness=target/bench-harness
fi
report=$(mktemp)
# The library with its defaults (bench.c honours WSB_READ_BUFFER for trying other read sizes).
EXTRA_CLIENTS="wsclient|ws|$client" "$harness/run.sh" | tee "$report"
{
  echo "# Benchmarks"
  echo
  echo "Latest \`make bench\` run: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores,"
  echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(uname -sr)."
  echo "Client CPU per message is the figure to compare (user+sys of the client process, pinned to"
  echo "one core, the server on the other); ratios are against tokio-tungstenite in the same run."
  echo "'wsclient' is examples-c/bench.c on the library's defaults, compression off except in W7 (--deflate), as for the other clients."
  echo
  cat "$report"
  echo
  # The run just made is the newest in the harness's results.
  runs=$(ls -td "$harness"/target/results/*/ 2>/dev/null | head -1)
  if [[ -f ${runs}runs.jsonl ]]; then examples-c/host_cpu_table.py "${runs}runs.jsonl"; fi
} >BENCHMARKS.md
rm -f "$report"
echo "[bench] report kept in BENCHMARKS.md"
