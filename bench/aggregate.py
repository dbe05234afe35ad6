#!/usr/bin/env python3
"""Reads the JSON lines written by compare.sh and prints a markdown table of
medians per target, with ratios against nginx.

usage: aggregate.py results.jsonl [machine.txt]

A run with errors is left out of the medians (and counted in the errors row),
so a broken target cannot pass for a fast one. A run during which other work
on the machine used more than OTHER_MAX cores (`other_cpu_util`, default 0.15)
is left out too when a clean run of the same target and workload exists.
"""

import json
import os
import statistics
import sys
from collections import defaultdict

TARGET_ORDER = ["wsgate", "wsgate-b", "nginx", "haproxy", "bytecopy", "direct"]

# (label, workload, field, unit/format, lower_is_better)
ROWS = [
    ("msgs/s, 1 KiB", "tp1k", "msgs_per_s", "{:,.0f}", False),
    ("RTT p50 µs, 1 KiB", "tp1k", "rtt_p50_us", "{:,.0f}", True),
    ("RTT p99 µs, 1 KiB", "tp1k", "rtt_p99_us", "{:,.0f}", True),
    ("proxy CPU µs/msg, 1 KiB", "tp1k", "proxy_cpu_us_per_msg", "{:.3f}", True),
    ("load generator CPU (cores), 1 KiB", "tp1k", "gen_cpu_util", "{:.2f}", True),
    ("echo backend CPU (cores), 1 KiB", "tp1k", "backend_cpu_util", "{:.2f}", True),
    ("msgs/s, 64 B", "tp64", "msgs_per_s", "{:,.0f}", False),
    ("RTT p50 µs, 64 B", "tp64", "rtt_p50_us", "{:,.0f}", True),
    ("RTT p99 µs, 64 B", "tp64", "rtt_p99_us", "{:,.0f}", True),
    ("proxy CPU µs/msg, 64 B", "tp64", "proxy_cpu_us_per_msg", "{:.3f}", True),
    ("load generator CPU (cores), 64 B", "tp64", "gen_cpu_util", "{:.2f}", True),
    ("echo backend CPU (cores), 64 B", "tp64", "backend_cpu_util", "{:.2f}", True),
    ("bytes per idle session", "idle", "bytes_per_session", "{:,.0f}", True),
    ("proxy CPU µs per idle session opened", "idle", "proxy_cpu_us_per_session", "{:,.0f}", True),
    ("new sessions/s", "handshake", "sessions_per_s", "{:,.0f}", False),
    ("RTT p99 µs, new session", "handshake", "rtt_p99_us", "{:,.0f}", True),
    ("proxy CPU µs per new session", "handshake", "proxy_cpu_us_per_session", "{:,.0f}", True),
]


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    runs = []
    with open(sys.argv[1], encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError as e:
                print(f"warning: line {n}: {e}", file=sys.stderr)

    good = defaultdict(list)  # (target, workload) -> runs without errors
    errors = defaultdict(int)  # (target, workload) -> runs with errors
    first_error = {}
    targets = set()
    for r in runs:
        t, w = r.get("label", "?"), r.get("workload", "?")
        targets.add(t)
        if r.get("errors", 1):
            errors[(t, w)] += 1
            first_error.setdefault((t, w), r.get("first_error", "?"))
        else:
            good[(t, w)].append(r)
    cols = [t for t in TARGET_ORDER if t in targets] + sorted(targets - set(TARGET_ORDER))

    other_max = float(os.environ.get("OTHER_MAX", "0.15"))
    excluded = defaultdict(int)  # disturbed runs left out (a clean one exists)
    kept = defaultdict(int)  # disturbed runs used (no clean one)
    for key, rs in list(good.items()):
        clean = [r for r in rs if r.get("other_cpu_util", 0) <= other_max]
        if clean:
            excluded[key[0]] += len(rs) - len(clean)
            good[key] = clean
        else:
            kept[key[0]] += len(rs)

    def median(t, w, field):
        vals = [r[field] for r in good.get((t, w), []) if isinstance(r.get(field), (int, float))]
        return statistics.median(vals) if vals else None

    ratio_cols = [t for t in ("wsgate", "wsgate-b", "haproxy", "bytecopy") if t in cols] if "nginx" in cols else []
    header = ["metric (median)"] + cols + [f"{t} ÷ nginx" for t in ratio_cols]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for label, w, field, fmt, _lower in ROWS:
        vals = {t: median(t, w, field) for t in cols}
        if all(v is None for v in vals.values()):
            continue
        cells = [label]
        for t in cols:
            v = vals[t]
            n = len(good.get((t, w), []))
            cell = "–" if v is None else fmt.format(v)
            if v is not None and errors.get((t, w)):
                cell += f" ({n} ok)"
            cells.append(cell)
        base = vals.get("nginx")
        for t in ratio_cols:
            v = vals.get(t)
            cells.append("–" if v is None or not base else f"{v / base:.2f}")
        print("| " + " | ".join(cells) + " |")
    runs_per = defaultdict(int)
    for r in runs:
        runs_per[r.get("label", "?")] += 1
    err_cells = ["runs with errors / runs"]
    for t in cols:
        e = sum(v for (tt, _), v in errors.items() if tt == t)
        err_cells.append(f"{e} / {runs_per[t]}")
    err_cells += [""] * len(ratio_cols)
    print("| " + " | ".join(err_cells) + " |")
    if any(excluded.values()) or any(kept.values()):
        dist_cells = [f"disturbed runs (other work > {other_max} core): left out / used"]
        dist_cells += [f"{excluded[t]} / {kept[t]}" for t in cols] + [""] * len(ratio_cols)
        print("| " + " | ".join(dist_cells) + " |")

    if first_error:
        print()
        print("First error per target and workload:")
        print()
        for (t, w), e in sorted(first_error.items()):
            print(f"- {t} {w}: {e}")
    if len(sys.argv) > 2:
        print()
        print("Machine and knobs:")
        print()
        print("```")
        with open(sys.argv[2], encoding="utf-8") as f:
            print(f.read().rstrip())
        print("```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
