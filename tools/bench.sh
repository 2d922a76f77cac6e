#!/usr/bin/env bash
# Figures for docs/BENCHMARKS.md, on the built-in synthetic VM pair (256 MiB
# memory, 512 MiB disk): overlay create and extract times, the segment codec
# micro-benchmarks, and overlay sizes next to two baselines (xz of the changed
# chunks, and a qcow2 of the disk backed by the base disk).
#
# Progress goes to stderr; the markdown report goes to stdout and to
# WORKDIR/results.md. MB is 10^6 bytes.
#
# usage: tools/bench.sh BIN WORKDIR
#        tools/bench.sh demand    (only the demand-read latency rows)
set -euo pipefail

# demand_latency: runs BenchmarkDemandLatency (three runs per condition) and
# prints its rows for docs/BENCHMARKS.md: p50 and p99 of the demand reads
# against the bound measured in the same run (RTT + segment / rate + decode).
demand_latency() {
  local out
  out=$(go test -run '^$' -bench DemandLatency -benchtime 3x ./fs)
  printf '%s\n' "$out" >&2
  echo "| condition | p50 (ms) | p99 (ms) | bound p50 (ms) | p50 ÷ bound | p99 ÷ bound |"
  echo "|---|---:|---:|---:|---:|---:|"
  printf '%s\n' "$out" | awk '/^BenchmarkDemandLatency\/(idle|streaming)/ {
    for (i = 2; i < NF; i++) m[$(i + 1)] = $i
    name = ($1 ~ /streaming/) ? "stream running" : "idle link (no stream)"
    printf "| %s | %.1f | %.1f | %.1f | %.2f | %.2f |\n", name, m["p50-ms"], m["p99-ms"], m["bound-p50-ms"],
      m["p50-ms"] / m["bound-p50-ms"], m["p99-ms"] / m["bound-p50-ms"]
  }'
}
if [ "${1:-}" = demand ]; then
  cd "$(dirname "$0")/.."
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//; s/ *$//'), $(nproc) cores; $(go version)"
  echo
  demand_latency
  exit
fi
bin=$(realpath "${1:?usage: bench.sh BIN WORKDIR}")
work=${2:?usage: bench.sh BIN WORKDIR}
mkdir -p "$work"
work=$(realpath "$work")
cd "$(dirname "$0")/.."

img=$work/images
state=$work/state
ncpu=$(nproc)
runs=3
load=$(cut -d' ' -f1-3 /proc/loadavg)

now() { date +%s.%N; }
step() { printf '== %s\n' "$*" >&2; }
size() { stat -c %s "$1"; }
cli() { "$bin" --state-dir "$state" "$@"; }

# timed LOG CMD...: runs CMD with its output in LOG and prints the wall time
# in seconds. Dirty pages are flushed first, so that writeback of earlier
# steps does not compete with CMD for the cores.
timed() {
  local log=$1 t0
  shift
  sync
  t0=$(now)
  "$@" >"$log" 2>&1 || { cat "$log" >&2; return 1; }
  awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f\n", b - a }'
}

# median T...: the median of the times given.
median() { printf '%s\n' "$@" | sort -g | awk '{ t[NR] = $1 } END { print t[int((NR + 1) / 2)] }'; }

# mbps BYTES SECONDS
mbps() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.1f", n / 1e6 / s }'; }

if [ -f "$img/custom/disk.img" ]; then
  step "reusing images in $img"
else
  step "generating images in $img"
  go run ./tools/genimages -o "$img" -memory 256MiB -disk 512MiB >&2
fi
input=$(($(size "$img/custom/disk.img") + $(size "$img/custom/memory.img")))

step "importing the base into a fresh $state"
rm -rf "$state"
cli base import --name bench-base --disk "$img/base/disk.img" --memory "$img/base/memory.img" \
  --state "$img/base/state" --vm-config "$img/base/vm.json" >&2

# create CODEC JOBS OUT: times one overlay create.
create() {
  rm -f "$3"
  timed "$3.log" cli overlay create --base bench-base --disk "$img/custom/disk.img" \
    --memory "$img/custom/memory.img" --state "$img/custom/state" --vm-config "$img/custom/vm.json" \
    --codec "$1" --jobs "$2" -o "$3"
}

declare -A med
for jobs in 1 "$ncpu"; do
  ts=()
  for i in $(seq $runs); do
    ts+=("$(create xz "$jobs" "$work/app.xz.overlay")")
    step "create xz, --jobs $jobs, run $i: ${ts[-1]} s"
  done
  med[$jobs]=$(median "${ts[@]}")
done
cat "$work/app.xz.overlay.log" >&2

zstd_t=$(create zstd "$ncpu" "$work/app.zstd.overlay")
step "create zstd, --jobs $ncpu: $zstd_t s"

ts=()
for i in $(seq $runs); do
  rm -rf "$work/extracted"
  ts+=("$(timed "$work/extract.log" cli overlay extract "$work/app.xz.overlay" -o "$work/extracted" --jobs "$ncpu")")
  step "extract xz, --jobs $ncpu, run $i: ${ts[-1]} s"
done
extract_t=$(median "${ts[@]}")
for f in disk.img memory.img state vm.json; do
  cmp "$img/custom/$f" "$work/extracted/$f"
done
rm -rf "$work/extracted"

step "codec micro-benchmarks"
micro=$(go test -run '^$' -bench 'SegmentDecode|SegmentEncode' -benchtime 20x ./overlay)
printf '%s\n' "$micro" >&2

step "size baselines"
xz_changed=$(xz -6 -T1 -c "$img/changed.bin" | wc -c)
xz_changed_blocks=$(xz -6 -T1 --block-size=1MiB -c "$img/changed.bin" | wc -c)
rm -f "$work/disk.qcow2"
qemu-img convert -c -f raw -O qcow2 -B "$img/base/disk.img" -F raw "$img/custom/disk.img" "$work/disk.qcow2"
qcow2=$(size "$work/disk.qcow2")
ovl_xz=$(size "$work/app.xz.overlay")
ovl_zstd=$(size "$work/app.zstd.overlay")

# The mount on an emulated 38 Mbit/s link with a 20 ms RTT: start to ready
# (metadata only) next to downloading the whole overlay on the same link.
step "mount: start to ready on 38mbit/20ms"
mkdir -p "$work/srv" "$work/mnt"
cp "$work/app.xz.overlay" "$work/srv/app.overlay"
"$bin" --state-dir "$state" serve --addr 127.0.0.1:0 --rate 38mbit --rtt 20ms "$work/srv" >"$work/serve.out" 2>"$work/serve.log" &
serve_pid=$!
trap 'kill $serve_pid 2>/dev/null || true; "$bin" umount "$work/mnt" 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q serving "$work/serve.out" && break; sleep 0.05; done
url="$(awk '{ print $4 }' "$work/serve.out")/app.overlay"
ready=()
for i in $(seq $runs); do
  t0=$(now)
  cli mount "$url" "$work/mnt" >"$work/mount.out" 2>"$work/mount.log" &
  mount_pid=$!
  for _ in $(seq 600); do grep -q '^ready' "$work/mount.out" && break; sleep 0.005; done
  ready+=("$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f\n", b - a }')")
  "$bin" umount "$work/mnt" >/dev/null
  wait "$mount_pid"
  step "ready run $i: ${ready[-1]} s ($(cat "$work/mount.out" | head -1))"
done
ready_t=$(median "${ready[@]}")
download=()
for i in $(seq $runs); do
  download+=("$(curl -s -o /dev/null -w '%{time_total}' "$url")")
  step "download run $i: ${download[-1]} s"
done
download_t=$(median "${download[@]}")
kill "$serve_pid"

step "fs benchmarks: read throughput of present chunks"
fsbench=$(go test -run '^$' -bench 'ReadPresent' -benchtime 3x ./fs)
printf '%s\n' "$fsbench" >&2
step "fs benchmarks: demand-read latency"
demand=$(demand_latency)

# row NAME BYTES: a size table row with the ratio to the xz overlay.
row() {
  awk -v n="$1" -v b="$2" -v o="$ovl_xz" -v note="$3" \
    'BEGIN { printf "| %s | %d | %.1f | %.2f | %s |\n", n, b, b / 1048576, b / o, note }'
}

{
  echo "## Results"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- cores (nproc): $ncpu; load average at start: $load"
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//; s/ *$//')"
  echo "- $(go version)"
  echo "- input: custom disk + memory, $input bytes ($(mbps "$input" 1) MB); changed chunks $(size "$img/changed.bin") bytes"
  echo
  echo "### Throughput"
  echo
  echo "Median wall time of $runs runs (zstd create: one run); MB/s of custom disk + memory bytes."
  echo "Inputs are in the page cache; extract times exclude flushing its output to disk."
  echo
  echo "| operation | jobs | time (s) | MB/s |"
  echo "|---|---:|---:|---:|"
  echo "| overlay create, xz | 1 | ${med[1]} | $(mbps "$input" "${med[1]}") |"
  echo "| overlay create, xz | $ncpu | ${med[$ncpu]} | $(mbps "$input" "${med[$ncpu]}") |"
  awk -v a="${med[1]}" -v b="${med[$ncpu]}" -v n="$ncpu" \
    'BEGIN { printf "| create speed-up, %d cores / 1 | | | %.2fx |\n", n, a / b }'
  echo "| overlay extract, xz | $ncpu | $extract_t | $(mbps "$input" "$extract_t") |"
  echo "| overlay create, zstd | $ncpu | $zstd_t | $(mbps "$input" "$zstd_t") |"
  echo
  echo "### Sizes"
  echo
  echo "| what | bytes | MiB | / overlay xz | covers |"
  echo "|---|---:|---:|---:|---|"
  row "overlay, xz" "$ovl_xz" "disk, memory, state, vm.json"
  row "overlay, zstd" "$ovl_zstd" "disk, memory, state, vm.json"
  row "xz -6 of changed chunks" "$xz_changed" "changed disk and memory chunks, no dedup"
  row "xz -6 --block-size=1MiB of changed chunks" "$xz_changed_blocks" "changed chunks, no dedup, independent 1 MiB blocks"
  row "qcow2 -c backed by base disk" "$qcow2" "disk only"
  echo
  echo "### Segment codecs (1 MiB segment, one core)"
  echo
  echo '```'
  printf '%s\n' "$micro" | grep 'MB/s'
  echo '```'
  echo
  echo "### Mount on 38 Mbit/s, 20 ms RTT (median of $runs)"
  echo
  echo "| what | time (s) | ratio |"
  echo "|---|---:|---:|"
  echo "| download the whole overlay ($ovl_xz bytes) | $download_t | 1.00 |"
  awk -v r="$ready_t" -v d="$download_t" 'BEGIN { printf "| cloudletfs mount: start to ready | %s | %.3f |\n", r, r / d }'
  echo
  echo "### FUSE read path and demand fetches"
  echo
  echo '```'
  printf '%s\n' "$fsbench" | grep '^Benchmark'
  echo '```'
  echo
  echo "### Demand-read latency (38 Mbit/s, 20 ms RTT)"
  echo
  printf '%s\n' "$demand"
} >"$work/results.md"
cat "$work/results.md"
