#!/usr/bin/env bash
# The FACE journey end to end on the defaults: build (or reuse) the FACE
# guest from Debian packages, make it a base VM (1 GiB of RAM, 3 GiB disk),
# customize it with `overlay capture` (python3-opencv and opencv-data
# installed from .debs the host serves, the face service started and
# warmed), serve the overlay over an emulated 38 Mbit/s link with a 20 ms
# RTT, and `launch --probe` it: the probe POSTs a photo and the service must
# find its one face. Then the baseline (download, extract, resume) in the
# same run, and the timeline against it.
#
# usage: tools/face/demo.sh BIN WORKDIR
# The guest is built into WORKDIR/../face (build/face from make demo-face).
set -euo pipefail
bin=$(realpath "${1:?usage: demo.sh BIN WORKDIR}")
work=${2:?usage: demo.sh BIN WORKDIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work"
work=$(realpath "$work")
export CLOUDLETFS_STATE_DIR="$work/state"
rm -rf "$CLOUDLETFS_STATE_DIR" "$work/srv" "$work/face-extracted" "$work/face-download.overlay" "$work"/serve.*
mkdir -p "$work/srv"

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
step() { printf '\n== %s\n' "$*"; }
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
# serve DIR [FLAGS]: serves DIR in the background and sets served to its URL.
serve() {
  local dir=$1 log
  shift
  log="$work/serve.$((${#pids[@]} + 1))"
  "$bin" serve --addr 127.0.0.1:0 "$@" "$dir" >"$log.out" 2>"$log.err" &
  pids+=($!)
  for _ in $(seq 200); do grep -q serving "$log.out" && break; sleep 0.05; done
  grep -q serving "$log.out" || { cat "$log.err" >&2; echo "face demo: cloudletfs serve $dir did not start" >&2; exit 1; }
  served=$(awk '{ print $4 }' "$log.out")
}

step "build or reuse the FACE guest (Debian bookworm, systemd, python3; the OpenCV .debs kept apart)"
guest="$(dirname "$work")/face"
t=$(now)
"$here/build.sh" "$guest"
echo "guest in $guest ($(secs "$t") s): disk $(du -h --apparent-size "$guest/disk.img" | cut -f1), $(wc -l <"$guest/srv/debs/index") .debs of $(du -sh "$guest/srv/debs" | cut -f1) for the application"

step "cloudletfs base create (boot Debian under QEMU, 1 GiB of RAM, capture at the root prompt)"
t=$(now)
"$bin" base create --name face --disk "$guest/disk.img" --memory-size 1GiB --kernel "$guest/vmlinuz" \
  --initrd "$guest/initrd.img" --append "$(cat "$guest/append")" --ready '^face-base-ready' --ready-timeout 15m
base_s=$(secs "$t")

step "cloudletfs overlay capture (install python3-opencv and opencv-data from the host, start the face service)"
# The guest fetches the .debs, the service and its setup from the host at
# 10.0.2.2, user-mode networking's address of the host.
serve "$guest/srv"
sed "s/@PORT@/${served##*:}/g" "$guest/app.script" >"$work/app.script"
t=$(now)
"$bin" overlay capture --base face --script "$work/app.script" --ready '^face-app-ready' --ready-timeout 60m \
  -o "$work/srv/face.overlay" | tee "$work/capture.out"
capture_s=$(secs "$t")

# A trace kept from an earlier demo's launch orders the overlay, so what the
# VM needs first comes first.
if [ -s "$work/face.trace.kept" ]; then
  echo "using the access trace of an earlier launch ($work/face.trace.kept) to reorder the overlay"
  "$bin" overlay reorder "$work/srv/face.overlay" --trace "$work/face.trace.kept" -o "$work/srv/face.overlay"
else
  echo "no trace of an earlier launch yet: the overlay keeps the order seen during capture (run make demo-face again to use this launch's trace)"
fi
"$bin" overlay info "$work/srv/face.overlay"

serve "$work/srv" --rate 38mbit --rtt 20ms
url="$served/face.overlay"
probe="curl -sf -m 300 --data-binary @$guest/face.png http://127.0.0.1:\$CLOUDLETFS_PORT/detect"
# One face in the photo, its box in the upper middle of the 512x512 image.
check() {
  local out=$1 box
  box=$(sed -n 's/.*first response: .*"count": 1, "faces": \[\[\([0-9, ]*\)\]\].*/\1/p' "$out" | head -1)
  if [ -z "$box" ]; then
    echo "face demo: the service did not find exactly one face; see $out" >&2
    exit 1
  fi
  echo "the face service found one face at x, y, w, h = $box"
}

step "cloudletfs launch --probe over 38 Mbit/s, 20 ms RTT (early start)"
"$bin" launch --probe "$probe" --exit-after-probe --trace-out "$work/face.trace" "$url" | tee "$work/launch.out"
check "$work/launch.out"
early=$(awk '/first response/ { print $1; exit }' "$work/launch.out")
cp "$work/face.trace" "$work/face.trace.kept"

step "baseline: download the whole overlay, overlay extract, resume from local files"
t=$(now)
curl -sf -o "$work/face-download.overlay" "$url"
dl=$(secs "$t")
t=$(now)
"$bin" overlay extract "$work/face-download.overlay" -o "$work/face-extracted" >/dev/null
ex=$(secs "$t")
"$bin" launch --probe "$probe" --exit-after-probe "$work/face-extracted" | tee "$work/baseline.out"
check "$work/baseline.out"
resume=$(awk '/first response/ { print $1; exit }' "$work/baseline.out")
baseline=$(awk -v a="$dl" -v b="$ex" -v c="$resume" 'BEGIN { printf "%.2f", a + b + c }')

ovl=$(stat -c %s "$work/srv/face.overlay")
step "summary"
echo "base create ${base_s} s; overlay capture (install, start, save, overlay create) ${capture_s} s"
awk -v o="$ovl" 'BEGIN { printf "FACE overlay: %.1f MiB; the whole overlay takes %.1f s on 38 Mbit/s\n", o/1048576, o * 8 / 38e6 }'
echo
echo "FACE VM on stock QEMU, 38 Mbit/s, 20 ms RTT, first response from the guest:"
printf '  early start (launch from the mount)          %6.2f s\n' "$early"
printf '  baseline (download %s s + extract %s s + resume %s s) %6.2f s\n' "$dl" "$ex" "$resume" "$baseline"
awk -v e="$early" -v b="$baseline" 'BEGIN { printf "  early start takes %.2f of the baseline time\n", e / b }'
