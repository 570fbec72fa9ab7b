#!/bin/bash
# Exit census: what one 4 KiB random read costs the guest in VM exits and interrupts, on
# ferry's controller and on QEMU's nearest model (as tests/bench/controller.sh pairs them),
# with the same guest, job and raw host file. Counts per I/O do not swing with a noisy host
# the way IOPS do, so this shows where a controller's path is leaner or heavier than QEMU's:
#   exits/IO      every VM exit (KVM's kvm_exit trace event) while fio runs
#   user/IO       exits that went out to the VMM process (kvm_userspace_exit: MMIO, port I/O)
#   irq/IO        the controller's interrupts the guest took (its /proc/interrupts lines)
# and the same ratios ferry/QEMU (lower is leaner). IOPS are printed too, but they are measured
# with KVM tracing on: compare them in tests/bench/{scsi,ahci}, not here.
# Usage: tests/bench/exits/run.sh [--controller virtio-scsi|ahci|all] [--runtime SECONDS]
# Needs root where it runs (debugfs and tracefs); where this host has no hardware
# virtualization (tests/testhost/detect.sh) it runs inside the test host, as the root there.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
die() { echo "bench/exits: $*" >&2; exit 2; }
ctls="virtio-scsi ahci" runtime=10
while [ $# -gt 0 ]; do
    case $1 in
        --controller) ctls=${2:?}; [ "$ctls" = all ] && ctls="virtio-scsi ahci"; shift 2 ;;
        --runtime) runtime=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case $runtime in ''|*[!0-9]*) die "--runtime takes a number of seconds" ;; esac
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
cat >"$payload/census.sh" <<EOF
# Runs where KVM is; written by tests/bench/exits/run.sh.
cd "\$(dirname "\$0")"
RUNTIME=$runtime CTLS="$ctls"
EOF
cat >>"$payload/census.sh" <<'EOF'
T=/sys/kernel/tracing
[ -d $T/events/kvm ] || mount -t tracefs none $T 2>/dev/null || true
if [ ! -d $T/events/kvm ]; then
    mount -t debugfs none /sys/kernel/debug 2>/dev/null || true
    T=/sys/kernel/debug/tracing
fi
[ -d $T/events/kvm ] || { echo "CENSUS error: no KVM trace events (tracefs, as root, with kvm loaded)"; exit 1; }
img=/tmp/census-disk.raw
rm -f "$img"; dd if=/dev/zero of="$img" bs=1M count=256 2>/dev/null
# Host cache as in the controller bench: off where the file system takes O_DIRECT.
if dd if=/dev/zero of="$img" bs=4096 count=1 oflag=direct conv=notrunc 2>/dev/null; then
    ferry_cache=off qemu_cache="cache=none,aio=native"
else
    ferry_cache=on qemu_cache="cache=writeback,aio=threads"
fi
# The guest warms up, counts its controller's interrupts around the timed job, and marks the
# job's start and end on the console, where this side turns tracing on and off.
guest='i=0; while [ $i -lt 30 ] && [ ! -b /dev/sda ]; do sleep 1; i=$((i+1)); done
job="--filename=/dev/sda --rw=randread --bs=4k --iodepth=32 --ioengine=libaio --direct=1 --size=256M"
fio --name=warm $job --time_based --runtime=3 >/dev/null
irqs() { grep -E "virtio[0-9]+-request|ahci" /proc/interrupts | awk "{ for (i = 2; i <= NF && \$i ~ /^[0-9]+\$/; i++) s += \$i } END { print s + 0 }"; }
a=$(irqs)
echo CENSUS-START
fio --name=timed $job --time_based --runtime=RUNTIME --output-format=terse --terse-version=3 >/tmp/f
echo CENSUS-END
b=$(irqs)
awk -F";" -v irq=$((b - a)) "{ printf \"CENSUS-GUEST %d %d %d\\n\", \$6 / 4, \$8, irq }" /tmp/f'
guest=$(printf '%s\n' "$guest" | sed "s/RUNTIME/$RUNTIME/")
cmdline="console=ttyS0 quiet panic=-1 ferry.script=$(printf '%s\n' "$guest" | base64 | tr -d '\n')"
limit=$((300 + 3 * RUNTIME))
census() { # name ctl command...
    local name=$1 ctl=$2 pid; shift 2
    : >"$name.console"
    timeout -s KILL "$limit" "$@" >"$name.console" 2>"$name.err" &
    pid=$!
    until grep -q CENSUS-START "$name.console"; do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
    echo 0 >$T/tracing_on; echo >$T/trace
    echo 32768 >$T/buffer_size_kb
    echo 1 >$T/events/kvm/kvm_exit/enable; echo 1 >$T/events/kvm/kvm_userspace_exit/enable
    echo 1 >$T/tracing_on
    until grep -q CENSUS-END "$name.console"; do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
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
    echo "CENSUS $ctl $name ios=$2 iops=$3 irq=$4 exits=$exits user=$user ${lost:+(trace lost events: $lost)}"
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
    census qemu $ctl qemu-system-x86_64 -enable-kvm -cpu host -M q35 -m 512M -smp 1 -nographic -no-reboot -vga none -nic none \
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
    /^CENSUS [a-z-]+ (ferry|qemu) ios=/ {
        for (i = 4; i <= NF; i++) { split($i, kv, "="); v[$2, $3, kv[1]] = kv[2] }
        if (!seen[$2]++) order[n++] = $2
    }
    function per(c, m, k) { return v[c, m, "ios"] > 0 ? v[c, m, k] / v[c, m, "ios"] : 0 }
    function ratio(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "-" }
    END {
        printf "%-12s %-6s %8s %10s %10s %10s\n", "controller", "vmm", "IOPS", "exits/IO", "user/IO", "irq/IO"
        for (i = 0; i < n; i++) {
            c = order[i]
            for (j = 0; j < 2; j++) {
                m = j ? "qemu" : "ferry"
                printf "%-12s %-6s %8d %10.2f %10.2f %10.2f\n", c, m, v[c, m, "iops"], per(c, m, "exits"), per(c, m, "user"), per(c, m, "irq")
            }
            printf "%-12s %-6s %8s %10s %10s %10s\n", c, "f/q", "", ratio(per(c, "ferry", "exits"), per(c, "qemu", "exits")), ratio(per(c, "ferry", "user"), per(c, "qemu", "user")), ratio(per(c, "ferry", "irq"), per(c, "qemu", "irq"))
        }
        print "exit reasons (counts while fio ran):"
        for (k in r) { split(k, p, SUBSEP); printf "  %s %s:%s\n", p[1], p[2], r[k] }
    }' "$OUT/exits.log"
