#!/bin/bash
# Integration tests: boot the guest kit under ferry on a real /dev/kvm and run
# tests/integration/scenarios.sh. Directly where this host's KVM has hardware
# virtualization; otherwise inside the QEMU TCG test host (tests/testhost).
# Usage: tests/integration/run.sh [SCENARIO...]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"

cargo build --release -p ferry
tests/guest-kit/build.sh target/guest-kit

payload=target/integration/payload
rm -rf "$payload"
mkdir -p "$payload"
cp target/release/ferry tests/integration/scenarios.sh tests/testhost/disk-dir.sh "$payload/"
cp target/guest-kit/vmlinuz "$payload/"
# Scenarios that need no fio boot the small kit; one checks the full kit.
cp target/guest-kit/initramfs-base.cpio.gz "$payload/initramfs.cpio.gz"
cp target/guest-kit/initramfs.cpio.gz "$payload/initramfs-full.cpio.gz"
# Firmware boots: the kit's extlinux and UEFI disks, Debian's SeaBIOS and OVMF (tests/deps.sh
# installs them).
cp target/guest-kit/boot.raw target/guest-kit/efiboot.raw "$payload/"
cp /usr/share/seabios/bios-256k.bin /usr/share/OVMF/OVMF_CODE_4M.fd /usr/share/OVMF/OVMF_VARS_4M.fd "$payload/"
# Empty dynamic images of each format, made by another tool (qemu-img), for the guest to fill.
for f in vdi:vdi vmdk:vmdk vhd:vpc hds:parallels; do
    qemu-img create -q -f "${f#*:}" "$payload/empty.${f%%:*}" 128M
done
# A small ISO 9660 medium (volume descriptors, then a known pattern) for the CD/DVD drive.
python3 - "$payload/test.iso" <<'EOF'
import struct, sys
sectors = 512                                   # 1 MiB of 2048-byte sectors
iso = bytearray(sectors * 2048)
pvd = bytearray(2048)
pvd[0:7] = b"\x01CD001\x01"
pvd[40:72] = b"FERRY-TEST".ljust(32)
pvd[80:88] = struct.pack("<I", sectors) + struct.pack(">I", sectors)
iso[16 * 2048:17 * 2048] = pvd
iso[17 * 2048:17 * 2048 + 7] = b"\xffCD001\x01"
for s in range(18, sectors):
    iso[s * 2048:(s + 1) * 2048] = ((b"FERRY-ISO-%06d " % s) * 128)[:2048]
open(sys.argv[1], "wb").write(iso)
EOF

log=target/integration/last-run.log
status=0
if tests/testhost/detect.sh; then
    echo "integration: running the guest scenarios directly on this host's KVM"
    (cd "$payload" && OUT="$REPO/target/integration/logs" sh scenarios.sh "$@") 2>&1 | tee "$log" || status=$?
else
    # QEMU TCG's emulated SVM sometimes leaves a test-host CPU stuck inside a nested guest
    # for good (QEMU's own -enable-kvm guests hit it too; see --stall in tests/testhost/run.sh).
    # A silent console stops that test host; the scenarios it did not finish run in a
    # fresh one, the one that was running at most twice in all.
    echo "integration: running the guest scenarios inside the test host (QEMU TCG with nested SVM)"
    remaining=${*:-$(sh tests/integration/scenarios.sh --list)}
    # OVMF cannot run nested here: QEMU 7.2's emulated SVM aborts the test host
    # ("tcg_handle_interrupt: assertion failed: (qemu_mutex_iothread_locked())") as soon as
    # a nested guest runs OVMF, under QEMU -enable-kvm exactly as under ferry, with one or
    # two TCG threads. The UEFI scenarios run where the host has hardware virtualization.
    kept=""
    for s in $remaining; do
        case $s in
            efi_*) echo "integration: $s left out: it needs hardware virtualization (OVMF aborts QEMU 7.2's emulated SVM)" ;;
            *) kept="$kept $s" ;;
        esac
    done
    remaining=$kept
    : >"$log"
    retried=""
    for attempt in 1 2 3; do
        printf 'OUT=/tmp/ferry-scenarios sh scenarios.sh %s\n' "$remaining" >"$payload/run-scenarios.sh"
        part=target/integration/attempt-$attempt.log
        status=0
        tests/testhost/run.sh --payload "$payload" --script run-scenarios.sh --mem 8G --smp 2 \
            --timeout 2400 --stall 420 2>&1 | tee "$part" || status=$?
        cat "$part" >>"$log"
        grep -aq '^FERRY-TESTS-DONE' "$part" && break
        # Stalled (124) or crashed: QEMU 7.2's emulated SVM has also panicked the test host's
        # kernel under a nested guest (a stack guard page hit in a vCPU thread, with the
        # nested guest's GS base loaded); both get the same fresh test host.
        # Scenarios the stalled host finished keep their results; the one it was in gets
        # one more try, unless it already had one.
        # (The test host's console ends its lines with CR LF.)
        hung=$(tr -d '\r' <"$part" | grep -a '^FERRY-TEST-START ' | tail -n 1 | cut -d' ' -f2)
        next=""
        # Stalled before any scenario began: all of them run again.
        started=0
        [ -n "$hung" ] || started=1
        for s in $remaining; do
            [ "$s" = "$hung" ] && started=1
            [ "$started" = 1 ] || continue
            if [ "$s" = "$hung" ]; then
                case " $retried " in
                    *" $s "*) echo "FERRY-TEST $s FAIL: the test host hung or crashed in it twice" >>"$log"; continue ;;
                esac
                retried="$retried $s"
            fi
            next="$next $s"
        done
        remaining=$next
        [ -n "$remaining" ] || break
        echo "integration: the test host stalled or crashed in '${hung:-?}'; a fresh one runs:$remaining"
    done
    # One summary over all attempts.
    total=$(grep -ac '^FERRY-TEST [^ ]* ' "$log" || true)
    failed=$(grep -ac '^FERRY-TEST [^ ]* FAIL' "$log" || true)
    if grep -aq '^FERRY-TESTS-DONE' "$log"; then
        echo "FERRY-TESTS-DONE total=$total failed=$failed" >>"$log"
    fi
fi

echo
echo "integration: results"
grep -a '^FERRY-TEST ' "$log" || true
done_line=$(grep -a '^FERRY-TESTS-DONE' "$log" | tail -n 1 || true)
if [ -z "$done_line" ] || ! grep -q 'failed=0' <<<"$done_line"; then
    # The tail of a CI log is often all anyone sees: repeat what explains a failure here.
    if grep -aqE 'soft lockup|BUG:|Call Trace|still runs after|survives SIGKILL' "$log"; then
        echo "integration: host kernel trouble and stopped guests seen in the run:"
        grep -aE -A12 'soft lockup|BUG:|still runs after|survives SIGKILL' "$log" | head -n 80
    fi
fi
if grep -aq '^FERRY-TEST [^ ]* FAIL' "$log"; then
    echo "integration: failed scenarios:"
    grep -a '^FERRY-TEST [^ ]* FAIL' "$log"
fi
if [ -z "$done_line" ]; then
    echo "integration: FAILED: the scenario run did not finish (see $log)"
    exit 1
fi
echo "integration: $done_line"
[ "$status" = 0 ] && grep -q 'failed=0' <<<"$done_line"
