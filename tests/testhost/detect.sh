#!/bin/sh
# Does this machine's /dev/kvm run guests with hardware virtualization?
# Exit 0: yes (run ferry's guest tests directly). Exit 1: no (run them inside
# the test host, tests/testhost/run.sh). Prints one sentence saying why.
# Signs of "no": /dev/kvm missing or not usable, no vmx/svm CPU flag, or KVM
# over PVM (module kvm_pvm, which emulates ring-0 guest code instruction by
# instruction). /proc/modules may not exist, so /sys/module is checked too.
set -eu

if [ ! -e /dev/kvm ]; then
    echo "no: /dev/kvm does not exist."
    exit 1
fi
if [ -d /sys/module/kvm_pvm ] || grep -q '^kvm_pvm ' /proc/modules 2>/dev/null; then
    echo "no: /dev/kvm is KVM over PVM (module kvm_pvm), which cannot run unmodified guests at usable speed."
    exit 1
fi
if ! grep -q -w -E 'vmx|svm' /proc/cpuinfo 2>/dev/null; then
    echo "no: the CPU has no vmx or svm flag in /proc/cpuinfo, so /dev/kvm has no hardware virtualization."
    exit 1
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "no: /dev/kvm exists with hardware virtualization but this user ($(id -un)) cannot open it read-write."
    exit 1
fi
flag=$(grep -o -w -m1 -E 'vmx|svm' /proc/cpuinfo | head -n1)
echo "yes: /dev/kvm is usable and the CPU has hardware virtualization ($flag)."
exit 0
