#!/usr/bin/env bash
# Figures for the FACE section of docs/BENCHMARKS.md, measured in one run:
#  - the FACE overlay as fractions of the changed state: raw, after dedup,
#    after discard alone, after both, compressed (two captures of the same
#    customization, with and without --no-discard);
#  - first response on three emulated links for the baseline (download,
#    extract, resume), early start in the capture's order, early start
#    reordered from a launch trace, the local resume and the physical limit;
#  - the daemon's peak memory during a launch and `overlay create` time for
#    these image sizes.
#
# usage: tools/bench-face.sh BIN WORKDIR
# The guest is built into WORKDIR/../face (build/face from make bench-face).
set -euo pipefail
bin=$(realpath "${1:?usage: bench-face.sh BIN WORKDIR}")
work=${2:?usage: bench-face.sh BIN WORKDIR}
mkdir -p "$work"
work=$(realpath "$work")
cd "$(dirname "$0")/.."
load=$(cut -d' ' -f1-3 /proc/loadavg)
started=$(date -u '+%Y-%m-%d %H:%M UTC')

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
step() { printf '== %s\n' "$*" >&2; }
state="$work/state"
cli() { "$bin" --state-dir "$state" "$@"; }
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
# serve DIR [FLAGS]: serves DIR in the background; sets url and srv_pid.
serve() {
  local dir=$1 log
  shift
  log=$(mktemp "$work/serve.XXXXXX")
  cli serve --addr 127.0.0.1:0 "$@" "$dir" >"$log" 2>"$log.err" &
  srv_pid=$!
  pids+=("$srv_pid")
  for _ in $(seq 200); do grep -q serving "$log" && break; sleep 0.05; done
  grep -q serving "$log" || { cat "$log.err" >&2; exit 1; }
  url=$(awk '{ print $4 }' "$log")
}

guest="$(dirname "$work")/face"
tools/face/build.sh "$guest"
rm -rf "$state" "$work/srv" && mkdir -p "$work/srv"

step "base create"
cli base create --name face --disk "$guest/disk.img" --memory-size 1GiB --kernel "$guest/vmlinuz" \
  --initrd "$guest/initrd.img" --append "$(cat "$guest/append")" --ready '^face-base-ready' --ready-timeout 15m >&2

serve "$guest/srv"
sed "s/@PORT@/${url##*:}/g" "$guest/app.script" >"$work/app.script"
capture() {
  local out=$1
  shift
  t=$(now)
  cli overlay capture --base face --script "$work/app.script" --ready '^face-app-ready' --ready-timeout 60m \
    "$@" -o "$out" >"$out.log" 2>&1 || { cat "$out.log" >&2; exit 1; }
  since "$t"
}
step "overlay capture, the semantic gap closed"
cap_d=$(capture "$work/srv/face.overlay" --trace-out "$work/capture.trace")
step "overlay capture --no-discard"
cap_nd=$(capture "$work/nodiscard.overlay" --no-discard)
kill "$srv_pid"

# counts LOG: changed, zero, base, self and data chunks from a summary.
counts() {
  sed -n 's/^changed chunks: \([0-9]*\); zero \([0-9]*\), in the base \([0-9]*\), repeated in the VM \([0-9]*\), data \([0-9]*\)$/\1 \2 \3 \4 \5/p' "$1" | tail -1
}
read -r ch_nd z_nd b_nd s_nd d_nd < <(counts "$work/nodiscard.overlay.log")
read -r ch_d z_d b_d s_d d_d < <(counts "$work/srv/face.overlay.log")
size_d=$(stat -c %s "$work/srv/face.overlay")
size_nd=$(stat -c %s "$work/nodiscard.overlay")
discarded=$(grep -o '[0-9]* chunks ([^)]*) discarded while the VM ran' "$work/srv/face.overlay.log" | tail -1 || true)

# overlay create for these image sizes, from the files the overlay extracts to.
step "overlay extract and overlay create"
rm -rf "$work/x"
cli overlay extract "$work/srv/face.overlay" -o "$work/x" >&2
sync
t=$(now)
cli overlay create --base face --disk "$work/x/disk.img" --memory "$work/x/memory.img" --state "$work/x/state" \
  --vm-config "$work/x/vm.json" -o "$work/recreated.overlay" >"$work/create.log" 2>&1
create_s=$(since "$t")
images=$(($(stat -c %s "$work/x/disk.img") + $(stat -c %s "$work/x/memory.img")))
rm -f "$work/recreated.overlay"

probe="curl -sf -m 300 --data-binary @$guest/face.png http://127.0.0.1:\$CLOUDLETFS_PORT/detect"
# first OUT: first response in seconds from a launch's timeline; fails
# unless the service found exactly one face.
first() {
  grep -q 'first response: .*"count": 1' "$1" || { echo "no correct answer in $1" >&2; cat "$1" >&2; exit 1; }
  awk '/first response/ { print $1; exit }' "$1"
}
base=$(cli base list --json | awk -F'"' '/"path"/ { print $4; exit }' | xargs dirname)
# launch NAME URL ARGS...: first response from a cold cache (a fresh state
# dir with the base imported), its timeline in WORKDIR/launch-NAME.out;
# appends the daemon's peak RSS in kB to WORKDIR/peak-rss (it runs in a
# subshell).
: >"$work/peak-rss"
launch() {
  local n=$1 u=$2 st p hwm=0 h
  shift 2
  st="$work/cold-$n"
  rm -rf "$st"
  "$bin" --state-dir "$st" base import --name face --disk "$base/disk.img" --memory "$base/memory.img" \
    --state "$base/state" --vm-config "$base/vm.json" >/dev/null
  "$bin" --state-dir "$st" launch --probe "$probe" --exit-after-probe "$@" "$u" >"$work/launch-$n.out" &
  p=$!
  pids+=("$p")
  while kill -0 "$p" 2>/dev/null; do
    h=$(awk '/^VmHWM/ { print $2 }' "/proc/$p/status" 2>/dev/null || true)
    [ -n "$h" ] && hwm=$h
    sleep 0.2
  done
  wait "$p"
  echo "$hwm" >>"$work/peak-rss"
  rm -rf "$st"
  first "$work/launch-$n.out"
}

rows=()
for link in "38mbit 20ms" "100mbit 5ms" "1gbit 1ms"; do
  set -- $link
  rate=$1 rtt=$2
  step "link $rate, $rtt"
  serve "$work/srv" --rate "$rate" --rtt "$rtt"
  t=$(now); curl -sf -o "$work/dl.overlay" "$url/face.overlay"; dl=$(since "$t")
  rm -rf "$work/dlx"; t=$(now); cli overlay extract "$work/dl.overlay" -o "$work/dlx" >/dev/null; ex=$(since "$t")
  cli launch --probe "$probe" --exit-after-probe "$work/dlx" >"$work/local-$rate.out"
  local_fr=$(first "$work/local-$rate.out")
  baseline=$(awk -v a="$dl" -v b="$ex" -v c="$local_fr" 'BEGIN { printf "%.3f", a + b + c }')
  early=$(launch "early-$rate" "$url/face.overlay" --trace-out "$work/launch-$rate.trace")
  cli overlay reorder "$work/srv/face.overlay" --trace "$work/launch-$rate.trace" -o "$work/srv/reordered-$rate.overlay" >/dev/null
  reord=$(launch "reordered-$rate" "$url/reordered-$rate.overlay")
  kill "$srv_pid"; wait "$srv_pid" 2>/dev/null || true
  rep=$(cli replay --overlay "$work/srv/face.overlay" --trace "$work/launch-$rate.trace" --rate "$rate" --rtt "$rtt")
  limit=$(printf '%s\n' "$rep" | awk '/physical limit/ { print $3 }')
  rows+=("$rate/$rtt $baseline $dl $ex $early $reord $local_fr $limit")
  step "baseline $baseline (download $dl, extract $ex, local $local_fr) early $early reordered $reord limit $limit"
done

{
  echo "### FACE VM: overlay size and first response ($started, $(nproc) cores, TCG; load average at start $load)"
  echo
  echo "Captures: ${cap_d} s with the semantic gap closed (${discarded:-discards not reported}), ${cap_nd} s with --no-discard."
  echo
  echo "| overlay of the FACE VM | chunks | fraction of the changed state | Elijah |"
  echo "|---|---:|---:|---:|"
  awk -v ch="$ch_nd" -v znd="$z_nd" -v dnd="$d_nd" -v chd="$ch_d" -v zd="$z_d" -v dd="$d_d" -v sd="$size_d" -v snd="$size_nd" 'BEGIN {
    alone = chd - zd + znd
    printf "| changed chunks, raw (--no-discard capture) | %d (%.0f MiB) | 1.00 | 1.00 |\n", ch, ch * 4096 / 1048576
    printf "| after dedup (zero, base, self) | %d | %.2f | 0.44 |\n", dnd, dnd / ch
    printf "| after discard alone (changed chunks of the discard capture, less those discard zeroed) | %d | %.2f | 0.55 |\n", alone, alone / ch
    printf "| after both | %d | %.2f | 0.28 |\n", dd, dd / ch
    printf "| compressed (the overlay file, xz) | %.1f MiB | %.3f | |\n", sd / 1048576, sd / (ch * 4096)
    printf "| compressed, --no-discard capture | %.1f MiB | %.3f | |\n", snd / 1048576, snd / (ch * 4096)
  }'
  echo
  echo "First response: seconds from the start of the command to the face service's correct answer; in brackets, the ratio to the baseline."
  echo
  echo "| link | baseline (download + extract + resume) | early start, capture order | early start, reordered from a launch trace | local resume | physical limit | network-added delay (early − local) ÷ limit |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for r in "${rows[@]}"; do
    set -- $r
    awk -v l="$1" -v b="$2" -v dl="$3" -v ex="$4" -v e="$5" -v o="$6" -v lo="$7" -v lim="$8" 'BEGIN {
      printf "| %s | %.2f (%.2f + %.2f + %.2f) | %.2f (%.2f) | %.2f (%.2f) | %.2f | %.2f | %.2f |\n",
        l, b, dl, ex, lo, e, e / b, o, o / b, lo, lim, (e - lo) / lim }'
  done
  echo
  awk -v c="$create_s" -v n="$images" -v p="$(sort -n "$work/peak-rss" | tail -1)" 'BEGIN {
    printf "`overlay create` of the FACE VM (%.1f GiB of disk and memory): %.1f s (%.0f MB/s). Peak RSS of the daemon (launch) in these runs: %.0f MiB.\n",
      n / 1073741824, c, n / 1e6 / c, p / 1024 }'
} | tee "$work/results.md"
