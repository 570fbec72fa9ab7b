#!/bin/sh
# Self-test of the guest kit and the test host, without ferry: builds both,
# then inside the test host checks /dev/kvm and boots the guest kit as an L2
# guest with Debian's QEMU and -enable-kvm (proves nested KVM works and the
# kit's GUEST-* protocol). Takes about 1-2 minutes here.
# Usage: tests/testhost/selftest.sh    (exit 0 on success)
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
"$REPO/tests/guest-kit/build.sh"
P="$REPO/target/testhost/selftest"
rm -rf "$P" && mkdir -p "$P"
cp "$REPO/target/guest-kit/vmlinuz" "$REPO/target/guest-kit/initramfs.cpio.gz" "$P/"
cat >"$P/check.sh" <<'EOF'
set -eu
ls -l /dev/kvm
echo "svm flags: $(grep -c svm /proc/cpuinfo)"
S=$(printf 'echo hello from L2; fio --version' | base64 -w0)
qemu-system-x86_64 -enable-kvm -m 512M -nographic -no-reboot -vga none -nic none \
    -kernel vmlinuz -initrd initramfs.cpio.gz \
    -append "console=ttyS0 panic=-1 quiet ferry.script=$S" </dev/null | tr -d '\r' >l2.log
cat l2.log
grep -q '^GUEST-READY ' l2.log
grep -q '^hello from L2$' l2.log
grep -q '^fio-' l2.log
grep -q '^GUEST-SCRIPT-END rc=0$' l2.log
echo "selftest: L2 guest under nested KVM OK"
EOF
exec "$HERE/run.sh" --payload "$P" --script check.sh --with-qemu --timeout 600
