#!/bin/bash
# Storage controller benchmark: fio inside the guest kit on one of ferry's controllers and on
# QEMU's nearest model (virtio-scsi: virtio-scsi-pci with scsi-hd; ahci: ich9-ahci with
# ide-hd), over the same raw host file with the host cache off, then host fio on that file as
# the limit. Jobs: 4 KiB random read and write at depth 32, 1 MiB sequential read and write
# at depth 8 (direct=1, libaio). Prints IOPS and MB/s per job and the ratios ferry/QEMU and
# ferry/host. tests/bench/scsi/run.sh and tests/bench/ahci/run.sh call this.
# Usage: tests/bench/controller.sh --controller virtio-scsi|ahci [--runtime SECONDS] [--size MIB]
#        [--cpus N]   (guest vCPUs for both VMMs, default 1: two-vCPU guests in the test host
#                      sometimes triple-fault early in boot, see tests/integration/scenarios.sh)
#        [--rounds N] (ferry, QEMU and host fio each run N times, taking turns; the medians
#                      are printed: one round's ratios swing by more than 20% on a noisy host)
# Each VMM's vCPU runs pinned to a CPU of its own and its other threads to CPU 0 (pin.sh), and
# the disk file sits where O_DIRECT works (tests/testhost/disk-dir.sh).
# Where this host has no hardware virtualization (tests/testhost/detect.sh), everything runs
# inside the test host (QEMU TCG with emulated SVM): only the ratios mean something there.
# Each round then has a test host of its own, and a round whose test host failed (its kernel
# sometimes locks up, under either VMM) runs once more in a fresh one.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ctl=virtio-scsi
die() { echo "bench/$ctl: $*" >&2; exit 2; }
runtime=10 size=256 cpus=1 rounds=1
while [ $# -gt 0 ]; do
    case $1 in
        --controller) ctl=${2:?}; shift 2 ;;
        --runtime) runtime=${2:?}; shift 2 ;;
        --size) size=${2:?}; shift 2 ;;
        --cpus) cpus=${2:?}; shift 2 ;;
        --rounds) rounds=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case "$runtime$size$cpus$rounds" in *[!0-9]*) die "--runtime, --size, --cpus and --rounds take numbers" ;; esac
[ "$rounds" -ge 1 ] || die "--rounds takes a number from 1 up"
case $ctl in
    virtio-scsi) qemu_ctl="-device virtio-scsi-pci,id=s" qemu_disk="scsi-hd,drive=d,bus=s.0" ;;
    ahci) qemu_ctl="-device ich9-ahci,id=s" qemu_disk="ide-hd,drive=d,bus=s.0" ;;
    *) die "--controller takes virtio-scsi or ahci" ;;
esac

cd "$REPO"
cargo build --release --bin ferry
tests/guest-kit/build.sh
KIT="$REPO/target/guest-kit"
fio_bin=$(ls "$REPO"/target/debs/x/fio_*/usr/bin/fio 2>/dev/null | head -n1)
[ -x "$fio_bin" ] || die "no host fio from the guest kit's packages (target/debs/x/fio_*)"
# Host fio goes into the test host with this machine's copies of its libraries (librbd,
# libgfapi, ...), which only Debian's fio package brings.
if ldd "$fio_bin" | grep -q 'not found'; then
    if [ "$(id -u)" = 0 ]; then
        echo "bench/$ctl: installing Debian's fio for host fio's libraries"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null
    fi
    ! ldd "$fio_bin" | grep -q 'not found' || die "host fio's libraries are missing: apt-get install fio"
fi
OUT="$REPO/target/bench"
payload="$OUT/$ctl-payload"
rm -rf "$payload"
mkdir -p "$payload"
cp target/release/ferry "$KIT/vmlinuz" "$fio_bin" "$payload/"
cp "$KIT/initramfs.cpio.gz" "$payload/initrd.cpio.gz"
cp "$REPO/tests/testhost/disk-dir.sh" "$HERE/pin.sh" "$payload/"

# The jobs, one definition for guest and host: name rw bs iodepth.
jobs="randread 4k 32
randwrite 4k 32
read 1M 8
write 1M 8"
printf '%s\n' "$jobs" >"$payload/jobs"
cat >"$payload/bench.sh" <<EOF
# Runs where KVM is (the test host or this machine); written by tests/bench/controller.sh.
cd "\$(dirname "\$0")"
RUNTIME=$runtime SIZE=$size CPUS=$cpus CTL=$ctl QEMU_CTL="$qemu_ctl" QEMU_DISK="$qemu_disk"
EOF
cat >>"$payload/bench.sh" <<'EOF'
. ./disk-dir.sh
. ./pin.sh
img=$(disk_dir "$SIZE")/bench-disk.raw
rm -f "$img"; dd if=/dev/zero of="$img" bs=1M count="$SIZE" 2>/dev/null
# The host cache is off for all three where the file system takes O_DIRECT (disk-dir.sh finds
# one); where none does, all three use the cache (said in the output).
if takes_direct "$(dirname "$img")"; then
    ferry_cache=off qemu_cache="cache=none,aio=native" direct=1
else
    ferry_cache=on qemu_cache="cache=writeback,aio=threads" direct=0
    echo "BENCH note: $(dirname "$img") does not take O_DIRECT: host cache on for ferry, QEMU and fio alike"
fi
# fio in the guest: one line per job, "RESULT vmm job iops kBps".
# Every guest first runs each job untimed for 2 s: a fresh guest's kernel is new code to the
# test host's TCG (KASLR moves it on every boot), and its first seconds of I/O ran at half
# the speed of the rest, which made a short job's IOPS swing by more than the VMMs differ.
guest_script() {
    printf 'i=0; while [ $i -lt 30 ] && [ ! -b /dev/sda ]; do sleep 1; i=$((i+1)); done\n'
    # Loops over the jobs, not a line per job: the script travels base64 on a 2 KiB kernel
    # command line.
    printf 'o="--filename=/dev/sda --ioengine=libaio --direct=1 --time_based --size=%sM"\n' "$SIZE"
    printf 'J="%s"\n' "$(tr ' ' : <jobs | tr '\n' ' ' | sed 's/ $//')"
    printf 'for j in $J; do set -- $(echo $j | tr : " "); fio --name=w $o --rw=$1 --bs=$2 --iodepth=$3 --runtime=2 >/dev/null; done\n'
    printf 'for j in $J; do set -- $(echo $j | tr : " "); fio --name=$1 $o --rw=$1 --bs=$2 --iodepth=$3 --runtime=%s --output-format=terse --terse-version=3 | awk -F";" -v j=$1 '"'"'{ if (j ~ /read/) print "RESULT " j " " $8 " " $7; else print "RESULT " j " " $49 " " $48 }'"'"'; done\n' "$RUNTIME"
}
b64=$(guest_script | base64 | tr -d '\n')
cmdline="console=ttyS0 quiet panic=-1 ferry.script=$b64"
# Each VMM's exit status goes to the end of its .err file (printed when a job has no result).
# A guest that froze (nested guests in the test host sometimes do, under either VMM) is
# killed after boot time plus twice its jobs' run time, and counts as stopped early.
limit=$((300 + 2 * RUNTIME * $(wc -l <jobs)))
# Each VMM runs pinned (pin.sh): its vCPU on a CPU of its own, the rest on CPU 0.
run_ferry() {
    timeout -s KILL "$limit" ./ferry run --kernel vmlinuz --initrd initrd.cpio.gz --memory 512M --cpus "$CPUS" --cmdline "$cmdline" \
        --storagectl "name=s,type=$CTL,hostiocache=$ferry_cache" --attach "ctl=s,port=0,medium=$img" \
        >ferry.out 2>ferry.err &
    finish_vmm ferry $!
}
run_qemu() {
    timeout -s KILL "$limit" qemu-system-x86_64 -name bench,debug-threads=on -enable-kvm -cpu host -M q35 -m 512M -smp "$CPUS" \
        -nographic -no-reboot -vga none -nic none -kernel vmlinuz -initrd initrd.cpio.gz -append "$cmdline" \
        $QEMU_CTL -drive file="$img",if=none,id=d,format=raw,$qemu_cache \
        -device "$QEMU_DISK" >qemu.out 2>qemu.err &
    finish_vmm qemu $!
}
finish_vmm() { # name pid
    pin_vmm "$2" "$CPUS"
    wait "$2"
    echo "exit status $?" >>"$1.err"
    tr -d '\r' <"$1.out" | tee "$1.console" | sed -n "s/^RESULT /$1 /p"
}
# A guest that stops before its last job (in the nested test host both VMMs' guests sometimes
# triple-fault; QEMU then exits 0 under -no-reboot) runs once more, and its whole set of
# results is taken from the better run. One round per run of this script: the file "round"
# holds its number, which decides which VMM goes first (alternating, so neither always meets
# a warmer host). Results are printed as "BENCH RESULT vmm job iops kBps".
njobs=$(wc -l <jobs)
ROUND=$(cat round)
: >results
echo "BENCH round $ROUND"
# The first nested guest in a fresh test host often ran slower than the ones after it (a cold
# host: TCG has yet to translate its KVM paths, its memory is untouched): an untimed QEMU
# guest with a short fio goes first, so that neither VMM meets a cold host.
warm=$(printf 'i=0; while [ $i -lt 30 ] && [ ! -b /dev/sda ]; do sleep 1; i=$((i+1)); done\nfio --name=warm --filename=/dev/sda --rw=randread --bs=4k --iodepth=32 --ioengine=libaio --direct=1 --time_based --runtime=2 --size=%sM >/dev/null\n' "$SIZE" | base64 | tr -d '\n')
timeout -s KILL "$limit" qemu-system-x86_64 -enable-kvm -cpu host -M q35 -m 512M -smp "$CPUS" -nographic -no-reboot -vga none -nic none \
    -kernel vmlinuz -initrd initrd.cpio.gz -append "console=ttyS0 quiet panic=-1 ferry.script=$warm" \
    $QEMU_CTL -drive file="$img",if=none,id=d,format=raw,$qemu_cache -device "$QEMU_DISK" >/dev/null 2>&1 || true
order="ferry qemu"
[ $((ROUND % 2)) = 0 ] && order="qemu ferry"
for vmm in $order; do
    : >"$vmm.best"
    for try in 1 2; do
        run_$vmm >"$vmm.try"
        if [ "$(wc -l <"$vmm.try")" -ge "$(wc -l <"$vmm.best")" ]; then
            cp "$vmm.try" "$vmm.best"
        fi
        [ "$(wc -l <"$vmm.best")" -ge "$njobs" ] && break
        if [ "$try" = 1 ]; then
            # Its console, to tell a guest that froze from one that failed.
            echo "BENCH $vmm: the guest stopped after $(wc -l <"$vmm.best") of $njobs jobs; its console and status ended:"
            tail -n 8 "$vmm.console" | sed 's/^/BENCH   /'
            tail -n 2 "$vmm.err" | sed 's/^/BENCH   /'
            echo "BENCH $vmm: running it once more"
        fi
    done
    cat "$vmm.best" >>results
    sed 's/^/BENCH   /' "$vmm.best"
done
while read -r rw bs depth; do
    ./fio --name="$rw" --filename="$img" --rw="$rw" --bs="$bs" --iodepth="$depth" --ioengine=libaio \
        --direct="$direct" --time_based --runtime="$RUNTIME" --size="${SIZE}M" --output-format=terse \
        --terse-version=3 2>/dev/null | awk -F";" -v j="$rw" '{ if (j ~ /read/) print "host " j " " $8 " " $7; else print "host " j " " $49 " " $48 }'
done <jobs >>results
# A job without a result: show what the guest said (kernel messages too) and how the VMM ended.
for vmm in ferry qemu; do
    missing=
    while read -r rw bs depth; do
        grep -q "^$vmm $rw " results || missing="$missing $rw"
    done <jobs
    [ -n "$missing" ] || continue
    echo "BENCH $vmm: no result for$missing; its console ends:"
    tail -n 15 $vmm.console | sed 's/^/BENCH   /'
    echo "BENCH $vmm: its standard error ends:"
    tail -n 5 $vmm.err | sed 's/^/BENCH   /'
done
sed 's/^/BENCH RESULT /' results
EOF

# One round, on this machine or in a test host of its own: prints the round's lines as they
# come, and leaves its results in $OUT/$ctl-round.
run_round() {
    echo "$1" >"$payload/round"
    if [ -n "$local_reason" ]; then
        (cd "$payload" && sh bench.sh) || true
    else
        # --stall: a test host whose kernel locked up (seen: RCU stalls and soft lockups on
        # both CPUs) is stopped instead of waited for. Longer than a frozen guest's kill
        # limit, so that one only costs its retry.
        tests/testhost/run.sh --payload "$payload" --script bench.sh --with-qemu --mem 4G --smp 2 \
            --stall $((400 + 8 * runtime)) --timeout $((900 + 15 * runtime)) || true
    fi | sed -un 's/^BENCH //p' | tee "$OUT/$ctl-round" | { grep --line-buffered -v '^RESULT ' || true; }
}
if local_reason=$(tests/testhost/detect.sh); then
    echo "bench/$ctl: running here ($local_reason)"
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is needed (apt-get install qemu-system-x86 qemu-utils)"
else
    echo "bench/$ctl: inside the test host ($local_reason): absolute numbers are those of a nested guest; compare the ratios"
    local_reason=
fi
all="$OUT/$ctl-results"
: >"$all"
# Every round gives a result per job for ferry, QEMU and host fio.
want=$((3 * $(printf '%s\n' "$jobs" | wc -l)))
for round in $(seq 1 "$rounds"); do
    for try in 1 2; do
        run_round "$round"
        got=$(grep -c '^RESULT ' "$OUT/$ctl-round" || true)
        [ "$got" -ge "$want" ] && break
        [ "$try" = 1 ] && echo "round $round: $got of $want results (the test host failed?); running the round once more"
    done
    sed -n 's/^RESULT //p' "$OUT/$ctl-round" >>"$all"
done
[ -s "$all" ] || die "no round gave any result (see the output above)"
[ "$rounds" -gt 1 ] && echo "medians of $rounds rounds:"
awk '
    # Every round adds a value per VMM and job; each column is the median of its values.
    { k = $1 SUBSEP $2; c = ++cnt[k]; vi[k, c] = $3 + 0; vb[k, c] = $4 + 0; if (!seen[$2]++) order[n++] = $2 }
    function r(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "-" }
    function median(v, k, m,    i, j, t, a) {
        for (i = 1; i <= m; i++) a[i] = v[k, i]
        for (i = 2; i <= m; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
        return m % 2 ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
    }
    END {
        for (k in cnt) { iops[k] = median(vi, k, cnt[k]); bw[k] = median(vb, k, cnt[k]) }
        printf "%-10s %12s %12s %12s %12s %12s %12s %10s %10s\n", "job", "ferry IOPS", "qemu IOPS", "host IOPS", "ferry MB/s", "qemu MB/s", "host MB/s", "ferry/qemu", "ferry/host"
        for (i = 0; i < n; i++) {
            j = order[i]
            printf "%-10s %12d %12d %12d %12.1f %12.1f %12.1f %10s %10s\n", j, iops["ferry", j], iops["qemu", j], iops["host", j], bw["ferry", j] / 1024, bw["qemu", j] / 1024, bw["host", j] / 1024, r(iops["ferry", j], iops["qemu", j]), r(iops["ferry", j], iops["host", j])
        }
    }' "$all"
