#!/bin/sh
# Build the ferry test host (L1) from Debian bookworm packages, without root:
#   target/testhost/vmlinuz        Debian's kernel (same package as the guest kit)
#   target/testhost/host.cpio.gz   busybox, kvm + kvm-amd and their dependencies,
#                                  tests/testhost/init as /init
#   target/testhost/qemu-cmd       the qemu-system-x86_64 to run it with
# and, when this machine has no qemu-system-x86_64 on PATH (or with
# --qemu-bundle), target/testhost/qemu/: Debian's QEMU 7.2 unpacked with its
# own libraries and loader (runs on any x86-64 Linux, needs no root, and leaves
# the system's packages -- and its newer qemu-img -- alone).
# Usage: tests/testhost/build.sh [--qemu-bundle] [--install-qemu-apt]
#   --qemu-bundle       build the unpacked QEMU even if one is on PATH (run.sh
#                       --with-qemu needs it to put QEMU into the test host)
#   --install-qemu-apt  instead install qemu-system-x86 system-wide (root only):
#                       apt-get install -y qemu-system-x86 qemu-utils, together,
#                       because installing qemu-system-x86 alone removes the
#                       backported qemu-utils (qemu-img 10) and leaves no qemu-img.
# Quick when nothing changed (cache keys in target/testhost/*.key).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
KIT="$REPO/tests/guest-kit"
. "$KIT/debs.sh"
OUT="$REPO/target/testhost"
mkdir -p "$OUT"

want_bundle="" apt_install=""
for a in "$@"; do
    case $a in
        --qemu-bundle) want_bundle=1 ;;
        --install-qemu-apt) apt_install=1 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) die "unknown option $a (see --help)" ;;
    esac
done

for t in apt-get apt-cache dpkg-deb python3 readelf; do
    command -v "$t" >/dev/null 2>&1 || die "$t is needed to build the test host"
done

if [ -n "$apt_install" ]; then
    [ "$(id -u)" = 0 ] || die "--install-qemu-apt needs root"
    if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
        echo "installing qemu-system-x86 system-wide: apt-get install -y qemu-system-x86 qemu-utils"
        echo "(together with qemu-utils: alone it would remove the installed qemu-utils and leave no qemu-img)"
        apt-get install -y qemu-system-x86 qemu-utils
    fi
fi

# One build at a time (run.sh calls this script; parallel test runs share
# target/testhost). A second caller waits, then finds everything up to date.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$OUT/.build.lock"
    flock 9
fi
deb_check_lists
# Statement of what we depend on: the inputs of this script and the package
# lists. If neither changed since the last build, skip the apt queries too.
STAMP=$( { cat "$0" "$HERE/init" "$KIT/debs.sh" "$KIT/initramfs.py"
           ls -l --time-style=full-iso /var/lib/apt/lists/ 2>/dev/null
           echo "bundle=$want_bundle path=$(command -v qemu-system-x86_64 || true)"; } | sha256sum)

KPKG=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)/\1/p' | head -n1)
[ -n "$KPKG" ] || die "cannot find the kernel package linux-image-amd64 depends on"

# ---------------------------------------------------------------- the L1 image
build_host() {
    deb_resolve "$KPKG" busybox-static
    key=$( { echo "testhost v1"; printf '%s\n' "$DEB_FILES"; \
             cat "$0" "$HERE/init" "$KIT/debs.sh" "$KIT/initramfs.py" | sha256sum; } )
    if [ -f "$OUT/host.key" ] && [ "$(cat "$OUT/host.key")" = "$key" ] \
       && [ -f "$OUT/host.cpio.gz" ] && [ -f "$OUT/vmlinuz" ]; then
        echo "test host image up to date: $OUT/host.cpio.gz"
        return 0
    fi
    echo "building test host image in $OUT"
    deb_fetch
    work="$OUT/host.work"
    root="$work/root"
    rm -rf "$work" && mkdir -p "$root"
    for d in dev proc sys tmp root payload usr/bin usr/sbin usr/lib/x86_64-linux-gnu usr/lib64 usr/local/bin etc bin sbin; do
        mkdir -p "$root/$d"
    done
    ln -s usr/lib "$root/lib"
    ln -s usr/lib64 "$root/lib64"
    kdir=$(deb_dir "$KPKG")
    cp "$kdir"/boot/vmlinuz-* "$OUT/vmlinuz"
    # kvm-amd: the test host's CPU is QEMU's emulated AMD with SVM. brd and ext4: a RAM-disk
    # file system that takes O_DIRECT, for benchmarks with the host cache off (tmpfs refuses
    # it; see tests/bench/disk-dir.sh).
    python3 "$KIT/initramfs.py" kmods --kdir "$kdir" --dest "$root" \
        --report "$OUT/host.modules" kvm kvm-amd brd ext4
    bb=$(deb_dir busybox-static)/bin/busybox
    cp "$bb" "$root/bin/busybox"
    "$bb" --list-full | while read -r app; do
        [ -e "$root/$app" ] || [ -L "$root/$app" ] || ln -s /bin/busybox "$root/$app"
    done
    cp "$HERE/init" "$root/init"
    chmod 755 "$root/init"
    python3 "$KIT/initramfs.py" cpio --root "$root" --dev dev/console:c:5:1 \
        --out "$OUT/host.cpio.gz.tmp"
    mv "$OUT/host.cpio.gz.tmp" "$OUT/host.cpio.gz"
    printf '%s\n' "$key" >"$OUT/host.key"
    rm -rf "$work"
    echo "test host image ready: $OUT/vmlinuz $OUT/host.cpio.gz"
}

# ---------------------------------------------------------------- QEMU bundle
build_qemu_bundle() {
    q="$OUT/qemu"
    pkgs="qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu $(deb_libclosure qemu-system-x86 | grep -v '^qemu-system-x86$' | tr '\n' ' ')"
    # shellcheck disable=SC2086
    deb_resolve $pkgs
    key=$( { echo "qemu bundle v1"; printf '%s\n' "$DEB_FILES"; cat "$0" "$KIT/debs.sh" | sha256sum; } )
    if [ -f "$q/bundle.key" ] && [ "$(cat "$q/bundle.key")" = "$key" ]; then
        echo "QEMU bundle up to date: $q/bin/qemu-system-x86_64"
        return 0
    fi
    echo "unpacking Debian's qemu-system-x86 into $q (apt-get download + dpkg-deb -x; no root, system untouched)"
    deb_fetch
    rm -rf "$q" && mkdir -p "$q/bin" "$q/libexec" "$q/lib" "$q/share"
    src=$(deb_dir qemu-system-x86)/usr/bin/qemu-system-x86_64
    ldso=$(find "$(deb_dir libc6)" -name 'ld-linux-x86-64.so.2' -type f | head -n1)
    # shellcheck disable=SC2046
    libpath=$(deb_libpath $(printf '%s\n' "$DEB_FILES" | sed 's/_.*//'))
    cp "$src" "$q/libexec/qemu-system-x86_64"
    copy_libs "$q/lib" "$ldso --library-path $libpath --list" "$src"
    cp "$ldso" "$q/lib/ld-linux-x86-64.so.2"
    # Debian builds TCG as a loadable module (qemu-system-common); without it
    # QEMU says "could not load module for type 'tcg-accel-ops'". Only the
    # TCG modules: the others are display/audio/USB-host back ends.
    mkdir -p "$q/lib/qemu"
    for m in "$(deb_dir qemu-system-common)"/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-*.so; do
        [ -e "$m" ] || continue   # newer QEMU builds TCG in
        cp "$m" "$q/lib/qemu/"
        copy_libs "$q/lib" "$ldso --library-path $libpath --list" "$m"
    done
    # Firmware: Debian's QEMU looks in /usr/share/qemu, /usr/share/seabios and
    # /usr/lib/ipxe/qemu (NIC option ROMs, needed for the default NIC); the
    # bundle passes one -L, so merge them.
    cp -rL "$(deb_dir qemu-system-data)/usr/share/qemu" "$q/share/qemu"
    for f in "$(deb_dir seabios)"/usr/share/seabios/* "$(deb_dir ipxe-qemu)"/usr/lib/ipxe/qemu/*; do
        [ -e "$q/share/qemu/${f##*/}" ] || cp -L "$f" "$q/share/qemu/"
    done
    [ -f "$q/share/qemu/bios-256k.bin" ] || die "QEMU bundle: bios-256k.bin missing"
    # The loader is started explicitly, so the bundle does not depend on the
    # host's glibc; -L because QEMU cannot find its data next to ld.so.
    cat >"$q/bin/qemu-system-x86_64" <<'EOF'
#!/bin/sh
# Debian's qemu-system-x86_64, unpacked by tests/testhost/build.sh.
# readlink -f: the script may be called through a symlink.
D=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
QEMU_MODULE_DIR="$D/lib/qemu"
export QEMU_MODULE_DIR
exec "$D/lib/ld-linux-x86-64.so.2" --library-path "$D/lib" \
    "$D/libexec/qemu-system-x86_64" -L "$D/share/qemu" "$@"
EOF
    chmod 755 "$q/bin/qemu-system-x86_64"
    "$q/bin/qemu-system-x86_64" --version | head -n1 || die "the unpacked QEMU does not run"
    printf '%s\n' "$key" >"$q/bundle.key"
}

if [ -f "$OUT/build.stamp" ] && [ "$(cat "$OUT/build.stamp")" = "$STAMP" ] \
   && [ -f "$OUT/host.cpio.gz" ] && [ -f "$OUT/qemu-cmd" ]; then
    echo "test host up to date: $OUT/host.cpio.gz, QEMU $(cat "$OUT/qemu-cmd")"
    exit 0
fi
build_host
if command -v qemu-system-x86_64 >/dev/null 2>&1 && [ -z "$want_bundle" ]; then
    command -v qemu-system-x86_64 >"$OUT/qemu-cmd"
else
    if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
        echo "qemu-system-x86_64 is not on PATH: using Debian's QEMU unpacked under target/testhost/qemu"
    fi
    build_qemu_bundle
    if command -v qemu-system-x86_64 >/dev/null 2>&1; then
        command -v qemu-system-x86_64 >"$OUT/qemu-cmd"
    else
        echo "$OUT/qemu/bin/qemu-system-x86_64" >"$OUT/qemu-cmd"
    fi
fi
printf '%s\n' "$STAMP" >"$OUT/build.stamp"
echo "test host QEMU: $(cat "$OUT/qemu-cmd")"
