#!/usr/bin/env bash
# Builds the FACE application guest from Debian packages: a Debian bookworm
# root made with mmdebstrap (minbase, systemd, python3) on a 3 GiB ext4 disk,
# the Debian kernel with a busybox initramfs that mounts it and switch_roots
# into systemd, and, kept apart from the base, the .debs of python3-opencv and
# opencv-data that the customization installs. The result is cached: a second
# run with the same OUT returns at once.
#
# usage: tools/face/build.sh OUT
# OUT gets:
#   vmlinuz, initrd.img, disk.img   the base: boot it with
#                                   --append "$(cat OUT/append)", 1 GiB of RAM,
#                                   ready at the console line face-base-ready
#   append                          that kernel command line
#   srv/                            what the host serves to the guest during
#                                   the customization: debs/ (with an index),
#                                   setup.sh, face.py, face.service, face.png
#   app.script                      the line `overlay capture --script` types;
#                                   replace @PORT@ by the port srv/ is served
#                                   on (the guest reaches the host at 10.0.2.2)
#   face.png                        a photo with one face (NASA, public domain),
#                                   to POST to the service on port 8080
set -euo pipefail
out=${1:?usage: build.sh OUT}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../guest/kernel.sh"
mkdir -p "$out"
out=$(cd "$out" && pwd)
# A guest built by an older recipe (before a change to the service, its
# setup or the root's files, say) is built again.
recipe=$(cd "$here" && find build.sh ../guest/kernel.sh init app.script setup.sh face.py face.service rootfs -type f | LC_ALL=C sort |
  xargs sha256sum | sha256sum | cut -d' ' -f1)
if [ -f "$out/disk.img" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] && [ -d "$out/srv" ] && [ -f "$out/app.script" ] &&
  [ "$(cat "$out/recipe" 2>/dev/null)" = "$recipe" ]; then
  exit 0
fi
rm -f "$out/recipe"
command -v mmdebstrap >/dev/null || { echo "face: mmdebstrap is missing: run make deps (tools/install-deps.sh)" >&2; exit 1; }
# Built next to OUT, so the results can be renamed into place.
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
chmod 755 "$work"
start=$(date +%s)
say() { echo "face: $* ($(( $(date +%s) - start )) s)" >&2; }

# The kernel and busybox, as tools/guest/build.sh takes them.
kpkg=$(kernel_package)
mkdir dl
(cd dl && apt-get download -q "$kpkg" busybox-static python3-skimage >/dev/null 2>&1 ||
  apt-get download "$kpkg" busybox-static python3-skimage)
for d in dl/*.deb; do dpkg-deb -x "$d" x; done
kdir=$(ls -d x/lib/modules/*)
say "downloaded $kpkg, busybox-static and python3-skimage (for its astronaut photo)"

initrd=$work/initrd
mkdir -p "$initrd"/{bin,dev,proc,sys,newroot,lib/modules}
cp x/bin/busybox "$initrd/bin/busybox"
add_modules "$kdir" "$initrd/lib/modules" crc32c_generic virtio_pci virtio_blk ext4 e1000 virtio_net virtio_balloon
cp "$here/init" "$initrd/init"
chmod 755 "$initrd/init"
(cd "$initrd" && find . | cpio -o -H newc --quiet | gzip -9) >initrd.img
cp "$(ls x/boot/vmlinuz-*)" vmlinuz

# The root. Its dpkg config keeps docs, man pages and locales out, now and
# for what the customization installs later. The customize hook downloads,
# with the root's own apt lists, the .debs the application needs beyond the
# base (so their versions match it), and moves them out of the root; the
# archive first drops the base's own .debs, which mmdebstrap leaves there.
mkdir debs
say "mmdebstrap: Debian bookworm minbase + systemd + python3, and the application's .debs"
mmdebstrap --quiet --variant=minbase --include=systemd-sysv,udev,python3 \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --customize-hook="cp -r '$here/rootfs/.' \"\$1/\"" \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
  --customize-hook='chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer e2scrub_reap.service getty@tty1.service systemd-networkd-wait-online.service systemd-timesyncd.service' \
  --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
  --customize-hook='chroot "$1" apt-get install -qq --download-only --no-install-recommends -y python3-opencv opencv-data' \
  --customize-hook="mv \"\$1\"/var/cache/apt/archives/*.deb '$work/debs/'" \
  bookworm root
say "mmdebstrap done: root $(du -sh root | cut -f1), $(ls debs | wc -l) application .debs of $(du -sh debs | cut -f1)"

rm -f disk.img
mke2fs -q -t ext4 -L face -d root disk.img 3G
rm -rf root
say "mke2fs done"

# Debian compresses most .debs with xz, which the guest unpacked at about
# 2 MB/s under TCG. The same packages, rebuilt by dpkg-deb with zstd, cost
# the guest less CPU to unpack (README: where the FACE install's time goes).
say "recompressing the application's .debs with zstd"
repack() {
  local deb=$1 d
  d=$(mktemp -d "$deb.XXXXXX")
  dpkg-deb -R "$deb" "$d/x" && dpkg-deb -Zzstd -z9 -b "$d/x" "$d/new.deb" >/dev/null && mv "$d/new.deb" "$deb"
  local rc=$?
  rm -rf "$d"
  return $rc
}
export -f repack
ls debs/*.deb | xargs -P "$(nproc)" -I{} bash -c 'repack "$1" || { echo "face: cannot recompress $1" >&2; exit 255; }' _ {}
mkdir -p srv
mv debs srv/debs
(cd srv/debs && ls *.deb >index)
cp "$here/setup.sh" "$here/face.py" "$here/face.service" srv/
cp x/usr/lib/python3/dist-packages/skimage/data/astronaut.png face.png
cp face.png srv/face.png
cp "$here/app.script" app.script
echo "console=ttyS0 quiet net.ifnames=0" >append
for f in srv app.script append face.png vmlinuz initrd.img disk.img; do
  rm -rf "${out:?}/$f"
  mv "$f" "$out/$f"
done
echo "$recipe" >"$out/recipe"
say "built $out"
