#!/usr/bin/env bash
# What reaches each block device while a command runs: flushes, metadata writes, data
# writes and reads, how many and how long each waits from issue to completion; from
# the kernel's block tracepoints, in a private tracefs instance (other users of
# tracing are left alone). Shows where a commit's time goes down a stack of devices
# (a volume's loop device, the pool's, the host's disk). Needs root.
#
#   bench/blocktrace.sh [--devices loop3,loop0,vda] -- COMMAND [ARGS...]
#   bench/blocktrace.sh [--devices loop3,loop0,vda] --from TRACE   (a saved trace)
#
# Per device (every device without --devices): requests by kind with count, mean,
# p50 and p99 microseconds from issue to completion, and their total time in flight.
set -euo pipefail

devices=
if [ "${1:-}" = --devices ]; then devices=$2; shift 2; fi
from=
if [ "${1:-}" = --from ]; then from=$2; shift 2; fi
[ "${1:-}" = -- ] && shift
[ $# -gt 0 ] || [ -n "$from" ] || { echo "usage: $0 [--devices loop3,vda] -- COMMAND [ARGS...]" >&2; exit 2; }

# "major,minor" of each device asked for, and the names of all, for the report.
wanted=
for name in ${devices//,/ }; do wanted+=" $(tr : , <"/sys/class/block/$name/dev")"; done
names=$(for d in /sys/class/block/*; do printf '%s=%s ' "$(tr : , <"$d/dev")" "${d##*/}"; done)

# summarise TRACE: the table, from block_rq_issue and block_rq_complete lines.
summarise() {
  awk -v wanted="$wanted" -v names="$names" '
BEGIN {
  n = split(names, pairs, " ")
  for (i = 1; i <= n; i++) { split(pairs[i], kv, "="); name[kv[1]] = kv[2] }
  m = split(wanted, w, " ")
  for (i = 1; i <= m; i++) keep[w[i]] = 1
}
# kind of a request from its rwbs: a flush, a metadata write, a data write, a read
function kind(rwbs) {
  if (rwbs ~ /^F/ && rwbs !~ /W/) return "flush"
  if (rwbs ~ /W/ && rwbs ~ /M/) return "write (metadata)"
  if (rwbs ~ /W/) return "write"
  if (rwbs ~ /R/) return "read"
  if (rwbs ~ /D/) return "discard"
  return "other"
}
/block_rq_(issue|complete):/ {
  for (i = 1; i <= NF; i++) if ($i ~ /^block_rq_/) break
  ts = $(i - 1); sub(/:$/, "", ts)
  event = $i; dev = $(i + 1); rwbs = $(i + 2)
  if (m > 0 && !(dev in keep)) next
  k = kind(rwbs)
  if (event == "block_rq_issue:") {
    if (k == "flush") { fq[dev, ++ftail[dev]] = ts; next }
    # issue: dev rwbs bytes () sector + n
    key = dev " " $(i + 5) " " $(i + 7)
    start[key] = ts
    next
  }
  if (k == "flush") {
    if (fhead[dev] >= ftail[dev]) next
    began = fq[dev, ++fhead[dev]]
  } else {
    # complete: dev rwbs () sector + n
    key = dev " " $(i + 4) " " $(i + 6)
    if (!(key in start)) next
    began = start[key]; delete start[key]
  }
  us = (ts - began) * 1e6
  c = ++count[dev, k]; lat[dev, k, c] = us; total[dev, k] += us
  seen[dev] = 1; kinds[k] = 1
}
END {
  for (dev in seen) {
    label = (dev in name) ? name[dev] : dev
    for (k in kinds) {
      c = count[dev, k]
      if (!c) continue
      for (j = 1; j <= c; j++) v[j] = lat[dev, k, j]
      # insertion sort is fine for the few thousand requests of a short trace
      for (a = 2; a <= c; a++) { x = v[a]; b = a - 1; while (b > 0 && v[b] > x) { v[b + 1] = v[b]; b-- } v[b + 1] = x }
      printf "%-8s %-17s %7d  mean %8.0f  p50 %8.0f  p99 %8.0f us  in flight %9.1f ms\n",
        label, k, c, total[dev, k] / c, v[int((c - 1) * 0.5) + 1], v[int((c - 1) * 0.99) + 1], total[dev, k] / 1000
    }
  }
}' "$1" | sort
}

if [ -n "$from" ]; then
  summarise "$from"
  exit
fi

tracefs=/sys/kernel/tracing
[ -d "$tracefs/instances" ] || mount -t tracefs nodev "$tracefs"
instance=$tracefs/instances/kura-blocktrace-$$
mkdir "$instance"
out=$(mktemp)
finish() {
  echo 0 >"$instance/tracing_on" 2>/dev/null || true
  rmdir "$instance" 2>/dev/null || true
  rm -f "$out"
}
trap finish EXIT

echo 0 >"$instance/tracing_on"
echo 65536 >"$instance/buffer_size_kb"
for event in block_rq_issue block_rq_complete; do
  echo 1 >"$instance/events/block/$event/enable"
done
echo 1 >"$instance/tracing_on"
status=0
"$@" || status=$?
echo 0 >"$instance/tracing_on"
cat "$instance/trace" >"$out"
summarise "$out"
exit "$status"
