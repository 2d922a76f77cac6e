#!/usr/bin/env bash
# Builds SeaweedFS's weed, the S3-compatible server the tests run against,
# from its pinned module version. It takes minutes, so the binary is cached:
# a second run with the same OUT returns at once unless the pinned version
# or the build flags changed. Runs that overlap (test packages build in
# parallel) wait on a lock and build once.
#
# usage: tools/s3/build.sh OUT
# OUT gets weed and version (the module, version and flags it was built with).
set -euo pipefail
out=${1:?usage: build.sh OUT}
mod=github.com/seaweedfs/seaweedfs
version=v0.0.0-20261109003541-7506e5f91cd6
# Stripped and without paths: a smaller binary, the same server.
flags=(-trimpath "-ldflags=-s -w")
want="$mod@$version ${flags[*]}"

mkdir -p "$out"
out=$(cd "$out" && pwd)
built() { [ -x "$out/weed" ] && [ "$(cat "$out/version" 2>/dev/null)" = "$want" ]; }
built && exit 0
exec 9>"$out/.lock"
flock 9
built && exit 0
rm -f "$out/version"

work=$(mktemp -d)
# The module cache is read-only; the copy is not.
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"
echo "s3: downloading $mod@$version" >&2
# `go install MOD@VERSION` refuses a module whose go.mod has replace
# directives, so it is built inside a copy of the module instead.
dir=$(go mod download -json "$mod@$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
if [ -z "$dir" ] || [ ! -d "$dir/weed" ]; then
  echo "s3: go mod download $mod@$version gave no module directory; is the Go module proxy reachable (GOPROXY=$(go env GOPROXY))?" >&2
  exit 1
fi
cp -r "$dir" src
chmod -R u+w src
cd src
echo "s3: building weed (several minutes on 2 cores)" >&2
start=$(date +%s)
go build "${flags[@]}" -o "$out/weed.tmp" ./weed
mv "$out/weed.tmp" "$out/weed"
echo "$want" >"$out/version"
echo "s3: built $out/weed in $(($(date +%s) - start)) s" >&2
