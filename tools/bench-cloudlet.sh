#!/usr/bin/env bash
# Figures for the cloudlet service's section of docs/BENCHMARKS.md: the first
# response of one VM alone and of four VMs requested at once through the
# service's API (POST /v1/vms), each VM's own first response and their
# spread, on an emulated 38 Mbit/s, 20 ms link and on an unshaped one; next
# to the one-shot path (`cloudletfs launch --probe ... --exit-after-probe`)
# of the same overlay, measured in the same run.
#
# The VM is the test guest with its app, captured as bench-order.sh does.
# One overlay's data runs in one VM at a time, so four VMs at once need four
# overlays: the captured one is extracted and rebuilt four times with
# `overlay create` and `overlay reorder --trace` of the capture's own trace
# (same codec, same 1 MiB segments, the capture's stream order), with a
# vm.json that differs only by 0 to 3 trailing spaces. Their segments are
# byte-identical (checked); only their IDs differ.
#
# Every measured start is from a cold cache: `cache rm` of the four overlays
# while no VM runs. Times are seconds from the POST (for the four at once,
# from the moment the four POSTs were fired together); `launch`'s are from
# its own start. The markdown goes to stdout and OUTDIR/results.md, every
# VM's figures to OUTDIR/results.csv, progress to stderr.
#
# usage: tools/bench-cloudlet.sh BIN OUTDIR
#        RUNS=3 ACCEL=auto (kvm when it works, else tcg) by default
set -euo pipefail
bin_in=$(realpath "${1:?usage: bench-cloudlet.sh BIN OUTDIR}")
work=${2:?usage: bench-cloudlet.sh BIN OUTDIR}
mkdir -p "$work"
work=$(realpath "$work")
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
accel=${ACCEL:-auto}
probe_path=/cgi-bin/app
probe_cmd="curl -sf -m 1 http://127.0.0.1:\$CLOUDLETFS_PORT$probe_path"
deadline_s=600 # longest any wait below may take

step() { printf '== %s\n' "$*" >&2; }
now() { date +%s.%N; }
load1() { cut -d' ' -f1 /proc/loadavg; }
# QEMUs running on the machine besides this run's (none of which runs when
# this is called): other test runs sharing the cores.
others() { pgrep -c -x qemu-system-x86_64 || true; }

state="$work/state"
srv="$work/srv"
csv="$work/results.csv"
uptime_start=$(uptime)
date_start=$(date -u '+%Y-%m-%d %H:%M UTC')

# A leftover of an earlier run: its mounts go before its state dir does.
if [ -d "$state" ]; then
  awk -v p="$state/" 'index($5, p) == 1 { print $5 }' /proc/self/mountinfo | while read -r m; do
    fusermount3 -u "$m" 2>/dev/null || umount -l "$m" || true
  done
fi
rm -rf "$state" "$srv" "$work/runs"
mkdir -p "$srv" "$work/runs"
# The service starts its workers from its own executable: a private copy
# keeps a rebuild of BIN during the run out of the figures.
cp "$bin_in" "$work/cloudletfs"
bin="$work/cloudletfs"
cli() { "$bin" --state-dir "$state" "$@"; }

srv_pid= cl_pid= api= url=
# end_pid PID: SIGTERM, then SIGKILL after 20 s; waits for it.
end_pid() {
  [ -n "$1" ] || return 0
  kill "$1" 2>/dev/null || return 0
  local i
  for i in $(seq 200); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
cleanup() {
  set +e
  local id pid pids=()
  if [ -n "$api" ]; then
    for id in $(curl -s -m 5 "$api/v1/vms" | jq -r '.vms[] | select(.state != "stopped" and .state != "failed") | .id' 2>/dev/null); do
      curl -s -m 90 -X DELETE "$api/v1/vms/$id" >/dev/null &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
  fi
  end_pid "$cl_pid"
  end_pid "$srv_pid"
  # Workers run in sessions of their own; any the API could not stop
  # (the daemon died first) are found by this run's state dir.
  for pid in $(pgrep -f -- "cloudlet-worker $state/cloudlet/vms/"); do kill "$pid"; done
  return 0
}
trap cleanup EXIT

# wait_line FILE REGEX WHAT: waits for a line of FILE to match.
wait_line() {
  local end=$(($(date +%s) + 30))
  until grep -q "$2" "$1" 2>/dev/null; do
    [ "$(date +%s)" -lt "$end" ] || { echo "no '$2' from $3 within 30 s:" >&2; cat "$1" >&2; return 1; }
    sleep 0.05
  done
}

guest="$(dirname "$work")/guest"
tools/guest/build.sh "$guest"

step "base create and overlay capture ($accel)"
cli base create --name guest --accel "$accel" --disk "$guest/disk.img" --memory-size 256MiB --kernel "$guest/vmlinuz" \
  --initrd "$guest/initrd.img" --append "console=ttyS0 quiet" --ready '^guest-ready' >&2
cli overlay capture --base guest --accel "$accel" --script "$guest/app.script" --ready '^app-ready' \
  --trace-out "$work/capture.trace" -o "$work/captured.overlay" >&2

step "four overlays of the same VM"
rm -rf "$work/x" && cli overlay extract "$work/captured.overlay" -o "$work/x" >&2
ids=()
for i in 1 2 3 4; do
  { cat "$work/x/vm.json"; printf '%*s' $((i - 1)) ''; } >"$work/vm$i.json"
  cli overlay create --base guest --disk "$work/x/disk.img" --memory "$work/x/memory.img" --state "$work/x/state" \
    --vm-config "$work/vm$i.json" -o "$work/linear$i.overlay" >&2
  cli overlay reorder "$work/linear$i.overlay" --trace "$work/capture.trace" -o "$srv/vm$i.overlay" >&2
  rm -f "$work/linear$i.overlay"
  cli overlay info --json "$srv/vm$i.overlay" >"$work/vm$i.info.json"
  ids+=("$(jq -r .id "$work/vm$i.info.json")")
  jq -c '[.segments[] | [.stored, .raw, .codec, .sha256]]' "$work/vm$i.info.json" >"$work/vm$i.segments"
  cmp -s "$work/vm1.segments" "$work/vm$i.segments" || { echo "overlay $i's segments differ from overlay 1's" >&2; exit 1; }
  off=$(jq .metadata_bytes "$work/vm$i.info.json")
  [ "$i" = 1 ] && off1=$off
  cmp -s <(tail -c +$((off + 1)) "$srv/vm$i.overlay") <(tail -c +$((off1 + 1)) "$srv/vm1.overlay") ||
    { echo "overlay $i's segment bytes differ from overlay 1's" >&2; exit 1; }
done
[ "$(printf '%s\n' "${ids[@]}" | sort -u | wc -l)" = 4 ] || { echo "the four overlays do not have four IDs" >&2; exit 1; }
rm -rf "$work/x"
same_as_capture=no
cmp -s "$work/captured.overlay" "$srv/vm1.overlay" && same_as_capture=yes
ovl_bytes=$(jq .size "$work/vm1.info.json")
ovl_meta=$(jq .metadata_bytes "$work/vm1.info.json")
ovl_segs=$(jq '.segments | length' "$work/vm1.info.json")
ovl_codec=$(jq -r '.segment_codecs | keys | join("+")' "$work/vm1.info.json")
step "overlays ${ids[*]}: $ovl_bytes bytes, $ovl_segs $ovl_codec segments (overlay 1 byte-identical to the capture: $same_as_capture)"

# cold: drops the four overlays' caches; no VM of them may run.
# (grep reads a variable, not a pipe: with pipefail, grep -q ending the
# pipe early can fail it.)
cold() {
  local id caches
  caches=$(cli cache ls)
  for id in "${ids[@]}"; do
    if grep -q "^$id " <<<"$caches"; then cli cache rm "$id" >/dev/null; fi
  done
  caches=$(cli cache ls)
  for id in "${ids[@]}"; do
    if grep -q "^$id " <<<"$caches"; then echo "the cache of $id is still there" >&2; return 1; fi
  done
}

step "the cloudlet service"
"$bin" --state-dir "$state" cloudlet --listen 127.0.0.1:0 --accel "$accel" >"$work/cloudlet.out" 2>"$work/cloudlet.log" &
cl_pid=$!
wait_line "$work/cloudlet.out" '^cloudlet listening on ' "cloudletfs cloudlet"
api=$(awk '/^cloudlet listening on / { print $4; exit }' "$work/cloudlet.out")
cl_accel=$(sed -n 's/^cloudlet listening on [^ ]* (\([a-z]*\),.*/\1/p' "$work/cloudlet.out")
for i in 1 2 3 4; do
  jq -nc --arg o "OVERLAY$i" --arg p "$probe_path" '{overlay: $o, probe: {http: $p}}' >"$work/body$i.tmpl"
done

# post I DIR: asks for a VM of overlay I; DIR/post$I.json gets the reply.
post() {
  local code
  code=$(curl -s -m 60 -o "$2/post$1.json" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
    --data-binary @"$2/body$1.json" "$api/v1/vms") || true
  [ "$code" = 202 ] || { echo "POST of overlay $1: HTTP $code: $(cat "$2/post$1.json" 2>/dev/null)" >&2; return 1; }
}

# answered DIR ID...: waits until every VM has given its first response;
# DIR/ID.json then holds each VM as the API shows it.
answered() {
  local dir=$1 end=$(($(date +%s) + deadline_s)) list bad pending id
  shift
  local want
  want=$(printf '%s\n' "$@" | jq -R . | jq -sc .)
  while :; do
    list=$(curl -sf -m 10 "$api/v1/vms") || list='{"vms":[]}'
    bad=$(jq -r --argjson w "$want" '.vms[] | select(.id as $i | $w | index($i)) |
      select(.state == "failed" or .state == "stopped" or .state == "stopping") | "\(.id) \(.state): \(.reason)"' <<<"$list")
    [ -z "$bad" ] || { echo "VMs ended before their first response: $bad" >&2; return 1; }
    pending=$(jq -r --argjson w "$want" '[.vms[] | select(.id as $i | $w | index($i)) |
      select(.state == "first-response" or .state == "complete")] | length' <<<"$list")
    [ "$pending" = "$#" ] && break
    [ "$(date +%s)" -lt "$end" ] || { echo "VMs $* not all answered within $deadline_s s" >&2; return 1; }
    sleep 0.5
  done
  for id; do curl -sf -m 10 "$api/v1/vms/$id" >"$dir/$id.json"; done
}

# stop ID...: stops the VMs through the API, all at once, and checks they stopped.
stop() {
  local id pid pids=()
  for id; do
    curl -s -m 90 -X DELETE -o "$work/runs/stop-$id.json" "$api/v1/vms/$id" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || true; done
  for id; do
    [ "$(jq -r .state "$work/runs/stop-$id.json" 2>/dev/null)" = stopped ] ||
      { echo "VM $id did not stop: $(cat "$work/runs/stop-$id.json" 2>/dev/null)" >&2; return 1; }
  done
}

# csv_vm LINK SCENARIO RUN VM OVERLAY T0 LOAD FILE: one CSV row of a VM
# of the service, its times from its POST at T0.
csv_vm() {
  local req
  req=$(date -d "$(jq -r .requested "$8")" +%s.%N)
  jq -r 'def at(s): ([.timeline[] | select(.step == s) | .at_s][0] // "");
    [.id, at("metadata"), at("running"), at("first-response"), at("complete"),
     (.stats.bytes_fetched // ""), (.stats.stall_ms // "")] | @tsv' "$8" |
    awk -F'\t' -v l="$1" -v s="$2" -v r="$3" -v v="$4" -v o="$5" -v load="$7" -v adm="$(awk -v a="$6" -v b="$req" 'BEGIN { printf "%.3f", b - a }')" \
      '{ c = ($5 == "") ? "" : sprintf("%.3f", adm + $5); st = ($7 == "") ? "" : sprintf("%.3f", $7 / 1000)
         printf "%s,%s,%s,%s,%s,%s,%s,%.3f,%.3f,%.3f,%.3f,%s,%s,%s\n", l, s, r, v, o, $1, load, adm, adm + $2, adm + $3, adm + $4, c, $6, st }' >>"$csv"
}

# baseline LINK RUN: the one-shot path, `launch` of overlay 1 until its
# first response, from a cold cache.
baseline() {
  local out="$work/runs/${1//\//-}-launch-$2.out" load
  cold
  load="$(load1),$(others)"
  timeout "$deadline_s" "$bin" --state-dir "$state" launch --accel "$accel" --probe "$probe_cmd" --exit-after-probe \
    --trace-out "$out.trace" "$url/vm1.overlay" >"$out" 2>"$out.log" || { echo "launch failed:" >&2; cat "$out" "$out.log" >&2; return 1; }
  awk -v OFS=, -v l="$1" -v r="$2" -v id="${ids[0]}" -v load="$load" '
    / metadata arrived/ { m = $1 } / QEMU running/ { q = $1 } / first response/ { f = $1 } / overlay complete/ { c = $1 }
    END { if (f == "") exit 1; printf "%s,launch,%s,1,%s,,%s,0.000,%.3f,%.3f,%.3f,%.3f,,\n", l, r, id, load, m, q, f, c }' "$out" >>"$csv" ||
    { echo "launch printed no first response:" >&2; cat "$out" >&2; return 1; }
}

# service LINK RUN N: N VMs (overlays 1..N) requested at once through the
# API, from a cold cache, until each has answered; then stopped.
service() {
  local d="$work/runs/${1//\//-}-$2-$4" i t0 load id pid pids=() vms=()
  mkdir -p "$d"
  cold
  for i in $(seq "$3"); do sed "s|OVERLAY$i|$url/vm$i.overlay|" "$work/body$i.tmpl" >"$d/body$i.json"; done
  load="$(load1),$(others)"
  t0=$(now)
  for i in $(seq "$3"); do
    post "$i" "$d" &
    pids+=($!)
  done
  local failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  for i in $(seq "$3"); do
    [ -s "$d/post$i.json" ] && id=$(jq -r '.id // empty' "$d/post$i.json") && [ -n "$id" ] && vms+=("$id")
  done
  if [ "$failed" = 1 ]; then
    [ "${#vms[@]}" = 0 ] || stop "${vms[@]}" || true
    return 1
  fi
  answered "$d" "${vms[@]}" || { stop "${vms[@]}" || true; return 1; }
  stop "${vms[@]}"
  for i in $(seq "$3"); do csv_vm "$1" "$2" "$4" "$i" "${ids[$((i - 1))]}" "$t0" "$load" "$d/${vms[$((i - 1))]}.json"; done
}

# load1 and other_qemus: the 1-minute load average and the QEMUs of
# others running, at the start of the run; bytes_fetched and stall_s: the mount's figures as the
# worker last sampled them (once a second) when the VM was read after its
# first response.
echo "link,scenario,run,vm,overlay,vm_id,load1,other_qemus,admitted_s,metadata_s,running_s,first_response_s,complete_s,bytes_fetched,stall_s" >"$csv"
echo "link,run,needed_before_first_response,physical_limit_s,replay_first_response_s" >"$work/replay.csv"
links=("38mbit/20ms" "unshaped")
for link in "${links[@]}"; do
  step "link $link"
  if [ "$link" = unshaped ]; then
    "$bin" --state-dir "$state" serve --addr 127.0.0.1:0 "$srv" >"$work/serve.out" 2>"$work/serve-$link.log" &
  else
    "$bin" --state-dir "$state" serve --addr 127.0.0.1:0 --rate "${link%/*}" --rtt "${link#*/}" "$srv" >"$work/serve.out" 2>"$work/serve-${link%/*}.log" &
  fi
  srv_pid=$!
  wait_line "$work/serve.out" '^serving ' "cloudletfs serve"
  url=$(awk '/^serving / { print $4; exit }' "$work/serve.out")
  # The three paths in turn, so that a change of the machine's load
  # falls on all of them.
  for r in $(seq "$runs"); do
    baseline "$link" "$r"
    service "$link" alone 1 "$r"
    service "$link" four 4 "$r"
    step "$link run $r: $(awk -F, -v l="$link" -v r="$r" '$1 == l && $3 == r { printf "%s/%s %s  ", $2, $4, $12 }' "$csv")"
  done
  end_pid "$srv_pid"
  srv_pid=
  # What the link alone costs: the compressed bytes the VM read before its
  # first response (replay of each launch's trace) ÷ the rate + one RTT.
  if [ "$link" != unshaped ]; then
    for r in $(seq "$runs"); do
      cli replay --overlay "$srv/vm1.overlay" --trace "$work/runs/${link//\//-}-launch-$r.out.trace" \
        --rate "${link%/*}" --rtt "${link#*/}" >"$work/runs/${link//\//-}-replay-$r.txt"
      awk -v l="$link" -v r="$r" '/physical limit/ { lim = $3; need = $5 " " $6; sub(/^\(/, "", need) }
        /^ *first response/ { pred = $3 } END { printf "%s,%s,%s,%s,%s\n", l, r, need, lim, pred }' \
        "$work/runs/${link//\//-}-replay-$r.txt" >>"$work/replay.csv"
    done
  fi
done
uptime_end=$(uptime)

# vals LINK SCENARIO COLUMN: a column of the CSV over one link and
# scenario, sorted; med prints their median, medrange "median (min–max)".
vals() { awk -F, -v l="$1" -v s="$2" -v c="$3" 'NR > 1 && $1 == l && $2 == s && $c != "" { print $c }' "$csv" | sort -g; }
med() { awk '{ v[NR] = $1 } END { if (NR == 0) { print ""; exit } m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.3f\n", m }'; }
medrange() { awk '{ v[NR] = $1 } END { if (NR == 0) { print "–"; exit } m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
  printf "%.2f (%.2f–%.2f)\n", m, v[1], v[NR] }'; }
# per_run LINK COLUMN AGG: for each run of the four at once, the max, min
# or spread (max − min) of a column over its four VMs.
per_run() {
  awk -F, -v l="$1" -v c="$2" -v agg="$3" 'NR > 1 && $1 == l && $2 == "four" {
      r = $3; if (!(r in mx) || $c > mx[r]) mx[r] = $c; if (!(r in mn) || $c < mn[r]) mn[r] = $c }
    END { for (r in mx) print (agg == "max") ? mx[r] : (agg == "min") ? mn[r] : mx[r] - mn[r] }' "$csv" | sort -g
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

{
  echo "### The cloudlet service: one VM and four at once ($date_start, $(nproc) cores, $cl_accel)"
  echo
  echo "- CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; memory $(free -g | awk '/^Mem:/ { print $2 }') GiB"
  echo "- Debian $(cat /etc/debian_version), Linux $(uname -r); $(go version | cut -d' ' -f3); $(qemu-system-x86_64 --version | head -1)"
  echo "- load at start: ${uptime_start#*load average: }; at end: ${uptime_end#*load average: }"
  echo "- overlays: 4 of the test guest's app VM, $ovl_bytes bytes each (metadata $ovl_meta), $ovl_segs $ovl_codec segments of 1 MiB raw, the capture's order; overlay 1 byte-identical to the capture: $same_as_capture"
  echo "- every start from a cold cache; times in seconds from the POST (four at once: from firing the four POSTs together); \`launch\`: from its start; median (range) of $runs runs"
  echo
  echo "| link | path | admitted | QEMU running | first response | first response ÷ \`launch\` |"
  echo "|---|---|---:|---:|---:|---:|"
  for link in "${links[@]}"; do
    base=$(vals "$link" launch 12 | med)
    for sc in launch alone four; do
      case $sc in
      launch) name="\`launch --exit-after-probe\` (one-shot, baseline)" ;;
      alone) name="service, one VM alone" ;;
      four) name="service, 4 at once (each of the $((4 * runs)) VMs)" ;;
      esac
      adm="–"
      [ "$sc" = launch ] || adm=$(vals "$link" "$sc" 9 | medrange)
      echo "| $link | $name | $adm | $(vals "$link" "$sc" 11 | medrange) | $(vals "$link" "$sc" 12 | medrange) | $(ratio "$(vals "$link" "$sc" 12 | med)" "$base") |"
    done
    echo "| $link | service, 4 at once: the last VM of each run | $(per_run "$link" 9 max | medrange) | $(per_run "$link" 11 max | medrange) | $(per_run "$link" 12 max | medrange) | $(ratio "$(per_run "$link" 12 max | med)" "$base") |"
  done
  echo
  echo "Four at once, each run: QEMU running / first response of VMs 1 to 4, and the spread (max − min)."
  echo
  echo "Load: the 1-minute load average and the QEMUs of other runs on the machine as the run began. Fetched: the"
  echo "four mounts' bytes fetched as their workers last sampled them (once a second) when read after the last first response."
  echo
  echo "| link | run | load, other QEMUs | VM 1 | VM 2 | VM 3 | VM 4 | spread of QEMU running | spread of first response | fetched by the four (MiB) |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  awk -F, 'NR > 1 && $2 == "four" { k = $1 SUBSEP $3; cell[k, $4] = sprintf("%.2f / %.2f", $11, $12)
      if (!(k in q)) { q[k] = qm[k] = $11; f[k] = fm[k] = $12; order[++n] = k }
      if ($11 > q[k]) q[k] = $11; if ($11 < qm[k]) qm[k] = $11; if ($12 > f[k]) f[k] = $12; if ($12 < fm[k]) fm[k] = $12
      b[k] += $14; o[k] = $7 ", " $8 }
    END { for (i = 1; i <= n; i++) { k = order[i]; split(k, p, SUBSEP)
      printf "| %s | %s | %s | %s | %s | %s | %s | %.2f | %.2f | %.1f |\n", p[1], p[2], o[k], cell[k, 1], cell[k, 2], cell[k, 3], cell[k, 4],
        q[k] - qm[k], f[k] - fm[k], b[k] / 1048576 } }' "$csv"
  echo
  echo "| link | 4 at once, median first response ÷ alone | 4 at once, last VM ÷ alone | alone (service) ÷ \`launch\` | spread of first response, median (range) | spread of QEMU running |"
  echo "|---|---:|---:|---:|---:|---:|"
  for link in "${links[@]}"; do
    alone=$(vals "$link" alone 12 | med)
    echo "| $link | $(ratio "$(vals "$link" four 12 | med)" "$alone") | $(ratio "$(per_run "$link" 12 max | med)" "$alone") | $(ratio "$alone" "$(vals "$link" launch 12 | med)") | $(per_run "$link" 12 spread | medrange) | $(per_run "$link" 11 spread | medrange) |"
  done
  echo
  echo "Each VM's mount when read after the first response (the worker's last sample, at most a second old)."
  echo
  echo "| link | path | fetched per VM (MiB) | stall per VM (s): wall time a read waited | QEMU running to first response (s) |"
  echo "|---|---|---:|---:|---:|"
  for link in "${links[@]}"; do
    for sc in alone four; do
      echo "| $link | $sc | $(vals "$link" "$sc" 14 | awk '{ print $1 / 1048576 }' | medrange) | $(vals "$link" "$sc" 15 | medrange) | $(awk -F, -v l="$link" -v s="$sc" 'NR > 1 && $1 == l && $2 == s { print $12 - $11 }' "$csv" | sort -g | medrange) |"
    done
  done
  echo
  echo "The link's share, from \`cloudletfs replay\` of each \`launch\`'s trace: the compressed bytes the VM read before its first"
  echo "response ÷ the rate + one RTT (one VM), and four times those bytes through the one shared link (four VMs)."
  echo
  echo "| link | run | needed before the first response | physical limit, one VM (s) | four VMs' bytes on the link (s) | replay's predicted first response (s) |"
  echo "|---|---:|---:|---:|---:|---:|"
  awk -F, 'NR > 1 { rtt = $1; sub(/^[^\/]*\//, "", rtt); sub(/ms$/, "", rtt); rtt /= 1000
    printf "| %s | %s | %s | %.2f | %.2f | %.2f |\n", $1, $2, $3, $4, 4 * ($4 - rtt) + rtt, $5 }' "$work/replay.csv"
} | tee "$work/results.md"
