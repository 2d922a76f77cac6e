#!/usr/bin/env bash
# Figures for the semantic-gap table of docs/BENCHMARKS.md: the seed's
# experiment on the test guest. A custom VM downloads 100 MB from the host
# to its disk (the page cache holds it too), copies 48 MB of it into a
# tmpfs, and deletes both; the overlay of that VM, captured with discard
# and with --no-discard, next to the overlay of a VM that does the rest of
# the customization without the download, captured the same way.
#
# usage: tools/bench-gap.sh BIN WORKDIR
set -euo pipefail
bin=$(realpath "${1:?usage: bench-gap.sh BIN WORKDIR}")
work=${2:?usage: bench-gap.sh BIN WORKDIR}
mkdir -p "$work"
work=$(realpath "$work")
cd "$(dirname "$0")/.."
step() { printf '== %s\n' "$*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

guest="$(dirname "$work")/guest"
tools/guest/build.sh "$guest"
state="$work/state"
rm -rf "$state" "$work/srv" "$work/root" && mkdir -p "$work/srv" "$work/root/etc"
cli() { "$bin" --state-dir "$state" "$@"; }

# A disk with room for the download, in 4 KiB blocks as the page cache's.
echo "cloudlet test guest" >"$work/root/etc/motd"
rm -f "$work/disk.img"
mke2fs -q -t ext4 -b 4096 -L guest -d "$work/root" "$work/disk.img" 192M >&2
head -c 100000000 /dev/urandom >"$work/srv/payload"
"$bin" serve --addr 127.0.0.1:0 "$work/srv" >"$work/serve.out" 2>/dev/null &
srv=$!
trap 'kill $srv 2>/dev/null' EXIT
for _ in $(seq 100); do grep -q serving "$work/serve.out" && break; sleep 0.05; done
port=$(awk '{ print $4 }' "$work/serve.out" | sed 's/.*://')

# The rest of the customization: 32 MiB of one byte in a tmpfs, an HTTP
# server, then the line that says it is done.
rest='dd if=/dev/zero bs=1M count=32 2>/dev/null | tr "\0" h >/run/held
httpd -p 8080 -h /run
sync
echo "gap-""ready"'
printf '%s\n' "$rest" >"$work/plain.script"
printf 'wget -q -O /mnt/dl http://10.0.2.2:%s/payload\ndd if=/mnt/dl of=/run/ram bs=1M count=48 2>/dev/null\nrm /mnt/dl /run/ram\n%s\n' \
  "$port" "$rest" >"$work/download.script"

step "base create"
cli base create --name gap --disk "$work/disk.img" --memory-size 256MiB --kernel "$guest/vmlinuz" \
  --initrd "$guest/initrd.img" --append "console=ttyS0 quiet" --ready '^guest-ready' >&2

# capture NAME SCRIPT FLAGS...: prints the overlay's size in bytes and the
# capture's time in seconds.
capture() {
  local name=$1 script=$2 t
  shift 2
  step "overlay capture: $name $*"
  t=$(now)
  cli overlay capture --base gap --script "$script" --ready '^gap-ready' -o "$work/$name.overlay" "$@" >"$work/$name.out"
  echo "$(stat -c %s "$work/$name.overlay") $(since "$t")"
}
read -r plain plain_t < <(capture plain "$work/plain.script")
read -r plain_nd plain_nd_t < <(capture plain-no-discard "$work/plain.script" --no-discard)
read -r dl dl_t < <(capture download "$work/download.script")
read -r dl_nd dl_nd_t < <(capture download-no-discard "$work/download.script" --no-discard)

mb() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1e6 }'; }
grew=$((dl - plain))
grew_nd=$((dl_nd - plain_nd))
echo "| capture | without the download (MB) | with the 100 MB download, deleted (MB) | growth (MB) | growth, share of --no-discard's | capture time, with the download (s) |"
echo "|---|---:|---:|---:|---:|---:|"
echo "| \`--no-discard\` | $(mb "$plain_nd") | $(mb "$dl_nd") | $(mb "$grew_nd") | 1.00 | $dl_nd_t |"
echo "| discard (default) | $(mb "$plain") | $(mb "$dl") | $(mb "$grew") | $(awk -v a="$grew" -v b="$grew_nd" 'BEGIN { printf "%.4f", a / b }') | $dl_t |"
echo
echo "Capture times without the download: $plain_nd_t s with --no-discard, $plain_t s with discard."
grep -h "waited" "$work/download.out" || true
