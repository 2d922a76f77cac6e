#!/usr/bin/env bash
# Installs the Debian packages cloudletfs needs, skipping those already there.
# fuse3 and qemu-system-x86 serve the mount and the VM; qemu-utils gives
# qemu-img for size baselines; cpio and xz-utils build the test guest and
# baselines; mmdebstrap builds the FACE guest's Debian root; curl probes the
# guests' services; fio and jq measure the guest's disk I/O for make bench;
# chromium lets the tests look at the cloudlet's status page as a person does.
set -euo pipefail
pkgs=(fuse3 qemu-system-x86 qemu-utils cpio xz-utils mmdebstrap curl fio jq chromium)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: need root to install: ${missing[*]}" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
