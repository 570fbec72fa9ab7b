#!/bin/bash
# The demo: boot the guest kit headless under ferry, show its console, and end when
# the guest powers off. On a host without hardware virtualization, the demo runs in
# the test host (QEMU TCG with nested SVM), which takes a minute or two.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

cargo build --release -p ferry
tests/guest-kit/build.sh target/guest-kit

script='echo "Hello from a ferry guest."
echo "kernel:  $(uname -r)"
echo "vCPUs:   $(nproc)"
echo "memory:  $(awk "/MemTotal/ {print int(\$2/1024)}" /proc/meminfo) MiB"
echo "PCI:     $(cat /sys/bus/pci/devices/*/vendor | tr "\n" " ")"
echo "fio:     $(fio --version)"
echo "Powering off."'
b64=$(printf '%s' "$script" | base64 -w0)
cmdline="console=ttyS0 quiet ferry.script=$b64"

if why=$(tests/testhost/detect.sh); then
    exec target/release/ferry run --kernel target/guest-kit/vmlinuz \
        --initrd target/guest-kit/initramfs.cpio.gz --cmdline "$cmdline" --memory 1G --cpus 2
fi
echo "demo: this host cannot run guests at hardware speed ($why)."
echo "demo: running the demo inside the test host (QEMU TCG with nested SVM); this takes a minute or two."
payload=target/demo/payload
rm -rf "$payload"
mkdir -p "$payload"
cp target/release/ferry target/guest-kit/vmlinuz target/guest-kit/initramfs.cpio.gz "$payload/"
cat >"$payload/demo.sh" <<DEMO
./ferry run --kernel vmlinuz --initrd initramfs.cpio.gz --cmdline '$cmdline' --memory 1G --cpus 2
echo "demo: ferry exited with status \$?"
DEMO
exec tests/testhost/run.sh --payload "$payload" --script demo.sh --mem 4G --timeout 900
