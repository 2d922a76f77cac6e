#!/usr/bin/env bash
# Figures for the ordering table of docs/BENCHMARKS.md: first response of
# the test guest's app on three emulated links, for the baseline and four
# ways of fetching, each next to the physical limit, and the replay
# simulator's prediction next to the measured launch.
#
# usage: tools/bench-order.sh BIN WORKDIR
set -euo pipefail
bin=$(realpath "${1:?usage: bench-order.sh BIN WORKDIR}")
work=${2:?usage: bench-order.sh BIN WORKDIR}
mkdir -p "$work"
work=$(realpath "$work")
cd "$(dirname "$0")/.."
step() { printf '== %s\n' "$*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }

guest="$(dirname "$work")/guest"
tools/guest/build.sh "$guest"
state="$work/state"
rm -rf "$state" "$work/srv" && mkdir -p "$work/srv"
cli() { "$bin" --state-dir "$state" "$@"; }

step "base create and overlay capture"
cli base create --name guest --disk "$guest/disk.img" --memory-size 256MiB --kernel "$guest/vmlinuz" \
  --initrd "$guest/initrd.img" --append "console=ttyS0 quiet" --ready '^guest-ready' >&2
cli overlay capture --base guest --script "$guest/app.script" --ready '^app-ready' \
  --trace-out "$work/capture.trace" -o "$work/captured.overlay" >&2
# The linear overlay: memory then disk by offset, no trace.
rm -rf "$work/x" && cli overlay extract "$work/captured.overlay" -o "$work/x" >&2
base=$(cli base list --json | awk -F'"' '/"path"/ { print $4; exit }' | xargs dirname)
cli overlay create --base guest --disk "$work/x/disk.img" --memory "$work/x/memory.img" --state "$work/x/state" \
  --vm-config "$work/x/vm.json" -o "$work/srv/linear.overlay" >&2
cli overlay reorder "$work/srv/linear.overlay" --trace "$work/capture.trace" -o "$work/srv/other-run.overlay" >&2

# launch URL ARGS...: first response in seconds, from a cold cache.
n=0
launch() {
  local url=$1 st
  shift
  n=$((n + 1))
  st="$work/cold-$n"
  rm -rf "$st"
  "$bin" --state-dir "$st" base import --name guest --disk "$base/disk.img" --memory "$base/memory.img" \
    --state "$base/state" --vm-config "$base/vm.json" >/dev/null
  "$bin" --state-dir "$st" launch --probe 'curl -sf -m 1 http://127.0.0.1:$CLOUDLETFS_PORT/cgi-bin/app' \
    --exit-after-probe "$@" "$url" >"$work/launch-$n.out"
  rm -rf "$st"
  awk '/first response/ { print $1; exit }' "$work/launch-$n.out"
}

probe='curl -sf -m 1 http://127.0.0.1:$CLOUDLETFS_PORT/cgi-bin/app'
rows=()
sims=()
for link in "38mbit 20ms" "100mbit 5ms" "1gbit 1ms"; do
  set -- $link
  rate=$1 rtt=$2
  step "link $rate, $rtt"
  "$bin" --state-dir "$state" serve --addr 127.0.0.1:0 --rate "$rate" --rtt "$rtt" "$work/srv" >"$work/serve.out" 2>/dev/null &
  pid=$!
  for _ in $(seq 100); do grep -q serving "$work/serve.out" && break; sleep 0.05; done
  url=$(awk '{ print $4 }' "$work/serve.out")

  t=$(now); curl -sf -o "$work/dl.overlay" "$url/linear.overlay"; dl=$(since "$t")
  rm -rf "$work/dlx"; t=$(now); cli overlay extract "$work/dl.overlay" -o "$work/dlx" >/dev/null; ex=$(since "$t")
  "$bin" --state-dir "$state" launch --probe "$probe" --exit-after-probe "$work/dlx" >"$work/local.out"
  local_fr=$(awk '/first response/ { print $1; exit }' "$work/local.out")
  baseline=$(awk -v a="$dl" -v b="$ex" -v c="$local_fr" 'BEGIN { printf "%.3f", a + b + c }')

  demand=$(launch "$url/linear.overlay" --policy demand-only)
  linear=$(launch "$url/linear.overlay" --trace-out "$work/linear-$rate.trace")
  cli overlay reorder "$work/srv/linear.overlay" --trace "$work/linear-$rate.trace" -o "$work/srv/same-$rate.overlay" >/dev/null
  same=$(launch "$url/same-$rate.overlay")
  other=$(launch "$url/other-run.overlay")
  kill "$pid"; wait "$pid" 2>/dev/null || true

  rtts=$(awk -v r="$rtt" 'BEGIN { sub(/ms/, "", r); print r / 1000 }')
  rep=$(cli replay --overlay "$work/srv/linear.overlay" --trace "$work/linear-$rate.trace" --rate "$rate" --rtt "$rtt")
  pred=$(printf '%s\n' "$rep" | awk '/first response/ { print $3 }')
  limit=$(printf '%s\n' "$rep" | awk '/physical limit/ { print $3 }')
  rows+=("$rate/$rtt $baseline $demand $linear $same $other $limit")
  sims+=("$rate/$rtt $linear $pred")
  step "baseline $baseline demand $demand linear $linear same $same other $other limit $limit predicted $pred"
done

{
  echo "### First response by fetch order ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, TCG)"
  echo
  echo "Seconds from the start of the command to the guest app's first answer; in brackets, the ratio to the physical limit."
  echo
  echo "| link | baseline | demand-only | linear stream + demand | access-ordered, same run's trace | access-ordered, other run's trace | physical limit |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for r in "${rows[@]}"; do
    set -- $r
    awk -v l="$1" -v a="$2" -v b="$3" -v c="$4" -v d="$5" -v e="$6" -v lim="$7" 'BEGIN {
      printf "| %s | %.2f (%.1f) | %.2f (%.1f) | %.2f (%.1f) | %.2f (%.1f) | %.2f (%.1f) | %.2f |\n",
        l, a, a/lim, b, b/lim, c, c/lim, d, d/lim, e, e/lim, lim }'
  done
  echo
  echo "### Replay simulator against the measured launch (linear stream + demand)"
  echo
  echo "| link | measured (s) | predicted (s) | error |"
  echo "|---|---:|---:|---:|"
  for r in "${sims[@]}"; do
    set -- $r
    awk -v l="$1" -v m="$2" -v p="$3" 'BEGIN { printf "| %s | %.2f | %.2f | %+.0f%% |\n", l, m, p, 100 * (p - m) / m }'
  done
} | tee "$work/results.md"
