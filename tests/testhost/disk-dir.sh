# Sourced where KVM is (the test host, or this machine) by the controller bench, the exit
# census and the integration scenario virtio_scsi_nocache: `disk_dir MIB` prints a folder for
# disk files of MIB MiB in all where O_DIRECT works, so that the host cache can really be off.
# /tmp first. The test host's /tmp is tmpfs, which refuses O_DIRECT (Linux 6.1): there, as
# root and with the brd and ext4 modules (tests/testhost/build.sh puts them in), the file goes
# on an ext2 file system on a RAM disk, which takes O_DIRECT. Where neither works it prints
# /tmp, and the caller runs with the host cache on.

takes_direct() {
    dd if=/dev/zero of="$1/.direct-probe" bs=4096 count=1 oflag=direct 2>/dev/null
    local ok=$?
    rm -f "$1/.direct-probe"
    return $ok
}

disk_dir() {
    local mib=$1 mnt=/mnt/bench-disk ko
    if takes_direct /tmp; then echo /tmp; return; fi
    if ! grep -q " $mnt " /proc/mounts; then
        ko=$(find "/lib/modules/$(uname -r)" -name 'brd.ko*' 2>/dev/null | head -n1)
        if [ -n "$ko" ] && [ "$(id -u)" = 0 ]; then
            # One RAM disk with room for the file and the file system's own blocks (KiB).
            rmmod brd 2>/dev/null
            if insmod "$ko" rd_nr=1 rd_size=$(( (mib + mib / 8 + 64) * 1024 )) 2>/dev/null &&
                mke2fs -q /dev/ram0 >/dev/null 2>&1 && mkdir -p "$mnt" &&
                mount -t ext4 /dev/ram0 "$mnt" 2>/dev/null; then
                :
            else
                echo "disk-dir: no RAM-disk file system (brd, mke2fs, ext4)" >&2
            fi
        fi
    fi
    if grep -q " $mnt " /proc/mounts && takes_direct "$mnt"; then echo "$mnt"; else echo /tmp; fi
}
