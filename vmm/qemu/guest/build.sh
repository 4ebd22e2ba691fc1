#!/usr/bin/env bash
# Build the guest of `hugepunch qemu`: Debian's cloud kernel (6.1), an
# initramfs of busybox-static, the virtio balloon driver and the modules it
# needs, and hpguest (the guest program, static).
#
#   vmm/qemu/guest/build.sh [OUTDIR]
#
# OUTDIR defaults to ${HUGEPUNCH_CACHE:-$HOME/.cache/hugepunch}/guest and
# receives vmlinuz, initramfs.cpio.gz, cmdline and MANIFEST. A second run
# with the same inputs returns at once. As root it installs the Debian
# packages it needs; the kernel package is downloaded and unpacked, never
# installed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-${HUGEPUNCH_CACHE:-$HOME/.cache/hugepunch}/guest}
cmdline="console=ttyS0 quiet loglevel=1 transparent_hugepage=never panic=-1 rdinit=/init"

say() { printf 'guest: %s\n' "$*"; }
die() { printf 'guest: error: %s\n' "$*" >&2; exit 1; }
# What this machine cannot get (not root, no package mirror): exit 2, which
# .ci/run reports as not run rather than failed.
unavailable() { printf 'guest: unavailable: %s\n' "$*" >&2; exit 2; }

packages=(busybox-static cpio kmod gcc libc6-dev)
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

# The concrete kernel package the cloud metapackage points to.
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$kpkg" ]; then
  apt-get update >/dev/null 2>&1 || true
  kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
fi
[ -n "$kpkg" ] || unavailable "apt-cache knows no linux-image-cloud-amd64"
kver=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')
bbver=$(dpkg-query -W -f='${Version}' busybox-static)
stamp=$( (cat "$here/build.sh" "$here/hpguest.c" "$here/init"; echo "$kpkg $kver $bbver $cmdline") | sha256sum | cut -c1-16)
if [ -f "$out/MANIFEST" ] && grep -q "^stamp $stamp$" "$out/MANIFEST" \
   && [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ]; then
  say "up to date ($out)"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
say "fetching $kpkg $kver (apt-get download; unpacked, not installed)"
(cd "$tmp" && apt-get download "$kpkg=$kver" >/dev/null 2>&1) || unavailable "apt-get download $kpkg failed"
dpkg-deb -x "$tmp"/"$kpkg"_*.deb "$tmp/k" || die "dpkg-deb -x of $kpkg failed"
release=$(ls "$tmp/k/lib/modules")
depmod -b "$tmp/k" "$release" || die "depmod failed"

say "resolving the modules of virtio_pci and virtio_balloon"
root=$tmp/root
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules}
: >"$root/lib/modules/order"
for target in virtio_pci virtio_balloon; do
  # modprobe lists a module's dependencies first, the module last.
  modprobe -d "$tmp/k" -S "$release" --show-depends "$target" \
    | awk '$1 == "insmod" {print $2}' | while read -r ko; do
      name=$(basename "$ko"); name=${name%.ko*}
      grep -qx "$name" "$root/lib/modules/order" && continue
      case "$ko" in
        *.ko.xz) xz -dc "$ko" >"$root/lib/modules/$name.ko" ;;
        *.ko.zst) zstd -qdc "$ko" >"$root/lib/modules/$name.ko" ;;
        *) cp "$ko" "$root/lib/modules/$name.ko" ;;
      esac
      echo "$name" >>"$root/lib/modules/order"
    done
done
[ -s "$root/lib/modules/order" ] || die "no module found for virtio_balloon"

say "building hpguest (gcc -static)"
gcc -static -O2 -Wall -Wextra -Werror -o "$root/hpguest" "$here/hpguest.c" || die "gcc of hpguest.c failed"
cp /bin/busybox "$root/bin/busybox"
install -m 755 "$here/init" "$root/init"

mkdir -p "$out"
cp "$tmp/k/boot/vmlinuz-$release" "$out/vmlinuz"
(cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc --owner 0:0 | gzip -9) >"$out/initramfs.cpio.gz"
echo "$cmdline" >"$out/cmdline"
{
  echo "stamp $stamp"
  echo "kernel $kpkg $kver ($release)"
  echo "busybox-static $bbver"
  echo "modules $(tr '\n' ' ' <"$root/lib/modules/order")"
} >"$out/MANIFEST"
say "built $out (kernel $release, modules: $(tr '\n' ' ' <"$root/lib/modules/order"))"
