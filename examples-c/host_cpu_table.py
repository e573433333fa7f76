#!/usr/bin/env python3
"""Prints, for each client that reports host_thread_cpu_s (our bench client), the CPU its host
thread spent per message beside the whole process's: the cost a JS engine's thread pays.
Usage: host_cpu_table.py RUNS.jsonl"""
import json
import statistics
import sys

rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    res = r.get("result") or {}
    if r.get("rc") != 0 or "host_thread_cpu_s" not in res or not res.get("count"):
        continue
    key = (r["client"], r["workload"])
    per_msg = 1e6 / res["count"]
    rows.setdefault(key, []).append((res["host_thread_cpu_s"] * per_msg, (r["user_s"] + r["sys_s"]) * per_msg))

if rows:
    print("**host thread CPU per message (CLOCK_THREAD_CPUTIME_ID of the thread that dispatches), "
          "beside the whole process (start-up not subtracted), medians**")
    print()
    print("| client | workload | host thread µs/msg | process µs/msg | host share |")
    print("|---|---|---|---|---|")
    for (client, workload), runs in sorted(rows.items()):
        host = statistics.median(h for h, _ in runs)
        proc = statistics.median(p for _, p in runs)
        share = f"{host / proc:.0%}" if proc else "n/a"
        print(f"| {client} | {workload} | {host:.3g} | {proc:.3g} | {share} |")
