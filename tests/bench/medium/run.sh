#!/bin/bash
# `ferry medium clone` against `qemu-img convert` on the host (no guest): the same
# source file, the same target format, in one scratch folder, taking turns.
# Prints median seconds per tool and pair and the ratio qemu-img/ferry (the
# issue's goal: at least 1.5). See tests/bench/src/medium.rs.
#
# Usage: tests/bench/medium/run.sh [--size SIZE] [--runs N] [--pairs LIST]
#            [--dir DIR]
#   --size SIZE   virtual size of the source disk (default 1G)
#   --runs N      timed runs per tool and pair, medians (default 3)
#   --pairs LIST  e.g. vdi:vdi,vmdk:vdi (default: each format to itself and
#                 a few conversions)
#   --dir DIR     scratch folder (default target/bench/medium)
# The JSON results are also left in target/bench/medium.json.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
die() { echo "bench/medium: $*" >&2; exit 2; }
command -v qemu-img >/dev/null || die "qemu-img not found (tests/deps.sh installs it)"

args=()
dir=""
while [ $# -gt 0 ]; do
    case $1 in
        --size|--runs|--pairs) args+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
        --dir) dir=${2:?--dir needs a folder}; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

cd "$REPO"
OUT="$REPO/target/bench"
[ -n "$dir" ] || dir="$OUT/medium"
mkdir -p "$OUT" "$dir"

echo "bench/medium: building ferry and medium-bench (cargo build --release)"
cargo build --release -p ferry -p ferry-bench --bin ferry --bin medium-bench
echo "bench/medium: $(qemu-img --version | head -1); $(nproc) cores; scratch in $dir"
df -hT "$dir" | sed 's/^/bench\/medium:   /'

set +e
target/release/medium-bench --ferry target/release/ferry --dir "$dir" \
    --json-out "$OUT/medium.json" "${args[@]}"
rc=$?
set -e
rm -f "$dir"/source.*
[ -f "$OUT/medium.json" ] && echo "bench/medium: JSON results in $OUT/medium.json" >&2
exit $rc
