#!/bin/sh
# Build a UEFI-bootable disk from the guest kit, for firmware-boot tests
# (OVMF -> \EFI\BOOT\BOOTX64.EFI = systemd-boot -> the kit's kernel through
# its EFI stub):
#   OUTDIR/efiboot.raw    64 MiB sparse raw disk: a GPT with one EFI system
#                         partition (type C12A7328-F81F-11D2-BA4B-00A0C93EC93B)
#                         from 1 MiB to 63 MiB, FAT32 (label FERRYBOOT)
#                         holding EFI/BOOT/BOOTX64.EFI (Debian's
#                         systemd-bootx64.efi), loader/loader.conf,
#                         loader/entries/ferry.conf, /vmlinuz and
#                         /initramfs.cpio.gz (the kit's initramfs-base.cpio.gz)
#   OUTDIR/efiboot.key    package versions + hash of the inputs of efiboot.raw
# The kernel command line and the guest's script are boot.raw's
# (bootscript.sh): the guest prints BOOTDISK-OK, BOOTDISK-FIRMWARE uefi, a
# BOOTDISK-BLOCK line per disk and BOOTDISK-FROM <the disk whose first
# partition is FERRYBOOT> between GUEST-SCRIPT-BEGIN and GUEST-SCRIPT-END
# (rc=0 when that disk was found), then powers off. systemd-boot waits for no
# key (timeout 0) and shows no menu.
# Usage: tests/guest-kit/efidisk.sh [OUTDIR]   (default: target/guest-kit; it
# must already hold the kit, see build.sh, which calls this script at its end).
# No root needed: everything is written into the image file (sfdisk for the
# GPT, mkfs.fat --offset for the file system, mtools' image@@offset for the
# files). Needs apt-get, dpkg-deb and base64; packages systemd-boot-efi,
# dosfstools and mtools (and fdisk, when sfdisk is not on PATH) are fetched
# into target/debs/ like the kit's others. mkfs.fat and mtools always come
# from those packages: --offset needs dosfstools 4.2, and the key then names
# the versions that wrote the image.
# Exits at once if efiboot.raw is up to date (efiboot.stamp: a fast check
# without apt queries; efiboot.key: the real key).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-$REPO/target/guest-kit}
[ -d "$OUT" ] || { echo "error: $OUT does not exist; build the guest kit first (tests/guest-kit/build.sh)" >&2; exit 1; }
OUT=$(cd "$OUT" && pwd)
. "$HERE/debs.sh"

KERNEL="$OUT/vmlinuz"
INITRD="$OUT/initramfs-base.cpio.gz"
DISK="$OUT/efiboot.raw"
SIZE_MIB=64         # as boot.raw: kernel ~8 MiB + base initramfs ~3 MiB, room for the full one
PART_START=2048     # sectors: the ESP starts at 1 MiB ...
PART_SECTORS=$(( (SIZE_MIB - 2) * 2048 ))   # ... and ends 1 MiB before the backup GPT
ESP_GUID=C12A7328-F81F-11D2-BA4B-00A0C93EC93B

for f in "$KERNEL" "$INITRD"; do
    [ -s "$f" ] || die "$f is missing; build the guest kit first (tests/guest-kit/build.sh)"
done

# The guest's script and kernel command line, shared with boot.raw.
. "$HERE/bootscript.sh"

# One build per OUTDIR at a time. Not build.sh's lock file: build.sh holds
# that one (fd 9, inherited) while it runs this script.
if command -v flock >/dev/null 2>&1; then
    exec 8>"$OUT/.efidisk.lock"
    flock 8
fi

SFDISK=$(command -v sfdisk 2>/dev/null || true)
PKGS="systemd-boot-efi dosfstools mtools"
[ -n "$SFDISK" ] || PKGS="$PKGS fdisk"

# shellcheck disable=SC2086
disk_cache efiboot "UEFI boot disk" "$HERE/efidisk.sh" $PKGS

echo "building UEFI boot disk $DISK"
deb_fetch
BOOTX64=$(deb_dir systemd-boot-efi)/usr/lib/systemd/boot/efi/systemd-bootx64.efi
MKFS=$(deb_dir dosfstools)/sbin/mkfs.fat
MT=$(deb_dir mtools)/usr/bin        # mmd, mcopy, mdir: links to mtools
[ -n "$SFDISK" ] || SFDISK=$(deb_dir fdisk)/sbin/sfdisk
for f in "$BOOTX64" "$MKFS" "$MT/mtools" "$SFDISK"; do
    [ -f "$f" ] || die "$f not found in the unpacked packages"
done

TMP="$DISK.tmp"
WORK="$OUT/.efidisk.work"
cleanup() { rm -rf "$TMP" "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# --- GPT: fixed GUIDs, so the same inputs give the same table.
rm -f "$TMP"
truncate -s "${SIZE_MIB}M" "$TMP"
printf 'label: gpt\nlabel-id: 46455252-5259-4b49-5442-4f4f54454649\nstart=%s, size=%s, type=%s, uuid=46455252-5259-4b49-5442-4f4f54455350, name="EFI system partition"\n' \
    "$PART_START" "$PART_SECTORS" "$ESP_GUID" \
    | "$SFDISK" --quiet "$TMP" >/dev/null || die "sfdisk could not write the GPT"

# --- FAT32 in the partition. 512-byte clusters: 62 MiB is too small for
# FAT32 otherwise (it needs 65525 clusters); the UEFI spec wants FAT32 on a
# hard disk's ESP, and OVMF reads FAT12/16/32 alike. Hidden sectors = the
# partition's start; --invariant: a fixed volume id (1234-ABCD) and no clock
# in the boot sector. (mkfs.fat warns that the file is larger than the file
# system: it is, by the partition's offset and the GPT after it.)
log=$("$MKFS" -F 32 -s 1 -n FERRYBOOT -h "$PART_START" --invariant \
    --offset "$PART_START" "$TMP" $((PART_SECTORS / 2)) 2>&1) \
    || die "mkfs.fat could not make the FAT32 file system: $log"
[ "$(dd if="$TMP" bs=1 skip=$((PART_START * 512 + 0x47)) count=11 2>/dev/null)" = "FERRYBOOT  " ] \
    || die "mkfs.fat did not write the label FERRYBOOT at 0x47 of the boot sector (the guest looks for it there)"

# --- files, through mtools (no mount). /etc/mtools.conf is not needed:
# image@@offset names the file system.
mkdir -p "$WORK"
cat >"$WORK/loader.conf" <<EOF
timeout 0
default ferry.conf
editor no
auto-entries no
auto-firmware no
EOF
cat >"$WORK/ferry.conf" <<EOF
title ferry guest kit
linux /vmlinuz
initrd /initramfs.cpio.gz
options $BOOT_CMDLINE
EOF
IMG="$TMP@@$((PART_START * 512))"
MTOOLS_SKIP_CHECK=1
export MTOOLS_SKIP_CHECK
"$MT/mmd" -i "$IMG" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries || die "mmd failed on $IMG"
for f in "$BOOTX64:/EFI/BOOT/BOOTX64.EFI" "$WORK/loader.conf:/loader/loader.conf" \
         "$WORK/ferry.conf:/loader/entries/ferry.conf" "$KERNEL:/vmlinuz" \
         "$INITRD:/initramfs.cpio.gz"; do
    "$MT/mcopy" -i "$IMG" "${f%:*}" "::${f##*:}" || die "mcopy ${f%:*} failed"
done
# Read the files back through mtools: each is there with its size.
for f in "$BOOTX64:/EFI/BOOT/BOOTX64.EFI" "$KERNEL:/vmlinuz" "$INITRD:/initramfs.cpio.gz"; do
    n=$("$MT/mtype" -i "$IMG" "::${f##*:}" | wc -c)
    [ "$n" = "$(wc -c <"${f%:*}")" ] || die "::${f##*:} on the ESP has $n bytes, not those of ${f%:*}"
done

mv "$TMP" "$DISK"
disk_cache_done efiboot
echo "UEFI boot disk ready: $DISK (${SIZE_MIB} MiB, $(du -k "$DISK" | cut -f1) KiB allocated)"
