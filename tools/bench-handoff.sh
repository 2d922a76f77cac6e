#!/usr/bin/env bash
# Figures for the handoff section of docs/BENCHMARKS.md: a running VM moved
# from one cloudlet to another on this machine, by QEMU's own precopy live
# migration and by `cloudletfs handoff`, side by side in one run, over
# emulated links (in user space) of 10, 25 and 100 Mbit/s with a 20 ms RTT:
# total time, time until the destination has every byte, downtime, bytes on
# the wire, bytes of the parent overlay fetched from its server, and the
# largest gap in the answers of a client that asks the guest's application
# every 100 ms throughout.
#
# The VM is the test guest with its app (256 MiB of RAM), captured once by
# the benchmark. For QEMU's migration the destination's disk is a copy of
# the source's made just before the migration: neither its bytes nor its
# time are counted. Every run starts from fresh state dirs. The benchmark
# itself is BenchmarkHandoff in cmd/cloudletfs/handoff_bench_test.go (it
# builds its own binary from the tree; BIN is checked only, to match the
# other drivers). The markdown goes to stdout and OUTDIR/results.md, the
# benchmark's own output to OUTDIR/bench.out. A QEMU migration that does not
# converge within 10 minutes is cancelled and shown as such; a handoff that
# fails, or whose application does not answer on B, fails the run.
#
# usage: tools/bench-handoff.sh BIN OUTDIR
#        BENCH_RATES=10,25,100 (Mbit/s) by default
set -euo pipefail
bin=${1:?usage: bench-handoff.sh BIN OUTDIR}
work=${2:?usage: bench-handoff.sh BIN OUTDIR}
[ -x "$bin" ] || { echo "bench-handoff.sh: $bin is not an executable" >&2; exit 2; }
mkdir -p "$work"
work=$(realpath "$work")
cd "$(dirname "$0")/.."
rm -f "$work/results.md"
status=0
BENCH_OUT="$work/results.md" go test -run '^$' -bench BenchmarkHandoff -benchtime 1x -timeout 60m ./cmd/cloudletfs/ \
  2>&1 | tee "$work/bench.out" >&2 || status=$?
[ -s "$work/results.md" ] || { echo "bench-handoff.sh: the benchmark wrote no results (see $work/bench.out)" >&2; exit 1; }
cat "$work/results.md"
# A run in which a handoff failed still prints what it measured, and fails.
exit "$status"
