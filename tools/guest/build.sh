#!/usr/bin/env bash
# Builds the small test guest from Debian packages: a Debian kernel, an
# initramfs of busybox-static with the few modules the guest needs, and an
# ext4 disk. The result is cached: a second run with the same OUT returns at
# once, unless this script, init or app.script changed since OUT was built.
#
# usage: tools/guest/build.sh OUT
# OUT gets vmlinuz, initrd.img, disk.img (64 MiB ext4) and app.script, the
# customization that `overlay capture --script` types into the console.
set -euo pipefail
out=${1:?usage: build.sh OUT}
here=$(cd "$(dirname "$0")" && pwd)
. "$here/kernel.sh"
mkdir -p "$out"
# A guest built by an older recipe (without the balloon driver, say) is
# built again.
recipe=$(cat "$here/build.sh" "$here/kernel.sh" "$here/init" "$here/app.script" | sha256sum | cut -d' ' -f1)
if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] && [ -f "$out/disk.img" ] &&
  [ "$(cat "$out/recipe" 2>/dev/null)" = "$recipe" ]; then
  exit 0
fi
rm -f "$out/recipe"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# apt-get download runs as the _apt user when it can; let it write here.
chmod 755 "$work"
kpkg=$(kernel_package)
echo "guest: downloading $kpkg and busybox-static" >&2
apt-get download -q "$kpkg" busybox-static >/dev/null 2>&1 || apt-get download "$kpkg" busybox-static
for d in *.deb; do dpkg-deb -x "$d" x; done
kdir=$(ls -d x/lib/modules/*)

root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,run,mnt,lib/modules}
cp x/bin/busybox "$root/bin/busybox"
# A capture trims the guest's file systems before it saves them.
for applet in fstrim wget; do
  x/bin/busybox --list | grep -qx "$applet" || { echo "guest: busybox-static lacks $applet" >&2; exit 1; }
done

# virtio_balloon reports the guest's free pages to QEMU, which punches
# them out of the memory file (free page reporting).
add_modules "$kdir" "$root/lib/modules" crc32c_generic virtio_pci virtio_blk ext4 e1000 virtio_balloon

cp "$here/init" "$root/init"
chmod 755 "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) >"$out/initrd.img.tmp"
cp "$(ls x/boot/vmlinuz-*)" "$out/vmlinuz.tmp"

# The disk: ext4 with a little content of its own.
mkdir -p "$work/disk/etc"
echo "cloudlet test guest" >"$work/disk/etc/motd"
rm -f "$out/disk.img.tmp"
mke2fs -q -t ext4 -L guest -d "$work/disk" "$out/disk.img.tmp" 64M >/dev/null
cp "$here/app.script" "$out/app.script"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initrd.img.tmp" "$out/initrd.img"
mv "$out/disk.img.tmp" "$out/disk.img"
echo "$recipe" >"$out/recipe"
echo "guest: built $out" >&2
