#!/bin/bash
# Image-format benchmark on the host (no guest): ferry's image layer (raw, VDI,
# VHD, VMDK, Parallels) through ferry_storage::Disk, on fresh images in one
# scratch folder: sequential 1 MiB writes (allocating) and reads, random 4 KiB
# reads, random 4 KiB overwrites, random 4 KiB writes into a fresh image.
# Prints MB/s or IOPS per format and phase, the ratios format/raw and the goal
# check (information only). See tests/bench/src/formats.rs.
#
# Usage: tests/bench/formats/run.sh [--size SIZE] [--ops N] [--runs N] [--json]
#            [--dir DIR] [-- FORMAT-BENCH-ARGS...]
#   --size SIZE   virtual size of each image (default 1G; e.g. 256M on a busy
#                 machine); two images of this size per format at a time
#   --ops N       operations per random 4 KiB phase (default 20000)
#   --runs N      repeat everything N times, formats taking turns; medians
#                 (default 1)
#   --json        print the results as JSON instead of the table
#   --dir DIR     scratch folder (default target/bench/formats); every image,
#                 raw included, lives there, so all share one file system
#   after --      passed on to format-bench (e.g. --formats vdi,vhd, --keep,
#                 --no-drop-caches, --seed N)
# As root the host page cache is dropped before every phase (reads then come
# from the disk); otherwise the output says that reads may come from the cache.
# The JSON results are also left in target/bench/formats.json.
# Exit status: format-bench's (non-zero only if raw could not be measured or a
# format returned wrong data).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
die() { echo "bench/formats: $*" >&2; exit 2; }

size=1G ops=20000 runs=1 json="" dir=""
extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --size) size=${2:?--size needs a value}; shift 2 ;;
        --ops) ops=${2:?--ops needs a number}; shift 2 ;;
        --runs) runs=${2:?--runs needs a number}; shift 2 ;;
        --json) json=1; shift ;;
        --dir) dir=${2:?--dir needs a folder}; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case $ops in ''|*[!0-9]*|0) die "--ops needs a positive number" ;; esac
case $runs in ''|*[!0-9]*|0) die "--runs needs a positive number" ;; esac

cd "$REPO"
OUT="$REPO/target/bench"
[ -n "$dir" ] || dir="$OUT/formats"
mkdir -p "$OUT" "$dir"
dir=$(cd "$dir" && pwd)
rm -f "$OUT/formats.json"

echo "bench/formats: building format-bench (cargo build --release)"
cargo build --release -p ferry-bench --bin format-bench

echo "bench/formats: scratch images in $dir (removed after each format; pass -- --keep to keep them)"
df -hT "$dir" | sed 's/^/bench\/formats:   /'
if [ "$(id -u)" != 0 ]; then
    echo "bench/formats: not root: the page cache cannot be dropped between phases; reads may come from it"
fi

json_flag=()
[ -z "$json" ] || json_flag=(--json)
set +e
target/release/format-bench --dir "$dir" --size "$size" --ops "$ops" --runs "$runs" \
    --json-out "$OUT/formats.json" "${json_flag[@]}" "${extra[@]}"
rc=$?
set -e
[ -f "$OUT/formats.json" ] && echo "bench/formats: JSON results in $OUT/formats.json" >&2
exit $rc
