#!/bin/sh
# Build a BIOS-bootable disk from the guest kit, for firmware-boot tests
# (SeaBIOS -> MBR -> EXTLINUX -> the kit's kernel):
#   OUTDIR/boot.raw    64 MiB sparse raw disk: an MBR (syslinux's mbr.bin in
#                      its first 440 bytes) with one active Linux partition
#                      from 1 MiB to the end, ext2 (label FERRYBOOT) holding
#                      EXTLINUX (ldlinux.sys, ldlinux.c32, extlinux.conf),
#                      /vmlinuz and /initramfs.cpio.gz (the kit's
#                      initramfs-base.cpio.gz: no fio, a quarter of the load)
#   OUTDIR/boot.key    package versions + hash of the inputs of boot.raw
# The guest's console is ttyS0 (115200); EXTLINUX boots at once and the
# kernel runs the script of bootscript.sh (ferry.script=, see init), which
# prints BOOTDISK-OK, BOOTDISK-FIRMWARE bios, a BOOTDISK-BLOCK line per disk
# and BOOTDISK-FROM <the disk whose first partition is FERRYBOOT> between the
# kit's markers GUEST-SCRIPT-BEGIN and GUEST-SCRIPT-END (rc=0 when that disk
# was found); then the guest powers off. The UEFI twin of this disk is
# efidisk.sh's efiboot.raw.
# Usage: tests/guest-kit/bootdisk.sh [OUTDIR]   (default: target/guest-kit; it
# must already hold the kit, see build.sh, which calls this script at its end).
# Needs root: EXTLINUX installs only into a mounted file system (loop mount).
# Also needs apt-get, dpkg-deb, mke2fs, losetup, mount, and sfdisk (taken from
# Debian's fdisk package when it is not on PATH). Packages extlinux and
# syslinux-common are fetched into target/debs/ like the kit's others.
# Exits at once if boot.raw is up to date (boot.stamp: a fast check without
# apt queries; boot.key: the real key).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-$REPO/target/guest-kit}
[ -d "$OUT" ] || { echo "error: $OUT does not exist; build the guest kit first (tests/guest-kit/build.sh)" >&2; exit 1; }
OUT=$(cd "$OUT" && pwd)
. "$HERE/debs.sh"

KERNEL="$OUT/vmlinuz"
INITRD="$OUT/initramfs-base.cpio.gz"
DISK="$OUT/boot.raw"
SIZE_MIB=64         # kernel ~8 MiB + base initramfs ~3 MiB; room for the full one (~35 MiB)
PART_START=2048     # sectors: the partition starts at 1 MiB

for f in "$KERNEL" "$INITRD"; do
    [ -s "$f" ] || die "$f is missing; build the guest kit first (tests/guest-kit/build.sh)"
done

# The guest's script and kernel command line: bootscript.sh, shared with the
# UEFI disk (efidisk.sh).
. "$HERE/bootscript.sh"

# One build per OUTDIR at a time. Not build.sh's lock file: build.sh holds
# that one (fd 9, inherited) while it runs this script.
if command -v flock >/dev/null 2>&1; then
    exec 8>"$OUT/.bootdisk.lock"
    flock 8
fi

SFDISK=$(command -v sfdisk 2>/dev/null || true)
PKGS="extlinux syslinux-common"
[ -n "$SFDISK" ] || PKGS="$PKGS fdisk"

# shellcheck disable=SC2086
disk_cache boot "boot disk" "$HERE/bootdisk.sh" $PKGS

[ "$(id -u)" = 0 ] || die "the boot disk ($DISK) needs root: EXTLINUX installs only into a mounted file system (loop mount); run as root: $0 $OUT"
for t in mke2fs losetup mount umount base64; do
    command -v "$t" >/dev/null 2>&1 || die "$t is needed to build the boot disk"
done

echo "building boot disk $DISK"
deb_fetch
EXTLINUX=$(deb_dir extlinux)/usr/bin/extlinux
MBR=$(deb_dir syslinux-common)/usr/lib/syslinux/mbr/mbr.bin
[ -n "$SFDISK" ] || SFDISK=$(deb_dir fdisk)/sbin/sfdisk
for f in "$EXTLINUX" "$MBR" "$SFDISK"; do
    [ -f "$f" ] || die "$f not found in the unpacked packages"
done
[ "$(wc -c <"$MBR")" -le 440 ] || die "$MBR is larger than the 440 bytes of MBR boot code"

TMP="$DISK.tmp"
MNT="$OUT/.bootdisk.mnt"
LOOP="" MOUNTED=""
cleanup() {
    if [ -n "$MOUNTED" ]; then
        umount "$MNT" 2>/dev/null || umount -l "$MNT" || true
    fi
    [ -z "$LOOP" ] || losetup -d "$LOOP" 2>/dev/null || true
    rmdir "$MNT" 2>/dev/null || true
    rm -f "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# --- partition table and MBR boot code
rm -f "$TMP"
truncate -s "${SIZE_MIB}M" "$TMP"
printf 'label: dos\nlabel-id: 0x46455252\nstart=%s, type=83, bootable\n' "$PART_START" \
    | "$SFDISK" --quiet "$TMP" >/dev/null || die "sfdisk could not write the partition table"
dd if="$MBR" of="$TMP" bs=440 count=1 conv=notrunc 2>/dev/null || die "cannot write $MBR into the MBR"

# --- file system. ext2: the oldest and best-trodden path of syslinux's reader
# (no journal, no extents, no 64bit or metadata_csum, which syslinux 6.04
# reads poorly or not at all); nothing writes to this disk at boot, so a
# journal buys nothing. The guest's ext4 driver mounts it. Fixed UUID and
# hash seed: the same inputs give nearly the same image.
PART_BYTES=$(( (SIZE_MIB * 1024 * 1024) - (PART_START * 512) ))
LOOP=$(losetup --find --show --offset $((PART_START * 512)) --sizelimit "$PART_BYTES" "$TMP") \
    || die "losetup failed (are loop devices available here?)"
mke2fs -q -F -t ext2 -b 4096 -L FERRYBOOT -m 0 \
    -U 46455252-5259-4b49-5442-4f4f54444953 \
    -E root_owner=0:0,hash_seed=46455252-5259-4b49-5442-4f4f54444953 "$LOOP" \
    || die "mke2fs failed on $LOOP"
mkdir -p "$MNT"
mount -t ext2 "$LOOP" "$MNT" || die "cannot mount $LOOP (ext2) on $MNT"
MOUNTED=1

# --- kernel, initramfs, EXTLINUX
cp "$KERNEL" "$MNT/vmlinuz"
cp "$INITRD" "$MNT/initramfs.cpio.gz"
# SERIAL must be the first directive. PROMPT 0 + TIMEOUT 1: boot the default
# at once (1/10 s), no menu module needed.
cat >"$MNT/extlinux.conf" <<EOF
SERIAL 0 115200
DEFAULT ferry
PROMPT 0
TIMEOUT 1
LABEL ferry
  KERNEL /vmlinuz
  INITRD /initramfs.cpio.gz
  APPEND $BOOT_CMDLINE
EOF
# --install writes ldlinux.sys and ldlinux.c32 into the directory and the
# partition's boot sector (the VBR), which takes its partition offset from
# the MBR's hand-off (DS:SI), so the loop offset does not matter.
log=$("$EXTLINUX" --install "$MNT" 2>&1) || die "extlinux --install failed: $log"
for f in ldlinux.sys ldlinux.c32; do
    [ -f "$MNT/$f" ] || die "extlinux --install did not write $f"
done
sync
umount "$MNT" || die "cannot unmount $MNT"
MOUNTED=""
losetup -d "$LOOP" || die "cannot detach $LOOP"
LOOP=""
rmdir "$MNT"

mv "$TMP" "$DISK"
disk_cache_done boot
echo "boot disk ready: $DISK (${SIZE_MIB} MiB, $(du -k "$DISK" | cut -f1) KiB allocated)"
