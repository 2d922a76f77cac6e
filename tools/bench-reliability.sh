#!/usr/bin/env bash
# Figures of docs/BENCHMARKS.md's reliability section: the daemon's peak
# memory for an 8 GiB disk plus a 2 GiB memory image read end to end, and
# the aggregate throughput of eight mounts fed by one serve, next to the
# same reads from local files. Both come from the tests that check them,
# run verbosely; LOAD_SCALE (default 16) sizes the load test's VMs.
#
# usage: tools/bench-reliability.sh WORKDIR
set -euo pipefail
work=${1:?usage: bench-reliability.sh WORKDIR}
mkdir -p "$work"
work=$(realpath "$work")
cd "$(dirname "$0")/.."
scale=${LOAD_SCALE:-16}

echo "== memory bound" >&2
go test -count=1 -run '^TestMountMemoryBound$' -v ./cmd/cloudletfs >"$work/memory.log" 2>&1 || { cat "$work/memory.log" >&2; exit 1; }
echo "== load, scale $scale" >&2
CLOUDLETFS_LOAD_SCALE=$scale go test -count=1 -run '^TestLoadEightMounts$' -v ./cmd/cloudletfs >"$work/load.log" 2>&1 || { cat "$work/load.log" >&2; exit 1; }

{
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(go version | cut -d' ' -f3), $(date -u +%F)"
  echo
  grep -o 'daemon peak RSS.*' "$work/memory.log"
  grep -o 'load: .*' "$work/load.log"
} | tee "$work/results.md"
