#!/usr/bin/env bash
# Build QEMU with hugepunch: Debian 12's QEMU 7.2 source package, the patch
# in patches/, linked with libhugepunch_capi.a from this repository; a
# minimal build (x86_64-softmmu: the pc machine, virtio-pci and the
# balloon, TCG and KVM).
#
#   vmm/qemu/build.sh [PREFIX]
#
# PREFIX defaults to ${HUGEPUNCH_CACHE:-$HOME/.cache/hugepunch}/qemu; the
# binary is PREFIX/bin/qemu-system-x86_64. The source and the build tree
# stay in PREFIX/../qemu-src, so a second run only relinks what changed;
# a run with nothing changed returns at once. As root it installs the Debian
# packages it needs; Debian's own qemu-system-x86 is installed too, for its
# firmware (SeaBIOS, the option ROMs) and as "QEMU as it is" beside ours.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${HUGEPUNCH_CACHE:-$HOME/.cache/hugepunch}
prefix=${1:-$cache/qemu}
work=$(dirname "$prefix")/qemu-src

say() { printf 'qemu: %s\n' "$*"; }
die() { printf 'qemu: error: %s\n' "$*" >&2; exit 1; }
# What this machine cannot get (not root, no package mirror): exit 2, which
# .ci/run reports as not run rather than failed.
unavailable() { printf 'qemu: unavailable: %s\n' "$*" >&2; exit 2; }

# The Debian packages of the build (and Debian's QEMU: firmware, stock side).
packages=(dpkg-dev ninja-build meson pkg-config python3-venv libglib2.0-dev
          libpixman-1-dev zlib1g-dev libfdt-dev flex bison qemu-system-x86)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || unavailable "missing Debian packages (install them as root): ${missing[*]}"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    say "apt-get update (the package lists are stale)"
    apt-get update >/dev/null || unavailable "apt-get update failed"
    apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
      || unavailable "apt-get install ${missing[*]} failed"
  fi
fi

# The source: the version of Debian's own qemu-system-x86, so both sides of
# a comparison are the same QEMU.
version=$(dpkg-query -W -f='${source:Version}' qemu-system-x86)
[ -n "$version" ] || die "cannot tell the source version of qemu-system-x86"
src=$work/src
tree=$src/qemu-${version#*:}
tree=${tree%-*}
mkdir -p "$work"
if [ ! -f "$tree/.hugepunch-source" ] || [ "$(cat "$tree/.hugepunch-source")" != "$version" ]; then
  say "fetching the source of qemu $version (apt-get source, a private deb-src list)"
  rm -rf "$src" "$work/apt"
  mkdir -p "$src" "$work/apt/lists/partial"
  # deb-src entries for the suites the machine's own sources use; the
  # machine's apt configuration is not touched.
  {
    echo "deb-src http://deb.debian.org/debian bookworm main"
    echo "deb-src http://deb.debian.org/debian bookworm-updates main"
    echo "deb-src http://deb.debian.org/debian-security bookworm-security main"
  } >"$work/apt/sources.list"
  apt_opts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
            -o "Dir::State::Lists=$work/apt/lists" -o "APT::Sandbox::User=root")
  apt-get "${apt_opts[@]}" update >/dev/null || unavailable "apt-get update (deb-src) failed"
  (cd "$src" && apt-get "${apt_opts[@]}" source "qemu=$version" >/dev/null) \
    || unavailable "apt-get source qemu=$version failed"
  [ -d "$tree" ] || die "the source package did not unpack into $tree"
  echo "$version" >"$tree/.hugepunch-source"
fi

# The patch, applied once to the pristine tree (a new one means a new tree).
patch_sum=$(cat "$here"/patches/*.patch | sha256sum | cut -c1-16)
if [ ! -f "$tree/.hugepunch-patch" ] || [ "$(cat "$tree/.hugepunch-patch")" != "$patch_sum" ]; then
  if [ -f "$tree/.hugepunch-patch" ]; then
    say "the patch changed: unpacking the source again"
    rm -rf "$src"
    exec "$0" "$@"
  fi
  say "applying $(ls "$here"/patches | tr '\n' ' ')"
  for p in "$here"/patches/*.patch; do
    patch -d "$tree" -p1 --forward --quiet <"$p" || die "the patch $(basename "$p") does not apply to qemu $version"
  done
  echo "$patch_sum" >"$tree/.hugepunch-patch"
fi

# libhugepunch_capi.a and a pkg-config file for it.
say "building libhugepunch_capi (cargo build --release -p hugepunch-capi)"
(cd "$repo" && cargo build --release --quiet -p hugepunch-capi) || die "cargo build -p hugepunch-capi failed"
target_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
dep=$work/hugepunch
mkdir -p "$dep/lib/pkgconfig" "$dep/include"
cp "$target_dir/release/libhugepunch_capi.a" "$dep/lib/libhugepunch_capi.a.new"
cmp -s "$dep/lib/libhugepunch_capi.a.new" "$dep/lib/libhugepunch_capi.a" 2>/dev/null \
  && rm "$dep/lib/libhugepunch_capi.a.new" \
  || mv "$dep/lib/libhugepunch_capi.a.new" "$dep/lib/libhugepunch_capi.a"
cp "$repo/capi/include/hugepunch.h" "$dep/include/"
capi_version=$(cd "$repo" && cargo metadata --format-version 1 --no-deps \
  | python3 -c 'import json,sys; print([p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="hugepunch-capi"][0])')
cat >"$dep/lib/pkgconfig/hugepunch.pc" <<PC
prefix=$dep
Name: hugepunch
Description: deferred hole-punch coalescing for huge-page-backed guest memory
Version: $capi_version
Cflags: -I\${prefix}/include
Libs: \${prefix}/lib/libhugepunch_capi.a -lpthread -ldl -lm -lrt -lutil -lgcc_s
PC

# Configure once: x86_64 only, no optional library, only the devices of
# configs/devices/x86_64-softmmu/hugepunch.mak.
build=$tree/build
mak=$tree/configs/devices/x86_64-softmmu/hugepunch.mak
printf '%s\n' "# hugepunch's minimal x86_64 build: the pc machine, virtio-pci, the balloon" \
  CONFIG_I440FX=y CONFIG_VIRTIO_PCI=y CONFIG_VIRTIO_BALLOON=y >"$mak.new"
cmp -s "$mak.new" "$mak" 2>/dev/null && rm "$mak.new" || { mv "$mak.new" "$mak"; rm -rf "$build"; }
if [ ! -f "$build/build.ninja" ]; then
  say "configuring (x86_64-softmmu, minimal devices, --enable-hugepunch)"
  mkdir -p "$build"
  (cd "$build" && PKG_CONFIG_PATH=$dep/lib/pkgconfig ../configure \
      --prefix="$prefix" --target-list=x86_64-softmmu \
      --without-default-features --without-default-devices --with-devices-x86_64=hugepunch \
      --enable-tcg --enable-kvm --enable-fdt=system --enable-hugepunch \
      --disable-docs --disable-werror >"$work/configure.log" 2>&1) \
    || { rm -rf "$build"; die "configure failed (see $work/configure.log)"; }
fi

say "building qemu-system-x86_64 (ninja; $(nproc) jobs)"
start=$(date +%s)
ninja -C "$build" qemu-system-x86_64 >"$work/build.log" 2>&1 \
  || { tail -20 "$work/build.log" >&2; die "the build failed (see $work/build.log)"; }
mkdir -p "$prefix/bin"
install -m 755 "$build/qemu-system-x86_64" "$prefix/bin/qemu-system-x86_64.new"
mv "$prefix/bin/qemu-system-x86_64.new" "$prefix/bin/qemu-system-x86_64"
echo "$version $patch_sum" >"$prefix/VERSION"
"$prefix/bin/qemu-system-x86_64" -device virtio-balloon-pci,help 2>/dev/null | grep -q 'hugepunch=' \
  || die "the binary has no hugepunch property"
say "built $prefix/bin/qemu-system-x86_64 (qemu $version + hugepunch, $(( $(date +%s) - start )) s)"
