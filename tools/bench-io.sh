#!/usr/bin/env bash
# The guest's disk I/O through the mount, next to the same file on the state
# dir's disk and through a go-fuse loopback of it, measured in one run with
# fio: sequential 1 MiB writes and reads, random 4 KiB writes, random 4 KiB
# writes each followed by an fsync, and random 4 KiB reads, all with O_DIRECT
# (psync, iodepth 1) over the first 256 MiB of the disk image, each for a
# fixed time. The writes come first, so the reads read written chunks, as a
# guest rereads what it installed. Prints a markdown table of IOPS, MB/s and
# ratios to the plain file, also written to WORKDIR/results-io.md.
#
# usage: tools/bench-io.sh BIN WORKDIR [RUNTIME_SECONDS]
set -euo pipefail
bin=$(realpath "${1:?usage: bench-io.sh BIN WORKDIR [RUNTIME_SECONDS]}")
work=${2:?usage: bench-io.sh BIN WORKDIR [RUNTIME_SECONDS]}
runtime=${3:-10}
size=256M
command -v fio >/dev/null || { echo "bench-io: fio is missing: run make deps" >&2; exit 1; }
mkdir -p "$work"
work=$(realpath "$work")
export CLOUDLETFS_STATE_DIR="$work/state"

cleanup() {
  [ -n "${loop_pid:-}" ] && kill "$loop_pid" 2>/dev/null && wait "$loop_pid" 2>/dev/null
  "$bin" umount "$work/mnt" 2>/dev/null || true
  [ -n "${mount_pid:-}" ] && wait "$mount_pid" 2>/dev/null
  true
}
trap cleanup EXIT
cleanup

img="$work/images"
if [ ! -s "$img/custom/disk.img" ]; then
  go run ./tools/genimages -o "$img"
fi
rm -rf "$CLOUDLETFS_STATE_DIR" "$work/plain" "$work/app.overlay"
"$bin" base import --name bench-io --disk "$img/base/disk.img" --memory "$img/base/memory.img" \
  --state "$img/base/state" --vm-config "$img/base/vm.json" >/dev/null
"$bin" overlay create --base bench-io --disk "$img/custom/disk.img" --memory "$img/custom/memory.img" \
  --state "$img/custom/state" --vm-config "$img/custom/vm.json" -o "$work/app.overlay" >/dev/null

# (i) the plain file, on the disk that holds the state dir.
mkdir -p "$work/plain" "$work/loop" "$work/mnt"
cp "$img/custom/disk.img" "$work/plain/disk.img"

# (ii) a go-fuse loopback of its directory, without passthrough.
go build -o "$work/loopback" ./tools/loopback
"$work/loopback" "$work/plain" "$work/loop" >"$work/loop.out" 2>"$work/loop.log" &
loop_pid=$!
for _ in $(seq 200); do grep -q ready "$work/loop.out" && break; sleep 0.05; done
grep -q ready "$work/loop.out" || { echo "bench-io: the loopback did not come up: $(cat "$work/loop.log")" >&2; exit 1; }

# (iii) the overlay mounted from the local file; every segment is in before
# fio starts, so no read waits on a fetch.
"$bin" mount "$work/app.overlay" "$work/mnt" >"$work/mount.out" 2>"$work/mount.log" &
mount_pid=$!
for _ in $(seq 600); do grep -q '"complete": true' "$work/mnt/stats" 2>/dev/null && break; sleep 0.1; done
grep -q '"complete": true' "$work/mnt/stats" || { echo "bench-io: the mount did not complete: $(cat "$work/mount.log")" >&2; exit 1; }

targets=("plain file:$work/plain/disk.img" "go-fuse loopback:$work/loop/disk.img" "cloudletfs mount:$work/mnt/disk/image")
jobs=("seq-write:write:1M:0" "rand-write:randwrite:4k:0" "rand-write+fsync:randwrite:4k:1" "rand-read:randread:4k:0" "seq-read:read:1M:0")
declare -A iops mbs
for t in "${targets[@]}"; do
  name=${t%%:*} file=${t#*:}
  for j in "${jobs[@]}"; do
    IFS=: read -r job rw bs fsync <<<"$j"
    out=$(fio --name="$job" --filename="$file" --size="$size" --rw="$rw" --bs="$bs" --fsync="$fsync" \
      --direct=1 --ioengine=psync --iodepth=1 --runtime="$runtime" --time_based --randrepeat=0 \
      --allow_file_create=0 --output-format=json)
    dir=read
    [[ $rw == *write ]] && dir=write
    iops[$name/$job]=$(jq -r ".jobs[0].$dir.iops" <<<"$out")
    mbs[$name/$job]=$(jq -r ".jobs[0].$dir.bw_bytes / 1e6" <<<"$out")
  done
done

{
  echo "fio, O_DIRECT, psync, iodepth 1, ${runtime} s per job, first $size of a $(stat -c %s "$img/custom/disk.img" | numfmt --to=iec-i)B disk image; $(nproc) cores, $(uname -r), $(date -u +%F)"
  echo
  echo "| job | plain file | go-fuse loopback | ratio | cloudletfs mount | ratio |"
  echo "|---|---:|---:|---:|---:|---:|"
  for j in "${jobs[@]}"; do
    job=${j%%:*} bs=$(cut -d: -f3 <<<"$j")
    p="plain file/$job" l="go-fuse loopback/$job" c="cloudletfs mount/$job"
    if [ "$bs" = 1M ]; then
      awk -v j="$job 1 MiB" -v p="${mbs[$p]}" -v l="${mbs[$l]}" -v c="${mbs[$c]}" \
        'BEGIN { printf "| %s | %.0f MB/s | %.0f MB/s | %.2f | %.0f MB/s | **%.2f** |\n", j, p, l, l/p, c, c/p }'
    else
      awk -v j="$job 4 KiB" -v p="${iops[$p]}" -v l="${iops[$l]}" -v c="${iops[$c]}" \
        'BEGIN { printf "| %s | %.0f IOPS | %.0f IOPS | %.2f | %.0f IOPS | **%.2f** |\n", j, p, l, l/p, c, c/p }'
    fi
  done
} | tee "$work/results-io.md"
