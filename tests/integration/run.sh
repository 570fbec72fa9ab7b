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
cp target/release/ferry tests/integration/scenarios.sh "$payload/"
cp target/guest-kit/vmlinuz "$payload/"
# Scenarios that need no fio boot the small kit; one checks the full kit.
cp target/guest-kit/initramfs-base.cpio.gz "$payload/initramfs.cpio.gz"
cp target/guest-kit/initramfs.cpio.gz "$payload/initramfs-full.cpio.gz"

log=target/integration/last-run.log
status=0
if tests/testhost/detect.sh; then
    echo "integration: running the guest scenarios directly on this host's KVM"
    (cd "$payload" && OUT="$REPO/target/integration/logs" sh scenarios.sh "$@") 2>&1 | tee "$log" || status=$?
else
    echo "integration: running the guest scenarios inside the test host (QEMU TCG with nested SVM)"
    printf 'OUT=/tmp/ferry-scenarios sh scenarios.sh %s\n' "$*" >"$payload/run-scenarios.sh"
    tests/testhost/run.sh --payload "$payload" --script run-scenarios.sh --mem 8G --smp 2 \
        --timeout 3000 2>&1 | tee "$log" || status=$?
fi

echo
echo "integration: results"
grep -a '^FERRY-TEST ' "$log" || true
done_line=$(grep -a '^FERRY-TESTS-DONE' "$log" || true)
if [ -z "$done_line" ]; then
    echo "integration: FAILED: the scenario run did not finish (see $log)"
    exit 1
fi
echo "integration: $done_line"
[ "$status" = 0 ] && grep -q 'failed=0' <<<"$done_line"
