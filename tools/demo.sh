#!/usr/bin/env bash
# The main job on the built-in defaults: generate a base VM and a customized
# VM (256 MiB memory, 512 MiB disk), register the base, build the overlay,
# extract it again (full synthesis) and check every byte.
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

custom=$(( $(stat -c %s "$img/custom/disk.img") + $(stat -c %s "$img/custom/memory.img") ))
ovl=$(stat -c %s "$work/app.overlay")
step "summary"
awk -v c="$custom" -v o="$ovl" 'BEGIN {
  printf "custom VM: %.0f MiB of disk and memory; overlay: %.1f MiB (%.2f%% of the VM)\n", c/1048576, o/1048576, 100*o/c
  printf "extracted VM is byte-identical to the customized one\n" }'
