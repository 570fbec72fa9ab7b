# The guest side of the kit's boot disks (sourced, not run), shared by
# bootdisk.sh (BIOS: boot.raw) and efidisk.sh (UEFI: efiboot.raw), so that both
# disks boot the same kernel command line and run the same script. Each disk's
# key hashes this file.
#
# GUEST_SCRIPT: what the guest runs (ferry.script=, see init). It prints,
# between the kit's markers GUEST-SCRIPT-BEGIN and GUEST-SCRIPT-END:
#   BOOTDISK-OK
#   BOOTDISK-FIRMWARE uefi|bios     uefi when the kernel came up through EFI
#                                   (/sys/firmware/efi exists)
#   BOOTDISK-BLOCK <name> size=<sectors> driver=<disk driver> pci=<controller driver>
#                                   (one per disk in /sys/block)
#   BOOTDISK-FROM <name>            the disk whose first partition is labelled
#                                   FERRYBOOT
# and its rc is 0 when that disk was found. busybox has no blkid, so the label
# is read where each disk's file system keeps it: ext2 (boot.raw) at byte 1144
# (superblock at 1024 + 120), FAT32 (efiboot.raw) at 0x47 = 71, FAT16 at
# 0x2b = 43 (the boot sector's volume label, "FERRYBOOT  ").
# Short on purpose: it travels base64-encoded on the kernel command line
# (2048 bytes at most, all of it).
# shellcheck disable=SC2016
GUEST_SCRIPT='echo BOOTDISK-OK; f=
[ -d /sys/firmware/efi ] && echo BOOTDISK-FIRMWARE uefi || echo BOOTDISK-FIRMWARE bios
for b in /sys/block/*; do
n=${b##*/}
case $n in loop*|ram*) continue;; esac
d=$(readlink -f $b/device); p=$d; pci=
while [ -n "$p" ]; do
case ${p##*/} in ????:??:??.?) pci=$(basename "$(readlink $p/driver)"); break;; esac
p=${p%/*}
done
echo "BOOTDISK-BLOCK $n size=$(cat $b/size) driver=$(basename "$(readlink $d/driver)") pci=$pci"
for q in /dev/${n}1 /dev/${n}p1; do
[ -b $q ] && for o in 1144 71 43; do
[ "$(dd if=$q bs=1 skip=$o count=9 2>/dev/null)" = FERRYBOOT ] && f=$n && echo "BOOTDISK-FROM $n" && break
done
done
done
[ -n "$f" ]'

# BOOT_CMDLINE: the kernel command line of both disks. Serial console ttyS0
# (the firmware and the boot loaders print to COM1 too); panic=-1: a panic
# reboots at once, which a -no-reboot / ferry run ends on.
command -v base64 >/dev/null 2>&1 || die "base64 is needed to build the boot disks"
BOOT_CMDLINE="console=ttyS0 quiet panic=-1 ferry.script=$(printf '%s\n' "$GUEST_SCRIPT" | base64 -w0)"
[ "${#BOOT_CMDLINE}" -lt 2000 ] || die "the boot disks' kernel command line is ${#BOOT_CMDLINE} bytes, too close to the kernel's limit of 2048 (shorten GUEST_SCRIPT in bootscript.sh)"

# The build cache both disks share. The caller sets OUT, KERNEL, INITRD and DISK.
# disk_cache NAME WHAT SCRIPT PKG...: exits the calling script when OUT/NAME.raw's
# inputs did not change (NAME.stamp: a fast check without apt queries; NAME.key:
# package versions and input hashes); otherwise leaves DEB_FILES (deb_resolve),
# STAMP and KEY for disk_cache_done.
disk_cache() {
    dc_name=$1 dc_what=$2 dc_script=$3; shift 3
    STAMP=$( { cat "$dc_script" "$HERE/bootscript.sh" "$HERE/debs.sh"
               sha256sum "$KERNEL" "$INITRD"
               echo "$*"
               ls -l --time-style=full-iso /var/lib/apt/lists/ 2>/dev/null; } | sha256sum)
    if [ -f "$OUT/$dc_name.stamp" ] && [ "$(cat "$OUT/$dc_name.stamp")" = "$STAMP" ] \
       && [ -f "$OUT/$dc_name.key" ] && [ -f "$DISK" ]; then
        echo "$dc_what up to date: $DISK"
        exit 0
    fi
    deb_check_lists
    deb_resolve "$@"
    KEY=$( {
        echo "$dc_what v1"
        printf '%s\n' "$DEB_FILES"
        cat "$dc_script" "$HERE/bootscript.sh" "$HERE/debs.sh" | sha256sum
        sha256sum "$KERNEL" "$INITRD" | cut -d' ' -f1
    } )
    if [ -f "$OUT/$dc_name.key" ] && [ -f "$DISK" ] && [ "$(cat "$OUT/$dc_name.key")" = "$KEY" ]; then
        printf '%s\n' "$STAMP" >"$OUT/$dc_name.stamp"
        echo "$dc_what up to date: $DISK"
        exit 0
    fi
}

# disk_cache_done NAME: records that OUT/NAME.raw was built from these inputs.
disk_cache_done() {
    printf '%s\n' "$KEY" >"$OUT/$1.key"
    printf '%s\n' "$STAMP" >"$OUT/$1.stamp"
}
