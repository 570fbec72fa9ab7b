#!/bin/bash
# Boot-time benchmark: ferry, QEMU q35 and QEMU microvm boot the same guest kit
# kernel + initramfs, with the same command line, memory (512M) and vCPU (1),
# N times each, to the guest's GUEST-READY console line. Prints the median time
# and the VMM's RSS at that moment, the ratios ferry/q35 and ferry/microvm,
# and the goal check (information only). See tests/bench/src/boot.rs.
# With --bios: ferry (--firmware bios) and QEMU q35 (-bios) run the same SeaBIOS
# (Debian's bios-256k.bin), which boots the kit's extlinux disk boot.raw on
# virtio-scsi; goal: ferry/q35 <= 1.0. microvm has no BIOS disk boot.
#
# Usage: tests/bench/boot/run.sh [--runs N] [--full-initrd | --bios] [--json]
#            [--direct | --testhost] [-- BOOT-BENCH-ARGS...]
#   --runs N        boots per VMM (default 10; inside the test host each boot
#                   takes tens of seconds)
#   --full-initrd   boot the kit's full initramfs.cpio.gz (with fio, ~36 MB)
#                   instead of initramfs-base.cpio.gz (same /init, no fio)
#   --bios          BIOS boot from target/guest-kit/boot.raw (built by the kit
#                   as root, see tests/guest-kit/bootdisk.sh) with
#                   /usr/share/seabios/bios-256k.bin (package seabios)
#   --json          print the results as JSON instead of the table
#   --direct        run on this host even if tests/testhost/detect.sh says no
#   --testhost      run inside the test host even if this host could do it
#   after --         passed on to boot-bench (e.g. --vmm ferry,q35, --echo)
# Where tests/testhost/detect.sh finds hardware virtualization, the benchmark
# runs here (it needs qemu-system-x86_64: installed with apt when missing and
# root, else Debian's QEMU is unpacked under target/testhost/qemu). Otherwise it
# runs inside the test host (tests/testhost/run.sh --with-qemu), where only the
# ratios mean something: the times are those of a guest nested in an emulator.
# The JSON results are also left in target/bench/boot.json (boot-bios.json with
# --bios); their "mode" says which: direct or bios.
# Exit status: boot-bench's (non-zero only if a VMM never reached GUEST-READY).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
die() { echo "bench/boot: $*" >&2; exit 2; }

runs=10 initrd_name=initramfs-base.cpio.gz json="" where=auto mode=direct full=""
extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=${2:?--runs needs a number}; shift 2 ;;
        --full-initrd) initrd_name=initramfs.cpio.gz full=1; shift ;;
        --bios) mode=bios; shift ;;
        --json) json=1; shift ;;
        --direct) where=direct; shift ;;
        --testhost) where=testhost; shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case $runs in ''|*[!0-9]*|0) die "--runs needs a positive number" ;; esac
[ "$mode" = direct ] || [ -z "$full" ] || die "--full-initrd is for direct kernel boot: the --bios disk carries the base initramfs"
SEABIOS=/usr/share/seabios/bios-256k.bin

cd "$REPO"
echo "bench/boot: building ferry and boot-bench (cargo build --release)"
cargo build --release --bin ferry --bin boot-bench
echo "bench/boot: building the guest kit"
tests/guest-kit/build.sh
KIT="$REPO/target/guest-kit"
OUT="$REPO/target/bench"
mkdir -p "$OUT"
if [ "$mode" = bios ]; then
    [ -f "$KIT/boot.raw" ] || die "no boot disk $KIT/boot.raw: it needs root to build (run tests/guest-kit/bootdisk.sh as root)"
    [ -f "$SEABIOS" ] || die "no $SEABIOS: install Debian's seabios package (tests/deps.sh)"
    json_name=boot-bios.json
    # Here: boot-bench's arguments; in the test host: the payload's names.
    mode_args=(--disk "$KIT/boot.raw" --bios "$SEABIOS" --scratch "$OUT")
    nvmm=2
else
    [ -f "$KIT/vmlinuz" ] && [ -f "$KIT/$initrd_name" ] || die "guest kit incomplete: no $KIT/vmlinuz or $KIT/$initrd_name"
    json_name=boot.json
    mode_args=(--kernel "$KIT/vmlinuz" --initrd "$KIT/$initrd_name")
    nvmm=3
fi
rm -f "$OUT/$json_name"

if [ "$where" = auto ]; then
    if reason=$(tests/testhost/detect.sh); then where=direct; else where=testhost; fi
    echo "bench/boot: hardware virtualization here? $reason"
fi

json_flag=()
[ -z "$json" ] || json_flag=(--json)

if [ "$where" = direct ]; then
    qemu=$(command -v qemu-system-x86_64 || true)
    if [ -z "$qemu" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            # Both together: qemu-system-x86 alone would remove a backported
            # qemu-utils and leave no qemu-img (see research/testhost.md).
            echo "bench/boot: installing QEMU: apt-get install -y qemu-system-x86 qemu-utils"
            DEBIAN_FRONTEND=noninteractive apt-get install -y qemu-system-x86 qemu-utils
            qemu=$(command -v qemu-system-x86_64)
        else
            echo "bench/boot: no qemu-system-x86_64 and not root: using Debian's QEMU unpacked under target/testhost/qemu"
            tests/testhost/build.sh --qemu-bundle
            qemu="$REPO/target/testhost/qemu/bin/qemu-system-x86_64"
        fi
    fi
    set +e
    target/release/boot-bench --ferry target/release/ferry --qemu "$qemu" \
        "${mode_args[@]}" --runs "$runs" \
        --json-out "$OUT/$json_name" "${json_flag[@]}" "${extra[@]}"
    rc=$?
    set -e
    exit $rc
fi

# Inside the test host: one payload folder with both programs, the kit (or the
# boot disk and SeaBIOS) and a script that runs the benchmark; the JSON comes
# back on the serial console.
payload="$OUT/boot-payload"
rm -rf "$payload"
mkdir -p "$payload"
cp target/release/ferry target/release/boot-bench "$payload/"
if [ "$mode" = bios ]; then
    # ferry finds bios-256k.bin in $FERRY_FIRMWARE_DIR (boot-bench sets it to the
    # folder of --bios too); QEMU gets the same file with -bios. The disk's
    # private copy goes to /tmp.
    cp "$KIT/boot.raw" "$SEABIOS" "$payload/"
    payload_args="--disk boot.raw --bios bios-256k.bin --scratch /tmp"
    payload_env='export FERRY_FIRMWARE_DIR="$PWD"'
else
    cp "$KIT/vmlinuz" "$payload/"
    cp "$KIT/$initrd_name" "$payload/initrd.cpio.gz"
    payload_args="--kernel vmlinuz --initrd initrd.cpio.gz"
    payload_env=""
fi
args=""
for a in "${extra[@]}" "${json_flag[@]}"; do
    args="$args '$(printf '%s' "$a" | sed "s/'/'\\\\''/g")'"
done
cat >"$payload/bench.sh" <<EOF
# Runs inside the ferry test host (busybox sh); written by tests/bench/boot/run.sh.
echo "bench/boot: test host: \$(nproc) CPUs, \$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
$payload_env
./boot-bench --ferry ./ferry --qemu qemu-system-x86_64 \\
    $payload_args --runs $runs \\
    --note "inside the nested test host (QEMU TCG with emulated SVM, L2 guests): absolute times are not meaningful, only the ratios" \\
    --json-out /tmp/boot.json$args
rc=\$?
[ -f /tmp/boot.json ] && echo "BENCH-JSON \$(cat /tmp/boot.json)"
exit \$rc
EOF
# Per boot: tens of seconds in the nested test host, plus power-off.
timeout=$((600 + runs * nvmm * 180))
set +e
tests/testhost/run.sh --payload "$payload" --script bench.sh --with-qemu \
    --mem 4G --smp 2 --timeout "$timeout"
rc=$?
set -e
log="$REPO/target/testhost/last-run.log"
if [ -f "$log" ]; then
    tr -d '\r' <"$log" | sed -n 's/^BENCH-JSON //p' | tail -n1 >"$OUT/$json_name"
    [ -s "$OUT/$json_name" ] || rm -f "$OUT/$json_name"
fi
[ -f "$OUT/$json_name" ] && echo "bench/boot: JSON results in $OUT/$json_name"
echo "bench/boot: measured inside the nested test host: compare the ratios, not the absolute times"
exit $rc
