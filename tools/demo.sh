#!/usr/bin/env bash
# The main job on the built-in defaults: generate a base VM and a customized
# VM (256 MiB memory, 512 MiB disk), register the base, build the overlay,
# extract it again (full synthesis) and check every byte; then serve the
# overlay over an emulated 38 Mbit/s link, mount it (early start) and check
# every byte read through the mount. Then a real VM on stock QEMU: build the
# test guest, base create, overlay capture, launch --probe over the link,
# next to the baseline (download, extract, resume) measured in the same run.
#
# usage: tools/demo.sh BIN WORKDIR
set -euo pipefail
bin=$(realpath "${1:?usage: demo.sh BIN WORKDIR}")
work=${2:?usage: demo.sh BIN WORKDIR}
mkdir -p "$work"
work=$(realpath "$work")
export CLOUDLETFS_STATE_DIR="$work/state"
rm -rf "$CLOUDLETFS_STATE_DIR" "$work/extracted" "$work/app.overlay"

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f s", b - a }'; }
step() { printf '\n== %s\n' "$*"; }

step "generate a base VM and a customized VM"
t=$(now)
go run ./tools/genimages -o "$work/images"
echo "images in $work/images ($(since "$t"))"
img="$work/images"

step "cloudletfs base import"
"$bin" base import --name demo-base --disk "$img/base/disk.img" --memory "$img/base/memory.img" \
  --state "$img/base/state" --vm-config "$img/base/vm.json"

step "cloudletfs overlay create"
"$bin" overlay create --base demo-base --disk "$img/custom/disk.img" --memory "$img/custom/memory.img" \
  --state "$img/custom/state" --vm-config "$img/custom/vm.json" -o "$work/app.overlay"

step "cloudletfs overlay info"
"$bin" overlay info "$work/app.overlay"

step "cloudletfs overlay verify"
"$bin" overlay verify "$work/app.overlay"

step "cloudletfs overlay extract (full synthesis)"
"$bin" overlay extract "$work/app.overlay" -o "$work/extracted"

step "compare"
for f in disk.img memory.img state vm.json; do
  cmp "$img/custom/$f" "$work/extracted/$f"
  echo "$f: identical ($(stat -c %s "$img/custom/$f") bytes)"
done

step "early start: serve on an emulated 38 Mbit/s link with a 20 ms RTT, then mount"
mkdir -p "$work/srv" "$work/mnt"
"$bin" umount "$work/mnt" 2>/dev/null || true
cp "$work/app.overlay" "$work/srv/app.overlay"
"$bin" serve --addr 127.0.0.1:0 --rate 38mbit --rtt 20ms "$work/srv" >"$work/serve.out" 2>"$work/serve.log" &
serve_pid=$!
trap 'kill $serve_pid 2>/dev/null || true; "$bin" umount "$work/mnt" 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q serving "$work/serve.out" && break; sleep 0.05; done
url="$(awk '{ print $4 }' "$work/serve.out")/app.overlay"
t=$(now)
"$bin" mount --trace-out "$work/app.trace" "$url" "$work/mnt" >"$work/mount.out" 2>"$work/mount.log" &
mount_pid=$!
for _ in $(seq 600); do grep -q '^ready' "$work/mount.out" && break; sleep 0.005; done
ready=$(since "$t")
head -1 "$work/mount.out"
cmp "$work/mnt/state" "$img/custom/state" && echo "state: identical through the mount, $ready after start"
"$bin" status --once "$work/mnt"
t=$(now)
cmp "$work/mnt/memory/image" "$img/custom/memory.img"
cmp "$work/mnt/disk/image" "$img/custom/disk.img"
echo "disk and memory read through the mount are identical ($(since "$t") to read all, while streaming)"
"$bin" status --once "$work/mnt"
"$bin" umount "$work/mnt"
wait "$mount_pid"

# A real VM on stock QEMU: build the small guest, make it a base, customize
# it into an overlay, and launch it over the same link; then the baseline.
step "build or reuse the test guest (Debian kernel, busybox, ext4 disk)"
guest="$(dirname "$work")/guest"
tools/guest/build.sh "$guest"

step "cloudletfs base create (boot under QEMU, capture RAM, devices and vm.json)"
"$bin" base create --name demo-vm --disk "$guest/disk.img" --memory-size 256MiB \
  --kernel "$guest/vmlinuz" --initrd "$guest/initrd.img" --append "console=ttyS0 quiet" --ready '^guest-ready'

step "cloudletfs overlay capture (install the app and its data, start it)"
"$bin" overlay capture --base demo-vm --script "$guest/app.script" --ready '^app-ready' -o "$work/srv/vm.overlay"

# A trace kept from an earlier demo's launch orders the overlay, so what the
# VM needs first comes first.
if [ -s "$work/vm.trace.kept" ]; then
  echo "using the access trace of an earlier launch ($work/vm.trace.kept) to reorder the overlay"
  "$bin" overlay reorder "$work/srv/vm.overlay" --trace "$work/vm.trace.kept" -o "$work/srv/vm.overlay"
else
  echo "no trace of an earlier launch yet: the overlay keeps the order seen during capture (run make demo again to use this launch's trace)"
fi

vmurl="${url%/app.overlay}/vm.overlay"
probe='curl -sf -m 1 http://127.0.0.1:$CLOUDLETFS_PORT/cgi-bin/app'
step "cloudletfs launch --probe over 38 Mbit/s, 20 ms RTT (early start)"
"$bin" launch --probe "$probe" --exit-after-probe --trace-out "$work/vm.trace" "$vmurl" | tee "$work/launch.out"
early=$(awk '/first response/ { print $1; exit }' "$work/launch.out")
cp "$work/vm.trace" "$work/vm.trace.kept"

step "baseline: download the whole overlay, overlay extract, resume from local files"
t=$(now)
curl -sf -o "$work/vm-download.overlay" "$vmurl"
dl=$(since "$t" | cut -d' ' -f1)
rm -rf "$work/vm-extracted"
t=$(now)
"$bin" overlay extract "$work/vm-download.overlay" -o "$work/vm-extracted" >/dev/null
ex=$(since "$t" | cut -d' ' -f1)
"$bin" launch --probe "$probe" --exit-after-probe "$work/vm-extracted" | tee "$work/baseline.out"
resume=$(awk '/first response/ { print $1; exit }' "$work/baseline.out")
baseline=$(awk -v a="$dl" -v b="$ex" -v c="$resume" 'BEGIN { printf "%.2f", a + b + c }')
kill "$serve_pid"
echo "recorded $(grep -vc '^#' "$work/app.trace") first accesses in $work/app.trace"

custom=$(( $(stat -c %s "$img/custom/disk.img") + $(stat -c %s "$img/custom/memory.img") ))
ovl=$(stat -c %s "$work/app.overlay")
step "summary"
awk -v c="$custom" -v o="$ovl" 'BEGIN {
  printf "custom VM: %.0f MiB of disk and memory; overlay: %.1f MiB (%.2f%% of the VM)\n", c/1048576, o/1048576, 100*o/c
  printf "extracted VM is byte-identical to the customized one\n" }'
echo "mount ready in $ready on 38 Mbit/s; the whole overlay takes $(awk -v o="$ovl" 'BEGIN { printf "%.1f s", o * 8 / 38e6 }') on that link"
echo
echo "VM on stock QEMU, 38 Mbit/s, 20 ms RTT, first response from the guest:"
printf '  early start (launch from the mount)          %6.2f s\n' "$early"
printf '  baseline (download %s s + extract %s s + resume %s s) %6.2f s\n' "$dl" "$ex" "$resume" "$baseline"
awk -v e="$early" -v b="$baseline" 'BEGIN { printf "  early start takes %.2f of the baseline time\n", e / b }'
