# Shared by the guest builders (tools/guest/build.sh, tools/face/build.sh):
# which Debian kernel package to boot, and its modules for an initramfs.
# Source it; it defines functions only.

# kernel_package prints the package linux-image-amd64 depends on, updating
# apt's lists once if they do not know it yet.
kernel_package() {
  local k
  k=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  if [ -z "$k" ]; then
    apt-get update -qq
    k=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  fi
  [ -n "$k" ] || { echo "no Debian kernel package found for linux-image-amd64" >&2; return 1; }
  echo "$k"
}

# add_modules KDIR DEST MODULE...: copies each module from the unpacked
# kernel's KDIR into DEST, dependencies first, read from each module's own
# depends= field, and writes DEST/order, the order to insmod them in.
add_modules() {
  local kdir=$1 dest=$2 m
  shift 2
  declare -A seen=()
  local order=()
  add() {
    local name=$1 f dep
    [ -n "${seen[$name]:-}" ] && return
    seen[$name]=1
    f=$(find "$kdir" -name "$name.ko" -o -name "${name//_/-}.ko" | head -1)
    [ -n "$f" ] || { echo "module $name not found in $kdir" >&2; return 1; }
    for dep in $(grep -a -o 'depends=[a-z0-9_,-]*' "$f" | head -1 | cut -d= -f2 | tr ',' ' '); do
      add "$dep" || return 1
    done
    cp "$f" "$dest/"
    order+=("$(basename "$f")")
  }
  for m in "$@"; do add "$m" || return 1; done
  printf '%s\n' "${order[@]}" >"$dest/order"
}
