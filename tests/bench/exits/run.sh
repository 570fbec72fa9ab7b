#!/bin/bash
# Exit census: what one 4 KiB random read (or write) costs the guest in VM exits and interrupts, on
# ferry's controller and on QEMU's nearest model (as tests/bench/controller.sh pairs them),
# with the same guest, job and raw host file. Counts per I/O do not swing with a noisy host
# the way IOPS do, so this shows where a controller's path is leaner or heavier than QEMU's:
#   exits/IO      every VM exit (KVM's kvm_exit trace event) while fio runs
#   user/IO       exits that went out to the VMM process (kvm_userspace_exit: MMIO, port I/O)
#   irq/IO        the controller's interrupts the guest took (its /proc/interrupts lines)
#   busy          the share of the guest's CPU time not idle while fio ran (/proc/stat): near
#                 100%, the guest's own work per I/O decides its IOPS, not the host's speed
#   vcpu us/IO    host CPU time of the VMM's vCPU thread per I/O (guest time and exits)
#   io us/IO      host CPU time of the VMM's other threads per I/O (its device and I/O work,
#                 io_uring's workers among them), from /proc/PID/task; where the host has few
#                 CPUs (the test host has two), this work competes with the vCPU
# and the same ratios ferry/QEMU (lower is leaner). IOPS are printed too, but they are measured
# with KVM tracing on: compare them in tests/bench/{scsi,ahci}, not here.
# Usage: tests/bench/exits/run.sh [--controller virtio-scsi|ahci|all] [--runtime SECONDS]
#                                 [--rw randread|randwrite]
# Needs root where it runs (debugfs and tracefs); where this host has no hardware
# virtualization (tests/testhost/detect.sh) it runs inside the test host, as the root there.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
die() { echo "bench/exits: $*" >&2; exit 2; }
ctls="virtio-scsi ahci" runtime=10 rw=randread
while [ $# -gt 0 ]; do
    case $1 in
        --controller) ctls=${2:?}; [ "$ctls" = all ] && ctls="virtio-scsi ahci"; shift 2 ;;
        --runtime) runtime=${2:?}; shift 2 ;;
        --rw) rw=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case $runtime in ''|*[!0-9]*) die "--runtime takes a number of seconds" ;; esac
case $rw in randread|randwrite) ;; *) die "--rw takes randread or randwrite" ;; esac
for c in $ctls; do
    case $c in virtio-scsi|ahci) ;; *) die "--controller takes virtio-scsi, ahci or all" ;; esac
done

cd "$REPO"
cargo build --release --bin ferry
tests/guest-kit/build.sh
KIT="$REPO/target/guest-kit"
OUT="$REPO/target/bench"
payload="$OUT/exits-payload"
rm -rf "$payload"
mkdir -p "$payload"
cp target/release/ferry "$KIT/vmlinuz" "$payload/"
cp "$KIT/initramfs.cpio.gz" "$payload/initrd.cpio.gz"
cp "$REPO/tests/testhost/disk-dir.sh" "$REPO/tests/bench/pin.sh" "$payload/"
cat >"$payload/census.sh" <<EOF
# Runs where KVM is; written by tests/bench/exits/run.sh.
cd "\$(dirname "\$0")"
RUNTIME=$runtime CTLS="$ctls" RW=$rw
EOF
cat >>"$payload/census.sh" <<'EOF'
T=/sys/kernel/tracing
[ -d $T/events/kvm ] || mount -t tracefs none $T 2>/dev/null || true
if [ ! -d $T/events/kvm ]; then
    mount -t debugfs none /sys/kernel/debug 2>/dev/null || true
    T=/sys/kernel/debug/tracing
fi
[ -d $T/events/kvm ] || { echo "CENSUS error: no KVM trace events (tracefs, as root, with kvm loaded)"; exit 1; }
. ./disk-dir.sh
. ./pin.sh
img=$(disk_dir 256)/census-disk.raw
rm -f "$img"; dd if=/dev/zero of="$img" bs=1M count=256 2>/dev/null
# Host cache as in the controller bench: off where the file system takes O_DIRECT.
if takes_direct "$(dirname "$img")"; then
    ferry_cache=off qemu_cache="cache=none,aio=native"
else
    ferry_cache=on qemu_cache="cache=writeback,aio=threads"
fi
# The guest warms up, counts its controller's interrupts around the timed job, and marks the
# job's start and end on the console, where this side turns tracing on and off.
guest='i=0; while [ $i -lt 30 ] && [ ! -b /dev/sda ]; do sleep 1; i=$((i+1)); done
job="--filename=/dev/sda --rw=RW --bs=4k --iodepth=32 --ioengine=libaio --direct=1 --size=256M"
fio --name=warm $job --time_based --runtime=3 >/dev/null
# Busy and all jiffies of the guest CPU (idle and iowait are not busy).
cpu() { awk "/^cpu / { print \$2 + \$3 + \$4 + \$7 + \$8, \$2 + \$3 + \$4 + \$5 + \$6 + \$7 + \$8 }" /proc/stat; }
irqs() { grep -E "virtio[0-9]+-request|ahci" /proc/interrupts | awk "{ for (i = 2; i <= NF && \$i ~ /^[0-9]+\$/; i++) s += \$i } END { print s + 0 }"; }
a=$(irqs); c0=$(cpu)
echo CENSUS-START
fio --name=timed $job --time_based --runtime=RUNTIME --output-format=terse --terse-version=3 >/tmp/f
echo CENSUS-END
b=$(irqs); c1=$(cpu)
set -- $c0 $c1
busy=$(( 100 * ($3 - $1) / ($4 - $2 + 1) ))
# Terse v3: fields 6 and 8 are the read KiB and IOPS, 47 and 49 the written ones.
awk -F";" -v irq=$((b - a)) -v busy=$busy "{ kb = \$6 + \$47; printf \"CENSUS-GUEST %d %d %d %d\\n\", kb / 4, \$8 + \$49, irq, busy }" /tmp/f'
guest=$(printf '%s\n' "$guest" | sed "s/RUNTIME/$RUNTIME/; s/RW/$RW/")
cmdline="console=ttyS0 quiet panic=-1 ferry.script=$(printf '%s\n' "$guest" | base64 | tr -d '\n')"
limit=$((300 + 3 * RUNTIME))
# "tid name ticks" for each thread of process $1 (user + system time, in USER_HZ ticks).
task_ticks() {
    local t s
    for t in /proc/$1/task/*; do
        s=$(cat "$t/stat" 2>/dev/null) || continue
        # The name may hold spaces: the fields after it count from the state.
        set -- ${s##*) }
        echo "${t##*/} $(tr ' ' _ <"$t/comm") $((${12} + ${13}))"
    done
}
census() { # name ctl command...
    local name=$1 ctl=$2 pid; shift 2
    : >"$name.console"
    timeout -s KILL "$limit" "$@" >"$name.console" 2>"$name.err" &
    pid=$!
    # Pinned as in the controller bench (pin.sh).
    pin_vmm $pid 1
    until grep -q CENSUS-START "$name.console"; do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
    # The VMM is timeout's child (coreutils) or timeout itself (busybox execs the command).
    local vmm
    vmm=$(vmm_pid $pid)
    vmm=${vmm:-$pid}
    task_ticks "$vmm" >"$name.ticks0"
    echo 0 >$T/tracing_on; echo >$T/trace
    echo 32768 >$T/buffer_size_kb
    echo 1 >$T/events/kvm/kvm_exit/enable; echo 1 >$T/events/kvm/kvm_userspace_exit/enable
    echo 1 >$T/tracing_on
    until grep -q CENSUS-END "$name.console"; do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
    task_ticks "$vmm" >"$name.ticks1"
    echo 0 >$T/tracing_on
    echo 0 >$T/events/kvm/kvm_exit/enable; echo 0 >$T/events/kvm/kvm_userspace_exit/enable
    wait $pid || true
    # One VM runs at a time, so every kvm_exit in the trace is this one's.
    local line
    line=$(tr -d '\r' <"$name.console" | grep -m1 '^CENSUS-GUEST') || { echo "CENSUS $ctl $name failed"; tail -n 5 "$name.console" "$name.err"; return; }
    set -- $line
    local exits user lost
    exits=$(grep -c 'kvm_exit:' $T/trace || true)
    user=$(grep -c 'kvm_userspace_exit:' $T/trace || true)
    lost=$(grep -o 'LOST [0-9]* EVENTS' $T/trace | head -n1 || true)
    # Ticks each thread spent in the window, vCPU threads (ferry's vcpuN, QEMU's "CPU N/KVM")
    # apart from the rest; a thread that ended in the window is not counted.
    local ticks
    ticks=$(awk 'NR == FNR { t0[$1] = $3; next }
        { d = $3 - t0[$1]; if ($2 ~ /^(vcpu[0-9]|CPU_[0-9]+\/KVM)/) v += d; else o += d }
        END { printf "vcpu_ticks=%d io_ticks=%d", v, o }' "$name.ticks0" "$name.ticks1")
    echo "CENSUS $ctl $name ios=$2 iops=$3 irq=$4 busy=$5 exits=$exits user=$user $ticks ${lost:+(trace lost events: $lost)}"
    # The busiest threads, by name (several threads of one name add up).
    awk 'NR == FNR { t0[$1] = $3; next } { d[$2] += $3 - t0[$1] } END { for (n in d) print d[n], n }' \
        "$name.ticks0" "$name.ticks1" | sort -rn | head -n 5 | awk -v n="$ctl $name" '{ printf "CENSUS-THREAD %s %s %s\n", n, $2, $1 }'
    grep -o 'kvm_exit: vcpu [0-9]* reason [A-Za-z_]*' $T/trace | awk '{ print $5 }' | sort | uniq -c | sort -rn | head -n 6 |
        awk -v n="$ctl $name" '{ printf "CENSUS-REASON %s %s %s\n", n, $2, $1 }'
}
for ctl in $CTLS; do
    case $ctl in
        ahci) qc="-device ich9-ahci,id=s" qd="ide-hd,drive=d,bus=s.0" ;;
        *) qc="-device virtio-scsi-pci,id=s" qd="scsi-hd,drive=d,bus=s.0" ;;
    esac
    census ferry $ctl ./ferry run --kernel vmlinuz --initrd initrd.cpio.gz --memory 512M --cpus 1 --cmdline "$cmdline" \
        --storagectl "name=s,type=$ctl,hostiocache=$ferry_cache" --attach "ctl=s,port=0,medium=$img"
    census qemu $ctl qemu-system-x86_64 -name census,debug-threads=on -enable-kvm -cpu host -M q35 -m 512M -smp 1 -nographic -no-reboot -vga none -nic none \
        -kernel vmlinuz -initrd initrd.cpio.gz -append "$cmdline" $qc \
        -drive file="$img",if=none,id=d,format=raw,$qemu_cache -device "$qd"
done
EOF

if local_reason=$(tests/testhost/detect.sh); then
    echo "bench/exits: running here ($local_reason)"
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is needed (apt-get install qemu-system-x86 qemu-utils)"
    (cd "$payload" && bash census.sh) | tee "$OUT/exits.log"
else
    echo "bench/exits: inside the test host ($local_reason)"
    tests/testhost/run.sh --payload "$payload" --script census.sh --with-qemu --mem 4G --smp 2 \
        --stall 400 --timeout $((600 + 10 * runtime)) | tr -d '\r' | tee "$OUT/exits.log" | grep --line-buffered '^CENSUS' || true
fi
echo
awk '
    /^CENSUS-REASON / { r[$2, $3] = r[$2, $3] sprintf(" %s=%s", $4, $5); next }
    /^CENSUS-THREAD / { th[$2, $3] = th[$2, $3] sprintf(" %s=%s", $4, $5); next }
    /^CENSUS [a-z-]+ (ferry|qemu) ios=/ {
        for (i = 4; i <= NF; i++) { split($i, kv, "="); v[$2, $3, kv[1]] = kv[2] }
        if (!seen[$2]++) order[n++] = $2
    }
    function per(c, m, k) { return v[c, m, "ios"] > 0 ? v[c, m, k] / v[c, m, "ios"] : 0 }
    # USER_HZ is 100: a tick is 10000 us.
    function us(c, m, k) { return per(c, m, k) * 10000 }
    function ratio(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "-" }
    END {
        printf "%-12s %-6s %8s %10s %10s %10s %6s %12s %10s\n", "controller", "vmm", "IOPS", "exits/IO", "user/IO", "irq/IO", "busy", "vcpu us/IO", "io us/IO"
        for (i = 0; i < n; i++) {
            c = order[i]
            for (j = 0; j < 2; j++) {
                m = j ? "qemu" : "ferry"
                printf "%-12s %-6s %8d %10.2f %10.2f %10.2f %5d%% %12.0f %10.0f\n", c, m, v[c, m, "iops"], per(c, m, "exits"), per(c, m, "user"), per(c, m, "irq"), v[c, m, "busy"], us(c, m, "vcpu_ticks"), us(c, m, "io_ticks")
            }
            printf "%-12s %-6s %8s %10s %10s %10s %6s %12s %10s\n", c, "f/q", "", ratio(per(c, "ferry", "exits"), per(c, "qemu", "exits")), ratio(per(c, "ferry", "user"), per(c, "qemu", "user")), ratio(per(c, "ferry", "irq"), per(c, "qemu", "irq")), "", ratio(per(c, "ferry", "vcpu_ticks"), per(c, "qemu", "vcpu_ticks")), ratio(per(c, "ferry", "io_ticks"), per(c, "qemu", "io_ticks"))
        }
        print "exit reasons (counts while fio ran):"
        for (k in r) { split(k, p, SUBSEP); printf "  %s %s:%s\n", p[1], p[2], r[k] }
        print "busiest threads of each VMM (CPU ticks of 10 ms while fio ran):"
        for (k in th) { split(k, p, SUBSEP); printf "  %s %s:%s\n", p[1], p[2], th[k] }
    }' "$OUT/exits.log"
