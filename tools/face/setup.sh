#!/bin/sh
# Customizes the FACE guest during `overlay capture`: fetches the .debs of
# python3-opencv and opencv-data from the host (URL, served over user-mode
# networking), installs them, installs and starts the face service, warms it
# with one detection, and says face-app-ready on the console.
#
# usage (in the guest): sh setup.sh URL
set -eu
url=${1:?usage: setup.sh URL}
debs=/var/tmp/face-debs
log=/var/log/face-setup.log
t0=$(date +%s)
mkdir -p "$debs" /opt/face
python3 - "$url" "$debs" <<'PY'
import os, shutil, sys, urllib.parse, urllib.request
url, debs = sys.argv[1], sys.argv[2]
def get(name, dst):
    # Debian's file names carry %3a for the epoch's colon: quote them.
    u = url + "/" + urllib.parse.quote(name)
    try:
        with urllib.request.urlopen(u, timeout=60) as r, open(dst, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except OSError as e:
        sys.exit("face setup: GET %s: %s" % (u, e))
names = urllib.request.urlopen(url + "/debs/index", timeout=60).read().decode().split()
for n in names:
    get("debs/" + n, os.path.join(debs, n))
for n in ("face.py", "face.service", "face.png"):
    get(n, os.path.join("/opt/face", n))
print("face setup: fetched %d packages" % len(names))
PY
t1=$(date +%s)
# Bytecode is compiled on first import instead, for the modules the service
# uses: compiling all of numpy and friends dominates an install under TCG.
dpkg-divert --quiet --local --rename --add /usr/bin/py3compile
ln -s /bin/true /usr/bin/py3compile
dpkg -i --force-unsafe-io "$debs"/*.deb >"$log" 2>&1 || { tail -20 "$log"; exit 1; }
rm /usr/bin/py3compile
dpkg-divert --quiet --local --rename --remove /usr/bin/py3compile
rm -rf "$debs"
# The install left the page cache full of what it wrote. Free it: the
# service reads back what it needs, and pages freed stay out of the overlay
# where the VM reports free pages (virtio-balloon free page reporting).
sync
echo 3 >/proc/sys/vm/drop_caches
t2=$(date +%s)
mv /opt/face/face.service /etc/systemd/system/face.service
systemctl daemon-reload
systemctl enable --now face.service 2>/dev/null
# Warm the service: one detection, so the first request after a resume is
# like any later one.
python3 - <<'PY'
import json, time, urllib.request
deadline = time.monotonic() + 600
while True:
    try:
        urllib.request.urlopen("http://127.0.0.1:8080/", timeout=10).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise SystemExit("face setup: the service did not answer within 600 s")
        time.sleep(0.5)
img = open("/opt/face/face.png", "rb").read()
req = urllib.request.Request("http://127.0.0.1:8080/detect", data=img, headers={"Content-Type": "application/octet-stream"})
print("face setup: warm-up detection:", json.loads(urllib.request.urlopen(req, timeout=600).read()))
PY
sync
t3=$(date +%s)
echo "face setup: fetch $((t1 - t0)) s, dpkg $((t2 - t1)) s, service start and warm-up $((t3 - t2)) s"
echo "face-app-ready"
