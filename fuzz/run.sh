#!/usr/bin/env bash
# Builds every fuzz target and runs each for N seconds (default 60), one after the other.
# Usage: fuzz/run.sh [SECONDS] [TARGET...]     (extra libFuzzer flags via FUZZ_ARGS="-jobs=2 ...")
# New inputs go to fuzz/corpus/<target>, crashes to fuzz/artifacts/<target>; the checked-in
# seeds in fuzz/seeds/<target> are read but never written.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
# cargo-fuzz passes -Z flags to rustc; the stable toolchain accepts them with this set.
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install cargo-fuzz" >&2; exit 1; }
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build

# Image targets start from small images qemu-img makes (whole, and cut to their metadata).
seed_images() {
    local t=$1 dir=corpus/$1 tmp
    [ -n "$(ls -A "$dir" 2>/dev/null)" ] && return 0
    command -v qemu-img >/dev/null || return 0
    tmp=$(mktemp -d)
    head -c 2097152 /dev/urandom >"$tmp/raw"
    dd if=/dev/zero of="$tmp/raw" bs=4096 seek=100 count=200 conv=notrunc status=none
    local fmts
    case $t in
        image_vdi) fmts="vdi" ;;
        image_vhd) fmts="vpc vpc:subformat=fixed" ;;
        image_vmdk) fmts="vmdk vmdk:subformat=streamOptimized vmdk:subformat=monolithicFlat" ;;
        image_parallels) fmts="parallels:cluster_size=4096" ;;
        *) fmts="vdi vpc vmdk vmdk:subformat=streamOptimized parallels:cluster_size=4096 raw" ;;
    esac
    for f in $fmts; do
        local name=${f%%:*} opts=${f#*:} out
        out="$tmp/${f//[:=]/_}"
        if [ "$opts" = "$f" ]; then opts=""; fi
        qemu-img convert -f raw -O "$name" ${opts:+-o "$opts"} "$tmp/raw" "$out" 2>/dev/null || continue
        cp "$out" "$dir/"
        head -c 65536 "$out" >"$dir/$(basename "$out").head"
    done
    rm -rf "$tmp"
}

status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    case $t in image_*) seed_images "$t" ;; esac
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    echo "=== $t: ${secs}s"
    # shellcheck disable=SC2086
    if ! cargo fuzz run "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -max_len=262144 -print_final_stats=1 ${FUZZ_ARGS:-}; then
        echo "=== $t FAILED: see fuzz/artifacts/$t" >&2
        status=1
    fi
done
exit $status
