#!/bin/sh
# Guest scenarios for ferry: each boots the guest kit on a real /dev/kvm and checks what
# comes back on the serial console and in ferry's exit status. POSIX sh (busybox in the
# test host). Env: FERRY, KERNEL, INITRD (defaults: files next to this script), OUT (logs).
# Prints one line per scenario: `FERRY-TEST <name> PASS` or `FERRY-TEST <name> FAIL: why`,
# then `FERRY-TESTS-DONE total=N failed=M`; exits 1 if any failed.
# Usage: scenarios.sh [NAME...]   (no names: all scenarios)

here=$(cd "$(dirname "$0")" && pwd)
FERRY=${FERRY:-$here/ferry}
KERNEL=${KERNEL:-$here/vmlinuz}
INITRD=${INITRD:-$here/initramfs.cpio.gz}
OUT=${OUT:-/tmp/ferry-scenarios}
# quiet: console output costs a VM exit per byte; the markers are printed by /init anyway.
BASE_CMDLINE="console=ttyS0 quiet panic=-1"
mkdir -p "$OUT"
total=0 failed=0

pass() { total=$((total + 1)); echo "FERRY-TEST $1 PASS"; }
fail() {
    total=$((total + 1)); failed=$((failed + 1))
    echo "FERRY-TEST $1 FAIL: $2"
    [ -f "$OUT/$1.log" ] && { echo "--- last lines of $OUT/$1.log:"; tail -n 25 "$OUT/$1.log"; echo "---"; }
}

b64() { printf '%s' "$1" | base64 | tr -d '\n'; }

# How long one guest may run before the harness stops it (a hang fails one scenario, not
# the whole run). Normal boots here take 10-40 s.
LIMIT=${LIMIT:-300}

# Firmware boots find SeaBIOS here when the payload carries it (run.sh copies Debian's).
[ -f "$here/bios-256k.bin" ] && export FERRY_FIRMWARE_DIR="$here"

# launch NAME CMDLINE [ferry run args...]: starts ferry in the background; sets $pid.
# With FIRMWARE=bios or efi, the guest boots from its disks through SeaBIOS or OVMF instead
# of a kernel (CMDLINE is unused: the boot disk carries its own), with the firmware's log kept.
launch() {
    name=$1 cmdline=$2; shift 2
    if [ -n "${FIRMWARE:-}" ]; then
        "$FERRY" -v run --firmware "$FIRMWARE" --firmware-log "$OUT/$name.firmware.log" "$@" \
            >"$OUT/$name.log" 2>&1 &
    else
        "$FERRY" -v run --kernel "$KERNEL" --initrd "$INITRD" --cmdline "$cmdline" "$@" \
            >"$OUT/$name.log" 2>&1 &
    fi
    pid=$!
}

# gone PID: true once PID has exited (a zombie counts: it only waits to be reaped).
gone() {
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [ -z "$st" ] || [ "$st" = Z ]
}

# settle SECONDS: waits for $pid up to SECONDS, then stops it (TERM, then KILL); sets $rc,
# which is "timeout" when the harness had to stop it. Never blocks on a process that the
# host kernel cannot kill: the diagnostics go to the console and the run goes on.
settle() {
    waited=$1 i=0
    while [ "$i" -lt "$1" ] && ! gone "$pid"; do sleep 1; i=$((i + 1)); done
    if gone "$pid"; then wait "$pid"; rc=$?; return; fi
    rc=timeout
    echo "scenarios: ferry (pid $pid) still runs after $1 s: stopping it; its threads:"
    # Where each thread waits tells a deadlock in ferry (futex) from a vCPU stuck in the
    # host kernel (kvm) apart.
    for t in /proc/"$pid"/task/*; do
        echo "  $(cat "$t/comm" 2>/dev/null): state $(sed 's/.*) //' "$t/stat" 2>/dev/null | cut -d' ' -f1), waits in $(cat "$t/wchan" 2>/dev/null)"
    done
    kill -TERM "$pid" 2>/dev/null
    i=0
    while [ "$i" -lt 10 ] && ! gone "$pid"; do sleep 1; i=$((i + 1)); done
    kill -KILL "$pid" 2>/dev/null
    i=0
    while [ "$i" -lt 10 ] && ! gone "$pid"; do sleep 1; i=$((i + 1)); done
    if gone "$pid"; then wait "$pid"; else
        echo "scenarios: ferry (pid $pid) survives SIGKILL; its kernel stacks:"
        for t in /proc/"$pid"/task/*; do
            echo "  thread $(cat "$t/comm" 2>/dev/null): state $(sed 's/.*) //' "$t/stat" | cut -d' ' -f1)"
            sed 's/^/    /' "$t/stack" 2>/dev/null
        done
    fi
    echo "scenarios: kernel messages of the test host (last 40):"
    dmesg -s 1048576 2>/dev/null | tail -n 40 | sed 's/^/  /'
}

# why_rc WHAT: describes a non-zero $rc for a failure message.
why_rc() {
    if [ "$rc" = timeout ]; then echo "ferry did not finish within $waited s"; else echo "ferry exited $rc, $1"; fi
}

# host_trouble: how many lockup, stall and BUG reports the test host's kernel log holds.
host_trouble() {
    # busybox dmesg reads only the first 16 KiB of the log unless told a size.
    dmesg -s 1048576 2>/dev/null | grep -cE 'soft lockup|hard LOCKUP|BUG:|rcu_sched self-detected stall|rcu_preempt self-detected stall' || true
}

# boot NAME SCRIPT [ferry run args...]: runs the guest to its end (or the limit); sets $rc.
# A guest that never even reached GUEST-READY within the limit gets one more boot: nested
# guests in the test host sometimes freeze early in boot (see --stall in tests/testhost/
# run.sh), or die in a triple fault or a kernel panic with no cause of the scenario's own
# (one CI run saw "corrupted stack end detected inside scheduler" 190 s into a guest's
# boot); the retry is said on the console, and a second failure fails the scenario.
# sc_panic sets EXPECT_PANIC: its panic is the point.
boot() {
    name=$1 script=$2; shift 2
    trouble_before=$(host_trouble)
    launch "$name" "$BASE_CMDLINE ${EXTRA_CMDLINE:-}ferry.script=$(b64 "$script")" "$@"
    settle "$LIMIT"
    why=""
    if [ "$rc" = timeout ] && ! grep -q '^GUEST-READY' "$OUT/$name.log"; then
        why="the guest froze before GUEST-READY"
    elif [ "$rc" = timeout ] && [ "$(host_trouble)" -gt "$trouble_before" ]; then
        # The test host's own kernel locked up or hit a BUG while the guest ran (a CI run
        # saw one 1309 s into the test host's life): its vCPUs stalled, not ferry's device.
        why="the test host's kernel reported a lockup or BUG while the guest ran"
    elif [ "$rc" = timeout ]; then
        # The guest froze after GUEST-READY: seen in the test host on both image-format
        # scenarios, with the guest kernel silent for minutes (on AHCI a lost command brings
        # libata's timeout and port reset messages within 30 s, even under `quiet`), and the
        # same scenarios passing in the next boots. The threads' states above stay in the
        # log; a second freeze fails the scenario.
        why="the guest froze after GUEST-READY with its console silent"
    elif grep -q 'triple fault; the machine resets' "$OUT/$name.log"; then
        # Seen only in the test host (QEMU 7.2 TCG with emulated SVM), at random points of
        # boot and I/O; a second one in the same scenario fails it.
        why="the guest died in a triple fault"
    elif [ -z "${EXPECT_PANIC:-}" ] && grep -q 'Kernel panic - not syncing' "$OUT/$name.log"; then
        why="the guest kernel panicked: $(grep -m1 'Kernel panic - not syncing' "$OUT/$name.log" | tr -d '\r')"
    fi
    if [ -n "$why" ]; then
        echo "scenarios: $name: $why; booting it once more"
        cp "$OUT/$name.log" "$OUT/$name.frozen.log"
        launch "$name" "$BASE_CMDLINE ${EXTRA_CMDLINE:-}ferry.script=$(b64 "$script")" "$@"
        settle "$LIMIT"
    fi
}

# start NAME SCRIPT [args...]: runs the guest in the background; sets $pid.
start() {
    name=$1 script=$2; shift 2
    launch "$name" "$BASE_CMDLINE ferry.script=$(b64 "$script")" "$@"
}

# wait_for FILE PATTERN COUNT SECONDS: until PATTERN occurs COUNT times in FILE.
wait_for() {
    i=0
    while [ "$i" -lt "$4" ]; do
        [ "$(grep -c "$2" "$1" 2>/dev/null || true)" -ge "$3" ] 2>/dev/null && return 0
        sleep 1; i=$((i + 1))
    done
    return 1
}

# value KEY LOG: the value of a KEY=value line the guest printed.
value() { sed -n "s/^$1=//p" "$2" | tr -d '\r' | head -n 1; }

# The facts every boot reports.
FACTS='echo NPROC=$(nproc)
echo MEMKB=$(awk "/MemTotal/ {print \$2}" /proc/meminfo)
echo PCI=$(cat /sys/bus/pci/devices/0000:00:00.0/vendor):$(cat /sys/bus/pci/devices/0000:00:00.0/device)
echo SHOUT=$(echo hello from the guest | tr a-z A-Z)'

# check_boot NAME LOG CPUS MIN_KB MAX_KB: a clean boot, poweroff and the facts.
check_boot() {
    n=$1 log=$2
    [ "$rc" = 0 ] || { fail "$n" "$(why_rc "expected 0 after the guest's poweroff")"; return; }
    grep -q '^GUEST-READY' "$log" || { fail "$n" "no GUEST-READY line"; return; }
    grep -q '^GUEST-SCRIPT-END rc=0' "$log" || { fail "$n" "the guest script did not finish cleanly"; return; }
    [ "$(value NPROC "$log")" = "$3" ] || { fail "$n" "nproc is '$(value NPROC "$log")', expected $3"; return; }
    kb=$(value MEMKB "$log")
    { [ -n "$kb" ] && [ "$kb" -ge "$4" ] && [ "$kb" -le "$5" ]; } ||
        { fail "$n" "guest MemTotal ${kb:-?} kB is outside $4..$5"; return; }
    [ "$(value PCI "$log")" = "0x8086:0x1237" ] || { fail "$n" "host bridge reads '$(value PCI "$log")'"; return; }
    [ "$(value SHOUT "$log")" = "HELLO FROM THE GUEST" ] || { fail "$n" "command output wrong"; return; }
    pass "$n"
}

sc_smp1_256m() {
    boot smp1_256m "$FACTS" --memory 256M --cpus 1
    check_boot smp1_256m "$OUT/smp1_256m.log" 1 200000 262144
}

# Two vCPUs, and the console written to a file instead of stdout.
sc_smp2_serial_file() {
    rm -f "$OUT/smp2.serial"
    boot smp2_serial_file "$FACTS" --memory 512M --cpus 2 --serial "file:$OUT/smp2.serial"
    cat "$OUT/smp2.serial" >>"$OUT/smp2_serial_file.log"
    check_boot smp2_serial_file "$OUT/smp2.serial" 2 400000 524288
}

# RAM split around the PCI hole: 3 GiB below 4 GiB, the rest above.
sc_mem_3g5() {
    boot mem_3g5 "$FACTS" --memory 3584M --cpus 1
    check_boot mem_3g5 "$OUT/mem_3g5.log" 1 3400000 3670016
}

sc_mem_5g() {
    boot mem_5g "$FACTS" --memory 5G --cpus 2
    check_boot mem_5g "$OUT/mem_5g.log" 2 5000000 5242880
}

# reboot through the ACPI reset register (Linux's default) and through the i8042.
check_reset() {
    n=$1 log=$OUT/$1.log
    [ "$rc" = 0 ] || { fail "$n" "$(why_rc "expected 0 after the guest's reboot")"; return; }
    grep -q 'the guest reset' "$log" || { fail "$n" "ferry did not see a reset"; return; }
    grep -q '^GUEST-SCRIPT-END' "$log" && { fail "$n" "the guest finished its script instead of rebooting"; return; }
    pass "$n"
}
sc_reboot_acpi() {
    EXTRA_CMDLINE="reboot=acpi "; boot reboot_acpi 'reboot -f' --memory 256M; EXTRA_CMDLINE=
    check_reset reboot_acpi
}
sc_reboot_kbd() {
    EXTRA_CMDLINE="reboot=k "; boot reboot_kbd 'reboot -f' --memory 256M; EXTRA_CMDLINE=
    check_reset reboot_kbd
}

# stop_by_signal NAME SIGNAL CODE MARKER COUNT SCRIPT [args...]: once MARKER has appeared
# COUNT times on the console, send SIGNAL to ferry and expect exit code CODE.
stop_by_signal() {
    n=$1 sig=$2 code=$3 marker=$4 count=$5 script=$6; shift 6
    start "$n" "$script" "$@"
    if wait_for "$OUT/$n.log" "$marker" "$count" "$LIMIT"; then
        kill "-$sig" "$pid"; settle 30
        [ "$rc" = "$code" ] || { fail "$n" "$(why_rc "expected $code after SIG$sig")"; return; }
        pass "$n"
    else
        settle 0
        fail "$n" "'$marker' did not appear $count time(s) within $LIMIT s"
    fi
}

# --reboot boots the guest again; SIGTERM then stops ferry cleanly (128 + 15).
sc_reboot_restart_sigterm() {
    stop_by_signal reboot_restart_sigterm TERM 143 '^GUEST-READY' 2 'reboot -f' --memory 256M --reboot
}

# Ctrl-C stops a running guest: exit 130.
sc_sigint() {
    stop_by_signal sigint INT 130 '^SLEEPING' 1 'echo SLEEPING; sleep 600' --memory 256M
}

# A guest kernel panic (reported through pvpanic) ends ferry with exit code 3.
sc_panic() {
    EXPECT_PANIC=1; boot panic 'echo c > /proc/sysrq-trigger' --memory 256M; EXPECT_PANIC=
    [ "$rc" = 3 ] || { fail panic "$(why_rc "expected 3 after a guest panic")"; return; }
    grep -q 'panicked' "$OUT/panic.log" || { fail panic "no panic message"; return; }
    pass panic
}

# The full kit (with fio and its libraries) runs fio with verification on a tmpfs file.
sc_kit_fio() {
    n=kit_fio
    small=$INITRD; INITRD=${INITRD_FULL:-$here/initramfs-full.cpio.gz}
    boot $n 'fio --version
fio --name=t --filename=/tmp/f --size=8M --rw=randwrite --bs=4k --verify=crc32c --output-format=terse >/dev/null && echo FIO=ok' --memory 512M
    INITRD=$small
    [ "$rc" = 0 ] || { fail $n "$(why_rc "expected 0")"; return; }
    grep -q '^fio-' "$OUT/$n.log" || { fail $n "fio did not run"; return; }
    [ "$(value FIO "$OUT/$n.log")" = ok ] || { fail $n "fio verify failed"; return; }
    pass $n
}

# virtio-scsi: Linux's virtio_scsi driver finds the disks with their sizes and rotation flag,
# fio with verification passes on each, and what the guest wrote is in the image files.
sc_virtio_scsi() {
    n=${N:-virtio_scsi}
    small=$INITRD; INITRD=${INITRD_FULL:-$here/initramfs-full.cpio.gz}
    d=${DISKS:-$OUT}
    rm -f "$OUT"/vs-* "$d"/vs-*
    truncate -s 256M "$d/vs-0.raw" && truncate -s 128M "$d/vs-1.raw" || { fail $n "cannot make the disk files"; return; }
    boot $n 'i=0; while [ $i -lt 30 ] && [ ! -b /dev/sdb ]; do sleep 1; i=$((i + 1)); done
# Targets are the controller ports; Linux names the disks in the order its scan finds them.
for d in /sys/block/sd*; do
  t=$(basename "$(readlink -f $d/device)")
  echo "DISK $t $(cat $d/size) rot=$(cat $d/queue/rotational) $(cat $d/device/vendor | tr -d " ")"
  case $t in *:0:1:0) port1=/dev/$(basename $d) ;; esac
done
for dev in /dev/sda /dev/sdb; do
  fio --name=v --filename=$dev --size=64M --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 \
      --verify=crc32c --verify_fatal=1 --output-format=terse >/dev/null 2>/tmp/fio.err && echo "FIO $dev ok" || { echo "FIO $dev FAIL"; cat /tmp/fio.err; }
done
yes FERRY-PATTERN | head -c 1048576 | dd of=$port1 bs=65536 seek=16 oflag=direct 2>/dev/null && sync && echo PATTERN=written
i=0; while [ $i -lt 10 ] && [ ! -b /dev/sr0 ]; do sleep 1; i=$((i + 1)); done
echo "DVD $(cat /sys/block/sr0/size 2>/dev/null) $(sha256sum /dev/sr0 | cut -d" " -f1)"' \
        --memory 512M --cpus 1 --storagectl "name=s,type=virtio-scsi${CTL_OPTS:-}" \
        --attach "ctl=s,port=0,medium=$d/vs-0.raw" \
        --attach "ctl=s,port=1,medium=$d/vs-1.raw,nonrotational=on" \
        --attach "ctl=s,port=2,medium=$here/test.iso,type=dvd"
    INITRD=$small
    log=$OUT/$n.log
    [ "$rc" = 0 ] || { fail $n "$(why_rc "expected 0")"; return; }
    grep -q '^DISK [0-9]*:0:0:0 524288 rot=1 FERRY' "$log" || { fail $n "port 0 is not a 256 MiB rotational FERRY disk"; return; }
    grep -q '^DISK [0-9]*:0:1:0 262144 rot=0 FERRY' "$log" || { fail $n "port 1 is not a 128 MiB non-rotational FERRY disk"; return; }
    grep -q '^FIO /dev/sda ok' "$log" || { fail $n "fio verify failed on sda"; return; }
    grep -q '^FIO /dev/sdb ok' "$log" || { fail $n "fio verify failed on sdb"; return; }
    [ "$(value PATTERN "$log")" = written ] || { fail $n "the guest could not write its pattern"; return; }
    want="DVD 2048 $(sha256sum "$here/test.iso" | cut -d' ' -f1)"
    grep -q "^$want" "$log" || { fail $n "the DVD does not read back as test.iso ($want)"; return; }
    yes FERRY-PATTERN | head -c 1048576 >"$OUT/vs-pattern"
    dd if="$d/vs-1.raw" of="$OUT/vs-back" bs=65536 skip=16 count=16 2>/dev/null
    cmp -s "$OUT/vs-pattern" "$OUT/vs-back" || { fail $n "the image file does not hold what the guest wrote"; return; }
    if [ -n "${WANT_DIRECT:-}" ] && [ "$(grep -c 'I/O engine .*host cache off (O_DIRECT' "$log")" -lt 2 ]; then
        fail $n "ferry did not say it bypasses the host cache on both disks"; return
    fi
    # A RAM disk's room is memory: give it back.
    [ -z "${DISKS:-}" ] || rm -f "$d"/vs-*
    pass $n
}

# The storage scenarios boot one vCPU: two-vCPU guests in the test host have twice died in a
# triple fault with no oops before it (once at boot, once under fio), which QEMU TCG's
# emulated SVM is the first suspect for (see the stall note in tests/testhost/run.sh); SMP
# itself is covered by smp2_serial_file and mem_5g.
# Dynamic images of every format on one virtio-scsi controller (made empty by qemu-img on the
# build host): fio with verification on each, and a pattern the guest wrote that the host
# reads back from each image through `ferry medium clone --format raw`.
sc_virtio_scsi_formats() {
    n=virtio_scsi_formats
    small=$INITRD; INITRD=${INITRD_FULL:-$here/initramfs-full.cpio.gz}
    rm -f "$OUT"/vf-*
    for f in vdi vmdk vhd hds; do
        cp "$here/empty.$f" "$OUT/vf-disk.$f" || { fail $n "no empty.$f in the payload"; INITRD=$small; return; }
    done
    attach="--storagectl name=s,type=virtio-scsi"
    port=0
    for f in vdi vmdk vhd hds; do
        attach="$attach --attach ctl=s,port=$port,medium=$OUT/vf-disk.$f"
        port=$((port + 1))
    done
    # shellcheck disable=SC2086
    # Kernel messages up to info level from here on (SCSI timeouts and aborts among them):
    # this scenario has frozen in the test host with the console silent under `quiet`.
    boot $n 'echo 7 >/proc/sys/kernel/printk
i=0; while [ $i -lt 30 ] && [ ! -b /dev/sdd ]; do sleep 1; i=$((i + 1)); done
for d in /sys/block/sd*; do
  dev=/dev/$(basename $d); t=$(basename "$(readlink -f $d/device)" | cut -d: -f3)
  echo "FIO port$t on $dev"
  fio --name=v --filename=$dev --size=32M --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 \
      --verify=crc32c --verify_fatal=1 --output-format=terse >/dev/null 2>/tmp/fio.err && echo "FIO port$t ok" || { echo "FIO port$t FAIL"; cat /tmp/fio.err; }
  yes "FERRY-PORT-$t" | head -c 1048576 | dd of=$dev bs=65536 seek=1024 oflag=direct 2>/dev/null
done
sync; echo WRITTEN=yes' --memory 512M --cpus 1 $attach
    log=$OUT/$n.log
    [ "$rc" = 0 ] || { INITRD=$small; fail $n "$(why_rc "expected 0")"; return; }
    for t in 0 1 2 3; do
        grep -q "^FIO port$t ok" "$log" || { INITRD=$small; fail $n "fio verify failed on port $t"; return; }
    done
    INITRD=$small
    # What the guest wrote, read back on the host through `ferry medium clone --format raw`.
    t=0
    for f in vdi vmdk vhd hds; do
        rm -f "$OUT/vf-back.raw"
        "$FERRY" medium clone "$OUT/vf-disk.$f" "$OUT/vf-back.raw" --format raw >"$OUT/vf-clone.log" 2>&1 ||
            { fail $n "ferry medium clone of the $f image failed: $(tail -n 1 "$OUT/vf-clone.log")"; return; }
        want=$(yes "FERRY-PORT-$t" | head -c 1048576 | sha256sum | cut -d' ' -f1)
        got=$(dd if="$OUT/vf-back.raw" bs=65536 skip=1024 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)
        [ "$got" = "$want" ] || { fail $n "the $f image does not hold what the guest wrote on port $t"; return; }
        t=$((t + 1))
    done
    pass $n
}

# The whole raw-disk and DVD check again with the host cache off: O_DIRECT, with aligned bounce
# buffers where the guest's are not. The test host's /tmp (tmpfs) refuses O_DIRECT, so the disk
# files go where it works (disk-dir.sh: a RAM-disk file system there), and ferry must say
# that it bypasses the cache.
sc_virtio_scsi_nocache() {
    . "$here/disk-dir.sh"
    DISKS=$(disk_dir 512)
    WANT_DIRECT=""
    takes_direct "$DISKS" && WANT_DIRECT=1
    [ -n "$WANT_DIRECT" ] || echo "scenarios: no folder here takes O_DIRECT: virtio_scsi_nocache runs through the page cache"
    CTL_OPTS=",hostiocache=off" N=virtio_scsi_nocache
    sc_virtio_scsi
    CTL_OPTS="" N="" DISKS="" WANT_DIRECT=""
}

# discard=on: what the guest discards (blkdiscard: SCSI UNMAP) leaves the raw image's host
# space; the same image after plain writes keeps it.
sc_virtio_scsi_discard() {
    n=virtio_scsi_discard
    rm -f "$OUT/vd.raw"
    truncate -s 64M "$OUT/vd.raw" || { fail $n "cannot make the disk file"; return; }
    disk="--storagectl name=s,type=virtio-scsi --attach ctl=s,port=0,medium=$OUT/vd.raw,discard=on"
    # shellcheck disable=SC2086
    boot $n 'i=0; while [ $i -lt 30 ] && [ ! -b /dev/sda ]; do sleep 1; i=$((i + 1)); done
echo "MODE=$(cat /sys/block/sda/device/scsi_disk/*/provisioning_mode)"
yes FERRY-DISCARD | head -c 33554432 | dd of=/dev/sda bs=1M oflag=direct 2>/dev/null; sync; echo WROTE=1' --memory 256M $disk
    [ "$rc" = 0 ] || { fail $n "$(why_rc "expected 0")"; return; }
    [ "$(value MODE "$OUT/$n.log")" = unmap ] || { fail $n "Linux does not see a thin-provisioned disk (provisioning_mode $(value MODE "$OUT/$n.log"))"; return; }
    full=$(du -k "$OUT/vd.raw" | cut -f1)
    [ "$full" -ge 32768 ] || { fail $n "the guest's 32 MiB took only $full KiB on the host"; return; }
    # shellcheck disable=SC2086
    boot ${n}_2 'i=0; while [ $i -lt 30 ] && [ ! -b /dev/sda ]; do sleep 1; i=$((i + 1)); done
blkdiscard /dev/sda && echo DISCARDED=1' --memory 256M $disk
    [ "$rc" = 0 ] || { fail $n "$(why_rc "expected 0 from the discarding boot")"; return; }
    [ "$(value DISCARDED "$OUT/${n}_2.log")" = 1 ] || { fail $n "blkdiscard failed in the guest"; return; }
    left=$(du -k "$OUT/vd.raw" | cut -f1)
    [ "$left" -lt 4096 ] || { fail $n "after blkdiscard the image still takes $left KiB (was $full)"; return; }
    echo "FERRY-TEST-INFO $n: the image took $full KiB after the guest's writes, $left KiB after blkdiscard"
    pass $n
}

# Two disks in one 8 MiB/s bandwidth group: sequential reads on both at once add up to the
# group's limit, not twice it.
sc_virtio_scsi_bwgroup() {
    n=virtio_scsi_bwgroup
    small=$INITRD; INITRD=${INITRD_FULL:-$here/initramfs-full.cpio.gz}
    rm -f "$OUT"/vb-*
    truncate -s 256M "$OUT/vb-0.raw" && truncate -s 256M "$OUT/vb-1.raw" || { INITRD=$small; fail $n "cannot make the disk files"; return; }
    boot $n 'i=0; while [ $i -lt 30 ] && [ ! -b /dev/sdb ]; do sleep 1; i=$((i + 1)); done
fio --output-format=terse --group_reporting --rw=read --bs=1M --direct=1 --ioengine=libaio --iodepth=4 \
    --time_based --runtime=8 --name=a --filename=/dev/sda --name=b --filename=/dev/sdb |
  awk -F";" "{ print \"BW=\" \$7 }"' --memory 512M --bwgroup name=g,limit=8M \
        --storagectl name=s,type=virtio-scsi \
        --attach "ctl=s,port=0,medium=$OUT/vb-0.raw,bwgroup=g" \
        --attach "ctl=s,port=1,medium=$OUT/vb-1.raw,bwgroup=g"
    INITRD=$small
    [ "$rc" = 0 ] || { fail $n "$(why_rc "expected 0")"; return; }
    bw=$(value BW "$OUT/$n.log")
    # 8 MiB/s = 8192 KiB/s; fio's figure includes its ramp, so allow 15%.
    { [ -n "$bw" ] && [ "$bw" -ge 6963 ] && [ "$bw" -le 9420 ]; } ||
        { fail $n "two disks in an 8 MiB/s group read ${bw:-?} KiB/s together"; return; }
    echo "FERRY-TEST-INFO $n: two disks in an 8 MiB/s group read $bw KiB/s together"
    pass $n
}

# AHCI: Linux's ahci driver finds two disks and an ATAPI DVD on three ports, with their sizes,
# rotation flags and NCQ (queue depth 31 or 32); fio with verification passes on both disks,
# what the guest wrote is in the image file, and the DVD reads back as test.iso.
sc_ahci() {
    n=${N:-ahci}
    small=$INITRD; INITRD=${INITRD_FULL:-$here/initramfs-full.cpio.gz}
    rm -f "$OUT"/ah-*
    truncate -s 256M "$OUT/ah-0.raw" && truncate -s 128M "$OUT/ah-2.raw" || { INITRD=$small; fail $n "cannot make the disk files"; return; }
    boot $n 'i=0; while [ $i -lt 30 ] && [ ! -b /dev/sdb ]; do sleep 1; i=$((i + 1)); done
# ataN is port N-1 of the only SATA controller.
for d in /sys/block/sd*; do
  a=$(readlink -f $d/device | sed -n "s#.*/ata\([0-9]*\)/.*#\1#p")
  echo "DISK port$((a - 1)) $(cat $d/size) rot=$(cat $d/queue/rotational) qd=$(cat $d/device/queue_depth) $(tr -d " " <$d/device/model)"
  [ "$a" = 3 ] && port2=/dev/$(basename $d)
done
for dev in /dev/sda /dev/sdb; do
  fio --name=v --filename=$dev --size=32M --rw=randwrite --bs=4k --iodepth=32 --ioengine=libaio --direct=1 \
      --verify=crc32c --verify_fatal=1 --output-format=terse >/dev/null 2>/tmp/fio.err && echo "FIO $dev ok" || { echo "FIO $dev FAIL"; cat /tmp/fio.err; }
done
yes FERRY-PATTERN | head -c 1048576 | dd of=$port2 bs=65536 seek=16 oflag=direct 2>/dev/null && sync && echo PATTERN=written
i=0; while [ $i -lt 10 ] && [ ! -b /dev/sr0 ]; do sleep 1; i=$((i + 1)); done
echo "DVD $(cat /sys/block/sr0/size 2>/dev/null) $(sha256sum /dev/sr0 | cut -d" " -f1)"
echo "ATAPI $(readlink -f /sys/block/sr0/device | sed -n "s#.*/ata\([0-9]*\)/.*#\1#p")"' \
        --memory 512M --cpus 1 --storagectl "name=sata,type=ahci${CTL_OPTS:-}" \
        --attach "ctl=sata,port=0,medium=$OUT/ah-0.raw" \
        --attach "ctl=sata,port=1,medium=$here/test.iso,type=dvd" \
        --attach "ctl=sata,port=2,medium=$OUT/ah-2.raw,nonrotational=on"
    INITRD=$small
    log=$OUT/$n.log
    [ "$rc" = 0 ] || { fail $n "$(why_rc "expected 0")"; return; }
    grep -Eq '^DISK port0 524288 rot=1 qd=3[12] FERRYHARDDISK' "$log" || { fail $n "port 0 is not a 256 MiB rotational FERRY disk with NCQ"; return; }
    grep -Eq '^DISK port2 262144 rot=0 qd=3[12] FERRYHARDDISK' "$log" || { fail $n "port 2 is not a 128 MiB non-rotational FERRY disk with NCQ"; return; }
    grep -q '^FIO /dev/sda ok' "$log" || { fail $n "fio verify failed on sda"; return; }
    grep -q '^FIO /dev/sdb ok' "$log" || { fail $n "fio verify failed on sdb"; return; }
    [ "$(value PATTERN "$log")" = written ] || { fail $n "the guest could not write its pattern"; return; }
    [ "$(sed -n 's/^ATAPI //p' "$log" | tr -d '\r')" = 2 ] || { fail $n "the DVD is not the ATAPI device on port 1"; return; }
    want="DVD 2048 $(sha256sum "$here/test.iso" | cut -d' ' -f1)"
    grep -q "^$want" "$log" || { fail $n "the DVD does not read back as test.iso ($want)"; return; }
    yes FERRY-PATTERN | head -c 1048576 >"$OUT/ah-pattern"
    dd if="$OUT/ah-2.raw" of="$OUT/ah-back" bs=65536 skip=16 count=16 2>/dev/null
    cmp -s "$OUT/ah-pattern" "$OUT/ah-back" || { fail $n "the image file does not hold what the guest wrote"; return; }
    pass $n
}

# Dynamic images of every format on one AHCI controller: fio with verification on each, and
# a pattern the guest wrote that the host reads back through `ferry medium clone`.
sc_ahci_formats() {
    n=ahci_formats
    small=$INITRD; INITRD=${INITRD_FULL:-$here/initramfs-full.cpio.gz}
    rm -f "$OUT"/af-*
    attach="--storagectl name=sata,type=ahci,ports=4"
    port=0
    for f in vdi vmdk vhd hds; do
        cp "$here/empty.$f" "$OUT/af-disk.$f" || { fail $n "no empty.$f in the payload"; INITRD=$small; return; }
        attach="$attach --attach ctl=sata,port=$port,medium=$OUT/af-disk.$f"
        port=$((port + 1))
    done
    # shellcheck disable=SC2086
    # Kernel messages up to info level from here on, as in sc_virtio_scsi_formats.
    boot $n 'echo 7 >/proc/sys/kernel/printk
i=0; while [ $i -lt 30 ] && [ ! -b /dev/sdd ]; do sleep 1; i=$((i + 1)); done
for d in /sys/block/sd*; do
  dev=/dev/$(basename $d); a=$(readlink -f $d/device | sed -n "s#.*/ata\([0-9]*\)/.*#\1#p"); t=$((a - 1))
  t0=$(cut -d" " -f1 /proc/uptime)
  fio --name=v --filename=$dev --size=8M --rw=randwrite --bs=4k --iodepth=32 --ioengine=libaio --direct=1 \
      --verify=crc32c --verify_fatal=1 --output-format=terse >/dev/null 2>/tmp/fio.err && echo "FIO port$t ok" || { echo "FIO port$t FAIL"; cat /tmp/fio.err; }
  echo "TIME port$t $t0 $(cut -d" " -f1 /proc/uptime)"
  yes "FERRY-PORT-$t" | head -c 1048576 | dd of=$dev bs=65536 seek=1024 oflag=direct 2>/dev/null
done
sync; echo WRITTEN=yes' --memory 512M --cpus 1 $attach
    INITRD=$small
    log=$OUT/$n.log
    [ "$rc" = 0 ] || { fail $n "$(why_rc "expected 0")"; return; }
    for t in 0 1 2 3; do
        grep -q "^FIO port$t ok" "$log" || { fail $n "fio verify failed on port $t"; return; }
    done
    t=0
    for f in vdi vmdk vhd hds; do
        rm -f "$OUT/af-back.raw"
        "$FERRY" medium clone "$OUT/af-disk.$f" "$OUT/af-back.raw" --format raw >"$OUT/af-clone.log" 2>&1 ||
            { fail $n "ferry medium clone of the $f image failed: $(tail -n 1 "$OUT/af-clone.log")"; return; }
        want=$(yes "FERRY-PORT-$t" | head -c 1048576 | sha256sum | cut -d' ' -f1)
        got=$(dd if="$OUT/af-back.raw" bs=65536 skip=1024 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)
        [ "$got" = "$want" ] || { fail $n "the $f image does not hold what the guest wrote on port $t"; return; }
        t=$((t + 1))
    done
    pass $n
}

# discard=on on a SATA disk: Linux sends DATA SET MANAGEMENT (TRIM) for blkdiscard, and the
# raw image gives the space back to the host.
sc_ahci_trim() {
    n=ahci_trim
    rm -f "$OUT/at.raw"
    truncate -s 64M "$OUT/at.raw" || { fail $n "cannot make the disk file"; return; }
    disk="--storagectl name=sata,type=ahci,ports=1 --attach ctl=sata,port=0,medium=$OUT/at.raw,discard=on"
    # shellcheck disable=SC2086
    boot $n 'i=0; while [ $i -lt 30 ] && [ ! -b /dev/sda ]; do sleep 1; i=$((i + 1)); done
echo "DMAX=$(cat /sys/block/sda/queue/discard_max_bytes)"
yes FERRY-DISCARD | head -c 33554432 | dd of=/dev/sda bs=1M oflag=direct 2>/dev/null; sync; echo WROTE=1' --memory 256M $disk
    [ "$rc" = 0 ] || { fail $n "$(why_rc "expected 0")"; return; }
    dmax=$(value DMAX "$OUT/$n.log")
    { [ -n "$dmax" ] && [ "$dmax" -gt 0 ]; } || { fail $n "Linux does not see TRIM on the disk (discard_max_bytes ${dmax:-?})"; return; }
    full=$(du -k "$OUT/at.raw" | cut -f1)
    [ "$full" -ge 32768 ] || { fail $n "the guest's 32 MiB took only $full KiB on the host"; return; }
    # shellcheck disable=SC2086
    boot ${n}_2 'i=0; while [ $i -lt 30 ] && [ ! -b /dev/sda ]; do sleep 1; i=$((i + 1)); done
blkdiscard /dev/sda && echo DISCARDED=1' --memory 256M $disk
    [ "$rc" = 0 ] || { fail $n "$(why_rc "expected 0 from the discarding boot")"; return; }
    [ "$(value DISCARDED "$OUT/${n}_2.log")" = 1 ] || { fail $n "blkdiscard failed in the guest"; return; }
    left=$(du -k "$OUT/at.raw" | cut -f1)
    [ "$left" -lt 4096 ] || { fail $n "after blkdiscard the image still takes $left KiB (was $full)"; return; }
    echo "FERRY-TEST-INFO $n: the image took $full KiB after the guest's writes, $left KiB after TRIM"
    pass $n
}

# Hot-plug: the disk on port 0 goes away under a running guest and comes back (ferry's test
# hook FERRY_TEST_HOTPLUG, SIGUSR1 each time); Linux's ahci sees both, and fio with
# verification passes on the disk afterwards.
sc_ahci_hotplug() {
    n=ahci_hotplug
    small=$INITRD; INITRD=${INITRD_FULL:-$here/initramfs-full.cpio.gz}
    rm -f "$OUT/ahp.raw"
    truncate -s 64M "$OUT/ahp.raw" || { INITRD=$small; fail $n "cannot make the disk file"; return; }
    export FERRY_TEST_HOTPLUG=sata:0
    start $n 'i=0; while [ $i -lt 30 ] && [ ! -b /dev/sda ]; do sleep 1; i=$((i + 1)); done
echo HOTPLUG-READY
i=0; while [ $i -lt 120 ] && ls /sys/block | grep -q "^sd"; do sleep 1; i=$((i + 1)); done
ls /sys/block | grep -q "^sd" || echo UNPLUGGED=yes
i=0; while [ $i -lt 120 ] && ! ls /sys/block | grep -q "^sd"; do sleep 1; i=$((i + 1)); done
d=$(ls /sys/block | grep "^sd" | head -n 1)
[ -n "$d" ] && echo "REPLUGGED=$d"
fio --name=v --filename=/dev/$d --size=32M --rw=randwrite --bs=4k --iodepth=32 --ioengine=libaio --direct=1 \
    --verify=crc32c --verify_fatal=1 --output-format=terse >/dev/null 2>/tmp/fio.err && echo "FIO=ok" || { echo "FIO=fail"; cat /tmp/fio.err; }' \
        --memory 512M --cpus 1 --storagectl name=sata,type=ahci,ports=2 \
        --attach "ctl=sata,port=0,medium=$OUT/ahp.raw"
    unset FERRY_TEST_HOTPLUG
    INITRD=$small
    log=$OUT/$n.log
    if wait_for "$log" '^HOTPLUG-READY' 1 "$LIMIT"; then
        kill -USR1 "$pid"
        wait_for "$log" '^UNPLUGGED=yes' 1 150 && kill -USR1 "$pid"
    fi
    settle "$LIMIT"
    [ "$rc" = 0 ] || { fail $n "$(why_rc "expected 0")"; return; }
    [ "$(value UNPLUGGED "$log")" = yes ] || { fail $n "the guest never saw the disk go"; return; }
    [ -n "$(value REPLUGGED "$log")" ] || { fail $n "the guest never saw the disk come back"; return; }
    [ "$(value FIO "$log")" = ok ] || { fail $n "fio verify failed on the replugged disk"; return; }
    pass $n
}

# Firmware boot: SeaBIOS boots the guest kit's extlinux disk (tests/guest-kit/bootdisk.sh),
# whose script prints BOOTDISK-OK and BOOTDISK-FROM <the disk it booted from>.
# bios_boot_problem NAME: says what is wrong with a firmware boot, if anything: SeaBIOS's
# banner and the boot loader on the console, the guest up from the disk, its script done,
# and a clean poweroff. Returns 1 when something is.
bios_boot_problem() {
    log=$OUT/$1.log
    if [ "$rc" != 0 ]; then why_rc "expected 0 after the guest's poweroff"
    elif ! grep -q 'SeaBIOS (version' "$log"; then echo "no SeaBIOS banner on the console"
    elif ! grep -q 'SYSLINUX\|EXTLINUX' "$log"; then echo "no boot loader banner on the console"
    elif ! grep -q '^Booting from Hard Disk' "$OUT/$1.firmware.log"; then echo "the firmware log has no 'Booting from Hard Disk'"
    elif ! grep -q '^GUEST-READY' "$log"; then echo "the kernel from the disk never got to GUEST-READY"
    elif ! grep -q '^BOOTDISK-OK' "$log"; then echo "the boot disk's script did not run"
    elif ! grep -q '^GUEST-SCRIPT-END rc=0' "$log"; then echo "the guest did not find the disk it booted from"
    else return 0
    fi
    return 1
}

# From a virtio-scsi disk.
sc_bios_virtio_scsi() {
    n=bios_virtio_scsi
    cp "$here/boot.raw" "$OUT/bv.raw" || { fail $n "no boot.raw in the payload"; return; }
    FIRMWARE=bios boot $n "" --memory 256M --boot disk --boot-timeout 120 \
        --storagectl name=s,type=virtio-scsi --attach "ctl=s,port=0,medium=$OUT/bv.raw"
    why=$(bios_boot_problem $n) || { fail $n "$why"; return; }
    grep -q '^BOOTDISK-FROM sda' "$OUT/$n.log" && grep -q '^BOOTDISK-BLOCK sda .*pci=virtio-pci' "$OUT/$n.log" ||
        { fail $n "the guest's boot disk is not on virtio-scsi"; return; }
    pass $n
}

# From AHCI, with a DVD on the port before the disk: the boot order (disk first) decides.
sc_bios_ahci() {
    n=bios_ahci
    cp "$here/boot.raw" "$OUT/ba.raw" || { fail $n "no boot.raw in the payload"; return; }
    FIRMWARE=bios boot $n "" --memory 256M --boot disk,dvd --boot-timeout 120 \
        --storagectl name=sata,type=ahci,ports=4 \
        --attach "ctl=sata,port=0,medium=$here/test.iso,type=dvd" \
        --attach "ctl=sata,port=1,medium=$OUT/ba.raw"
    why=$(bios_boot_problem $n) || { fail $n "$why"; return; }
    grep -q '^BOOTDISK-FROM sda' "$OUT/$n.log" && grep -q '^BOOTDISK-BLOCK sda .*pci=ahci' "$OUT/$n.log" || { fail $n "the guest's boot disk is not on AHCI"; return; }
    pass $n
}

# The same disk converted by `ferry medium clone` to VDI, VMDK, VHD and a Parallels bundle
# boots too (on AHCI).
sc_bios_formats() {
    n=bios_formats
    rm -rf "$OUT"/bf-*
    for f in vdi:vdi vmdk:vmdk vhd:vhd parallels:hdd; do
        dst=$OUT/bf-disk.${f#*:}
        "$FERRY" medium clone --format "${f%%:*}" "$here/boot.raw" "$dst" >"$OUT/bf-clone.log" 2>&1 ||
            { fail $n "ferry medium clone --format ${f%%:*} failed: $(tail -n 1 "$OUT/bf-clone.log")"; return; }
        FIRMWARE=bios boot "bf-${f%%:*}" "" --memory 256M --boot disk --boot-timeout 120 \
            --storagectl name=sata,type=ahci,ports=1 --attach "ctl=sata,port=0,medium=$dst"
        why=$(bios_boot_problem "bf-${f%%:*}") ||
            { fail $n "the ${f%%:*} clone: $why (log: bf-${f%%:*}.log)"; tail -n 25 "$OUT/bf-${f%%:*}.log"; return; }
        echo "FERRY-TEST-INFO $n: the ${f%%:*} clone boots"
    done
    pass $n
}

# An empty disk: SeaBIOS's own "No bootable device" on the console, and ferry ends the run
# with exit code 5 instead of letting the firmware retry for ever.
sc_bios_no_boot() {
    n=bios_no_boot
    rm -f "$OUT/bn.raw"; truncate -s 64M "$OUT/bn.raw"
    FIRMWARE=bios boot $n "" --memory 256M --boot disk --boot-timeout 120 \
        --storagectl name=sata,type=ahci,ports=1 --attach "ctl=sata,port=0,medium=$OUT/bn.raw"
    [ "$rc" = 5 ] || { fail $n "$(why_rc "expected 5 when nothing boots")"; return; }
    grep -q 'No bootable device' "$OUT/$n.log" || { fail $n "the firmware's message is not on the console"; return; }
    grep -q 'found no bootable device' "$OUT/$n.log" || { fail $n "ferry did not say why it stopped"; return; }
    pass $n
}

# UEFI: OVMF boots the kit's GPT disk (systemd-boot on an EFI system partition), with the VM's
# own copy of the variable store, which OVMF fills on its first boot.
# efi_boot_problem NAME: like bios_boot_problem, for OVMF.
efi_boot_problem() {
    log=$OUT/$1.log
    if [ "$rc" != 0 ]; then why_rc "expected 0 after the guest's poweroff"
    elif ! grep -q 'BdsDxe: starting Boot' "$log"; then echo "OVMF's boot manager started nothing"
    elif ! grep -q '^GUEST-READY' "$log"; then echo "the kernel from the disk never got to GUEST-READY"
    elif ! grep -q '^BOOTDISK-FIRMWARE uefi' "$log"; then echo "the guest does not see UEFI firmware"
    elif ! grep -q '^BOOTDISK-FROM sda' "$log"; then echo "the guest did not find the disk it booted from"
    elif ! grep -q '^GUEST-SCRIPT-END rc=0' "$log"; then echo "the guest script failed"
    else return 0
    fi
    return 1
}

# efi_on NAME CONTROLLER-TYPE: boots the UEFI disk on that controller.
efi_on() {
    n=$1
    cp "$here/efiboot.raw" "$OUT/$n.raw" || { fail $n "no efiboot.raw in the payload"; return; }
    rm -f "$OUT/$n.efivars"
    FIRMWARE=efi boot $n "" --memory 512M --boot disk --boot-timeout 240 --efi-vars "$OUT/$n.efivars" \
        --storagectl "name=c,type=$2" --attach "ctl=c,port=0,medium=$OUT/$n.raw"
    why=$(efi_boot_problem $n) || { fail $n "$why"; return; }
    [ "$(wc -c <"$OUT/$n.efivars")" = "$(wc -c <"$here/OVMF_VARS_4M.fd")" ] ||
        { fail $n "the VM's variable store is not a copy of OVMF_VARS_4M.fd"; return; }
    # OVMF records its boot options on the first boot: they reach the VM's file (flash).
    ! cmp -s "$OUT/$n.efivars" "$here/OVMF_VARS_4M.fd" ||
        { fail $n "OVMF wrote no variables to the VM's store"; return; }
    pass $n
}

sc_efi_virtio_scsi() { efi_on efi_virtio_scsi virtio-scsi; }
sc_efi_ahci() { efi_on efi_ahci ahci; }

all="smp1_256m kit_fio smp2_serial_file mem_3g5 mem_5g reboot_acpi reboot_kbd reboot_restart_sigterm sigint panic virtio_scsi virtio_scsi_formats virtio_scsi_nocache virtio_scsi_discard virtio_scsi_bwgroup ahci ahci_formats ahci_trim ahci_hotplug bios_virtio_scsi bios_ahci bios_formats bios_no_boot efi_virtio_scsi efi_ahci"
if [ "${1:-}" = --list ]; then echo $all; exit 0; fi
for s in ${*:-$all}; do
    echo "FERRY-TEST-START $s"
    "sc_$s"
done
echo "FERRY-TESTS-DONE total=$total failed=$failed"
[ "$failed" = 0 ]
