#!/bin/sh
# Build the ferry guest kit from Debian bookworm packages, without root:
#   OUTDIR/vmlinuz             Debian's kernel (bzImage) from linux-image-amd64
#   OUTDIR/initramfs.cpio.gz   busybox, fio + its libraries, storage/pvpanic
#                              modules, and tests/guest-kit/init as /init
#   OUTDIR/initramfs-base.cpio.gz  the same without fio and its libraries
#   OUTDIR/fio.cpio.gz         fio + libraries alone: `cat initramfs-base.cpio.gz
#                              fio.cpio.gz` is an initramfs equal to the full one
#                              (the kernel unpacks concatenated archives)
#   OUTDIR/kit.key             package versions + hash of the build inputs
#   OUTDIR/kit.info            kernel version, modules loaded, modules built in
#   OUTDIR/boot.raw            a BIOS-bootable disk (MBR, EXTLINUX, this kernel
#                              and the base initramfs), made by bootdisk.sh at
#                              the end, with its own key (boot.key, boot.stamp).
#                              It needs root (loop mount): without root it is
#                              skipped with a note. FERRY_BOOTDISK=0 skips it,
#                              FERRY_BOOTDISK=1 insists (fails without root).
#   OUTDIR/efiboot.raw         a UEFI-bootable disk (GPT, EFI system partition,
#                              systemd-boot, this kernel and the base
#                              initramfs), made by efidisk.sh after boot.raw,
#                              with its own key (efiboot.key, efiboot.stamp).
#                              No root needed. FERRY_EFIDISK=0 skips it.
# Usage: tests/guest-kit/build.sh [OUTDIR]   (default: target/guest-kit under
# the repository root; a relative OUTDIR is taken relative to the current
# directory). Needs: apt-get, dpkg-deb, python3, readelf. Downloads are cached
# in target/debs/. Exits at once if OUTDIR already holds a kit with the same key.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-$REPO/target/guest-kit}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
. "$HERE/debs.sh"

# Modules the guests need. Storage controllers ferry emulates (PIIX IDE, AHCI,
# LSI 53C1030 SPI / SAS1068, BusLogic, NVMe, virtio, xHCI + USB storage), the
# disk/CD drivers and file systems, and pvpanic (ACPI QEMU0001 at port 0x505).
# virtio_blk, isofs and vfat serve the ferry-script.sh-on-a-disk path.
MODULES="ata_piix ahci mptspi mptsas BusLogic nvme virtio_scsi virtio_pci
 xhci_pci usb-storage uas sr_mod sd_mod ext4 pvpanic pvpanic-mmio
 virtio_blk isofs vfat nls_cp437 nls_ascii"

# Every way out of this script once the kit is there: the boot disks follow.
kit_done() {
    case ${FERRY_BOOTDISK:-auto} in
        0) ;;
        1) "$HERE/bootdisk.sh" "$OUT" ;;
        *) if [ "$(id -u)" = 0 ]; then
               "$HERE/bootdisk.sh" "$OUT"
           else
               echo "note: boot disk $OUT/boot.raw not built: it needs root (loop mount for extlinux)"
           fi ;;
    esac
    if [ "${FERRY_EFIDISK:-1}" != 0 ]; then
        "$HERE/efidisk.sh" "$OUT" \
            || die "the UEFI boot disk $OUT/efiboot.raw could not be built (see above; FERRY_EFIDISK=0 skips it)"
    fi
    exit 0
}

for t in apt-get apt-cache dpkg-deb python3 readelf; do
    command -v "$t" >/dev/null 2>&1 || die "$t is needed to build the guest kit"
done
# One build per OUTDIR at a time; a second caller waits, then finds the kit
# up to date. (The work directory is per OUTDIR too.)
if command -v flock >/dev/null 2>&1; then
    exec 9>"$OUT/.build.lock"
    flock 9
fi

# Fast path: the key below needs apt queries (~5 s). If neither the build
# inputs nor apt's package lists changed since the last build, the key cannot
# have changed either.
STAMP=$( { cat "$HERE/build.sh" "$HERE/init" "$HERE/debs.sh" "$HERE/initramfs.py"
           ls -l --time-style=full-iso /var/lib/apt/lists/ 2>/dev/null; } | sha256sum)
if [ -f "$OUT/kit.stamp" ] && [ "$(cat "$OUT/kit.stamp")" = "$STAMP" ] && [ -f "$OUT/kit.key" ] \
   && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.cpio.gz" ]; then
    echo "guest kit up to date: $OUT"
    kit_done
fi
deb_check_lists

# linux-image-amd64 is a metapackage; the kernel is in the package it depends on.
KPKG=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)/\1/p' | head -n1)
[ -n "$KPKG" ] || die "cannot find the kernel package linux-image-amd64 depends on"
PKGS="$KPKG busybox-static $(deb_libclosure fio | tr '\n' ' ')"
# shellcheck disable=SC2086
deb_resolve $PKGS

KEY=$( {
    echo "guest-kit v1"
    printf '%s\n' "$DEB_FILES"
    cat "$HERE/build.sh" "$HERE/init" "$HERE/debs.sh" "$HERE/initramfs.py" | sha256sum
} )
if [ -f "$OUT/kit.key" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.cpio.gz" ] \
   && [ -f "$OUT/initramfs-base.cpio.gz" ] && [ -f "$OUT/fio.cpio.gz" ] \
   && [ "$(cat "$OUT/kit.key")" = "$KEY" ]; then
    printf '%s\n' "$STAMP" >"$OUT/kit.stamp"
    echo "guest kit up to date: $OUT"
    kit_done
fi

echo "building guest kit in $OUT"
deb_fetch

WORK="$OUT.work"
ROOT="$WORK/root"
rm -rf "$WORK" && mkdir -p "$ROOT"
for d in dev proc sys tmp mnt root usr/bin usr/sbin usr/lib/x86_64-linux-gnu usr/lib64 etc; do
    mkdir -p "$ROOT/$d"
done
# Merged /usr layout: one library directory, so the loader finds everything
# in its default search path without an ld.so.cache.
ln -s usr/lib "$ROOT/lib"
ln -s usr/lib64 "$ROOT/lib64"

# --- kernel
KDIR=$(deb_dir "$KPKG")
cp "$KDIR"/boot/vmlinuz-* "$OUT/vmlinuz.tmp"
python3 "$HERE/initramfs.py" kmods --kdir "$KDIR" --dest "$ROOT" \
    --report "$WORK/modules.report" $MODULES

# --- busybox with its applets as symlinks (no root: symlinks, not hardlinks)
BB=$(deb_dir busybox-static)/bin/busybox
mkdir -p "$ROOT/bin" "$ROOT/sbin"
cp "$BB" "$ROOT/bin/busybox"
"$BB" --list-full | while read -r app; do
    [ -e "$ROOT/$app" ] || [ -L "$ROOT/$app" ] || ln -s /bin/busybox "$ROOT/$app"
done

# --- fio and every shared library it needs, taken from the Debian packages
# (not from this host), loaded through Debian's own ld.so. They go into a
# separate tree first: the libraries (ceph, icu, ...) are ~80 MB unpacked and
# roughly double a guest's boot time, so the kit also offers the initramfs
# without them (initramfs-base.cpio.gz) plus fio as an add-on archive.
FROOT="$WORK/fio"
mkdir -p "$FROOT/usr/bin" "$FROOT/usr/lib/x86_64-linux-gnu" "$FROOT/usr/lib64"
LIBC=$(deb_dir libc6)
LDSO=$(find "$LIBC" -name 'ld-linux-x86-64.so.2' -type f | head -n1)
[ -n "$LDSO" ] || die "ld-linux-x86-64.so.2 not found in libc6"
# shellcheck disable=SC2086
LIBPATH=$(deb_libpath $(printf '%s\n' "$DEB_FILES" | sed 's/_.*//' | grep -v -e '^linux-image' -e '^busybox'))
FIO=$(deb_dir fio)/usr/bin/fio
cp "$FIO" "$FROOT/usr/bin/fio"
copy_libs "$FROOT/usr/lib/x86_64-linux-gnu" "$LDSO --library-path $LIBPATH --list" "$FIO"
cp "$LDSO" "$FROOT/usr/lib64/ld-linux-x86-64.so.2"
[ "$(elf_interp "$FIO")" = /lib64/ld-linux-x86-64.so.2 ] || die "fio has an unexpected interpreter: $(elf_interp "$FIO")"
# Check inside the finished tree: every library resolves to a file in it.
FLD="$FROOT/usr/lib64/ld-linux-x86-64.so.2 --library-path $FROOT/usr/lib/x86_64-linux-gnu"
CHK=$($FLD --list "$FROOT/usr/bin/fio")
if printf '%s\n' "$CHK" | grep -q 'not found'; then
    die "fio libraries missing in the kit: $CHK"
fi
FIOVER=$($FLD "$FROOT/usr/bin/fio" --version) || die "fio from the kit does not run"

# --- /init and packing
cp "$HERE/init" "$ROOT/init"
chmod 755 "$ROOT/init"
pack() { python3 "$HERE/initramfs.py" cpio --dev dev/console:c:5:1 "$@"; }
pack --root "$ROOT" --out "$OUT/initramfs-base.cpio.gz.tmp"
python3 "$HERE/initramfs.py" cpio --root "$FROOT" --out "$OUT/fio.cpio.gz.tmp"
cp -a "$FROOT/." "$ROOT/"
pack --root "$ROOT" --out "$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
for f in initramfs.cpio.gz initramfs-base.cpio.gz fio.cpio.gz; do
    mv "$OUT/$f.tmp" "$OUT/$f"
done
{
    cat "$WORK/modules.report"
    echo "fio=$FIOVER"
    echo "busybox=$(printf '%s\n' "$DEB_FILES" | grep '^busybox-static_')"
} >"$OUT/kit.info"
printf '%s\n' "$KEY" >"$OUT/kit.key"
printf '%s\n' "$STAMP" >"$OUT/kit.stamp"
rm -rf "$WORK"
echo "guest kit ready in $OUT: vmlinuz, initramfs.cpio.gz ($(du -h "$OUT/initramfs.cpio.gz" | cut -f1)), initramfs-base.cpio.gz ($(du -h "$OUT/initramfs-base.cpio.gz" | cut -f1)), fio.cpio.gz"
kit_done
