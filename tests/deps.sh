#!/bin/bash
# Installs what the tests need on a fresh Debian machine (as root: apt-get), or says
# what is missing (as a user). The guest kit and the test host's QEMU are then built from
# Debian packages by tests/guest-kit/build.sh and tests/testhost/build.sh, without root.
set -euo pipefail

need=()
command -v python3 >/dev/null || need+=(python3)
command -v readelf >/dev/null || need+=(binutils)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v unshare >/dev/null || need+=(util-linux)
# qemu-img and qemu-io: the referee of the image tests, and the other party of the lock tests.
command -v qemu-img >/dev/null || need+=(qemu-utils)
# SeaBIOS: the firmware `ferry run` boots disks with (ferry finds it where Debian puts it).
[ -f /usr/share/seabios/bios-256k.bin ] || need+=(seabios)
# OVMF: the UEFI firmware `ferry run --firmware efi` boots.
[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || need+=(ovmf)

lists_missing() { ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; }

if [ "$(id -u)" = 0 ]; then
    # Package lists are needed by `apt-get download` for the guest kit.
    if lists_missing || [ -n "${CI:-}" ]; then
        echo "deps: apt-get update"
        apt-get update -qq
    fi
    if [ ${#need[@]} -gt 0 ]; then
        echo "deps: installing ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    fi
else
    if [ ${#need[@]} -gt 0 ]; then
        echo "deps: missing packages: ${need[*]}; install them with: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
    if lists_missing; then
        echo "deps: no apt package lists; run: sudo apt-get update" >&2
        exit 1
    fi
fi
echo "deps: ok"
