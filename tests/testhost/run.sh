#!/bin/bash
# Run a payload inside the ferry test host: a Debian kernel under QEMU TCG with
# -cpu max (emulated AMD SVM), where kvm-amd gives a /dev/kvm with real
# hardware-virtualization semantics.
# Usage: tests/testhost/run.sh --payload DIR --script REL_PATH [--mem 6G]
#            [--smp 2] [--timeout SECONDS] [--stall SECONDS] [--with-qemu]
#            [--append ARGS] [--keep]
#   DIR is copied to /payload in the test host; inside, /init runs
#   `cd /payload && sh REL_PATH`. The shared libraries of every dynamically
#   linked ELF file in DIR (found with ldd on this machine) are copied along.
#   --with-qemu   also put Debian's QEMU into the test host (qemu-system-x86_64
#                 on PATH there), e.g. to compare ferry with QEMU -enable-kvm
#   --stall SECONDS  stop the test host when its console shows nothing but kernel messages
#                    this long, or when its kernel reports a CPU stuck for half as long
#                 (QEMU TCG's emulated SVM can leave a CPU of the test host stuck
#                 in a nested guest forever; a silent console is how that shows)
#   --append ARGS extra kernel command line for the test host
#   --keep        keep the temporary directory target/testhost/run.<pid>
# All serial output of the test host streams to stdout. Exit status: the
# payload script's (0 only if it succeeded); 124 on timeout or stall; 125 if the test
# host ended without reporting one (crash, panic, QEMU failure).
# Needs bash (pipefail), python3, ldd; builds the test host if needed.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
KIT="$REPO/tests/guest-kit"
. "$KIT/debs.sh"

payload="" script="" mem=6G smp=2 timeout=1800 stall=0 with_qemu="" append="" keep=""
while [ $# -gt 0 ]; do
    case $1 in
        --payload) payload=${2:?--payload needs a directory}; shift 2 ;;
        --script) script=${2:?--script needs a path relative to the payload}; shift 2 ;;
        --mem) mem=${2:?}; shift 2 ;;
        --smp) smp=${2:?}; shift 2 ;;
        --timeout) timeout=${2:?}; shift 2 ;;
        --stall) stall=${2:?}; shift 2 ;;
        --with-qemu) with_qemu=1; shift ;;
        --append) append=${2?}; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[ -n "$payload" ] || die "--payload DIR is required"
[ -n "$script" ] || die "--script REL_PATH is required"
[ -d "$payload" ] || die "payload directory '$payload' does not exist"
[ -f "$payload/$script" ] || die "payload script '$payload/$script' does not exist"
case $script in /*) die "--script must be relative to the payload directory" ;; esac
case $timeout in ''|*[!0-9]*) die "--timeout must be a number of seconds" ;; esac
case $stall in ''|*[!0-9]*) die "--stall must be a number of seconds" ;; esac
payload=$(cd "$payload" && pwd)

# Build (or confirm up to date) the test host image and find QEMU.
if [ -n "$with_qemu" ]; then
    "$HERE/build.sh" --qemu-bundle
else
    "$HERE/build.sh"
fi
OUT="$REPO/target/testhost"
QEMU=$(cat "$OUT/qemu-cmd")

tmp="$OUT/run.$$"
rm -rf "$tmp"
mkdir -p "$tmp/root/etc" "$tmp/root/usr/lib/x86_64-linux-gnu" "$tmp/root/usr/local/bin"
cleanup() { [ -n "$keep" ] || rm -rf "$tmp"; }
trap cleanup EXIT

# --- the payload archive: /payload, the libraries its programs need, config
cp -a "$payload" "$tmp/root/payload"
printf '%s\n' "$script" >"$tmp/root/etc/testhost-script"
libdir=/usr/lib/x86_64-linux-gnu
nelf=0
while IFS= read -r -d '' f; do
    [ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" = '177ELF' ] || continue
    # Shared objects in the payload (plugins) have no interpreter but may
    # still need libraries; static programs need nothing.
    LC_ALL=C readelf -dW "$f" 2>/dev/null | grep -q '(NEEDED)' || continue
    nelf=$((nelf + 1))
    copy_libs "$tmp/root$libdir" ldd "$f"
    interp=$(elf_interp "$f")
    [ -n "$interp" ] || continue
    # The loader goes where the program asks for it (PT_INTERP); the test
    # host has merged /usr (/lib -> usr/lib, /lib64 -> usr/lib64).
    case $interp in
        /lib/*|/lib64/*) dst="$tmp/root/usr$interp" ;;
        *) dst="$tmp/root$interp" ;;
    esac
    mkdir -p "$(dirname "$dst")"
    cp -L "$interp" "$dst"
done < <(find "$payload" -type f -print0)
# ld.so of other distributions may not search the Debian multiarch directory.
printf '%s\n' "$libdir" >"$tmp/root/etc/testhost-ldpath"
if [ -n "$with_qemu" ]; then
    # The unpacked QEMU carries its own loader and libraries.
    cp -a "$OUT/qemu" "$tmp/root/opt-qemu"
    mkdir -p "$tmp/root/opt" && mv "$tmp/root/opt-qemu" "$tmp/root/opt/qemu"
    ln -s /opt/qemu/bin/qemu-system-x86_64 "$tmp/root/usr/local/bin/qemu-system-x86_64"
fi
# gzip -1: the payload is mostly already compressed (kernel, kit initramfs).
python3 "$KIT/initramfs.py" cpio --root "$tmp/root" --level 1 --out "$tmp/payload.cpio.gz"
# Concatenated gzip'd cpio archives form one initramfs; later files win.
cat "$OUT/host.cpio.gz" "$tmp/payload.cpio.gz" >"$tmp/initrd.gz"
echo "testhost: payload $(du -sh "$payload" | cut -f1) ($nelf dynamic ELF files), initrd $(du -h "$tmp/initrd.gz" | cut -f1); booting (timeout ${timeout}s)"

# --- boot. Serial output streams through; lines are also kept in a log.
log="$tmp/serial.log"     # copied to target/testhost/last-run.log at the end
: >"$log"
start=$(date +%s.%N)
ready_wall=""
set +e
stalled="$tmp/stalled"
quiet_until=$((SECONDS + stall))
timeout -k 10 "$timeout" $QEMU -accel tcg,thread=multi -cpu max -m "$mem" -smp "$smp" \
    -nographic -no-reboot -vga none -nic none -pidfile "$tmp/qemu.pid" \
    -kernel "$OUT/vmlinuz" -initrd "$tmp/initrd.gz" \
    -append "console=ttyS0 panic=-1 quiet $append" 2>&1 |
while :; do
    if [ "$stall" -gt 0 ]; then
        left=$((quiet_until - SECONDS))
        [ "$left" -ge 1 ] || left=1
        IFS= read -r -t "$left" line; r=$?
    else
        IFS= read -r line; r=$?
    fi
    if [ "$r" -gt 128 ]; then
        # Silent for --stall seconds: stop QEMU; the loop then reads to EOF.
        echo "testhost: nothing but kernel messages on the console for ${stall}s: stopping the test host" | tee -a "$log"
        : >"$stalled"
        kill "$(cat "$tmp/qemu.pid" 2>/dev/null)" 2>/dev/null
        stall=0
        continue
    fi
    [ "$r" = 0 ] || [ -n "$line" ] || break
    printf '%s\n' "$line"
    printf '%s\n' "$line" >>"$log"
    # Only the payload's own lines show progress: a stuck test host keeps printing kernel
    # reports (hung tasks every two minutes, lockups), and those must not hold off the stall.
    [[ $line =~ ^\[\ *[0-9]+\.[0-9]+\] ]] || quiet_until=$((SECONDS + stall))
    # A test-host CPU stuck for minutes (QEMU TCG's emulated SVM can leave one spinning for
    # good) keeps the console busy with lockup reports, so silence never comes: that counts as
    # a stall too. Short lockups pass; the host may recover from those.
    if [ "$stall" -gt 0 ] && [[ $line =~ soft\ lockup\ -\ CPU#[0-9]+\ stuck\ for\ ([0-9]+)s ]] &&
        [ "${BASH_REMATCH[1]}" -ge $((stall / 2)) ]; then
        echo "testhost: a CPU of the test host is stuck for ${BASH_REMATCH[1]}s: stopping the test host" | tee -a "$log"
        : >"$stalled"
        kill "$(cat "$tmp/qemu.pid" 2>/dev/null)" 2>/dev/null
        stall=0
        continue
    fi
    case $line in
        *TESTHOST-READY*)
            echo "testhost: payload started $(echo "$(date +%s.%N) $start" | awk '{printf "%.1f", $1 - $2}') s after QEMU start" ;;
    esac
done
status=("${PIPESTATUS[@]}")
set -e
qrc=${status[0]}
wall=$(echo "$(date +%s.%N) $start" | awk '{printf "%.1f", $1 - $2}')
cp "$log" "$OUT/last-run.log.$$" && mv "$OUT/last-run.log.$$" "$OUT/last-run.log"
log="$OUT/last-run.log"

marker=$(tr -d '\r' <"$log" | grep -a -o 'TESTHOST-EXIT rc=[0-9]*' | tail -n1 || true)
if [ -e "$stalled" ]; then
    echo "testhost: FAILED: the test host stalled (no output for the --stall time); log: $log" >&2
    exit 124
fi
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    echo "testhost: FAILED: timeout after ${timeout}s (QEMU killed); log: $log" >&2
    exit 124
fi
if [ -z "$marker" ]; then
    echo "testhost: FAILED: the test host ended without a TESTHOST-EXIT line (QEMU exit status $qrc: crash, kernel panic or QEMU error; see above or $log)" >&2
    exit 125
fi
rc=${marker#TESTHOST-EXIT rc=}
echo "testhost: payload script exited with rc=$rc; test host ran ${wall}s wall"
[ "$rc" = 0 ] && exit 0
[ "$rc" -gt 0 ] 2>/dev/null && [ "$rc" -lt 256 ] && exit "$rc"
exit 1
