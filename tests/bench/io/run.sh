#!/bin/bash
# I/O engine benchmark on the host (no guest): ferry's engine (ferry_storage::io)
# against fio on the same raw file with the same queue depth, for 4 KiB random and
# 1 MiB sequential reads and writes, host cache on (buffered) and off (O_DIRECT).
# Prints IOPS and MB/s of both and the ratio ferry/fio, and the goal check
# (>= 0.90, information only). With --format vdi: a dynamic VDI through the image layer
# (O_DIRECT on the image file with the cache off) against `qemu-img bench -f vdi`.
# See tests/bench/src/io.rs.
#
# Usage: tests/bench/io/run.sh [--size SIZE] [--runtime SECS] [--runs N]
#            [--dir DIR] [--format raw|vdi] [-- IO-BENCH-ARGS...]
#   --size SIZE     size of the test file (default 1G)
#   --runtime SECS  seconds per job and tool (default 3)
#   --runs N        repeats per job, fio and ferry alternating; medians (default 3)
#   --dir DIR       folder of the test file (default target/bench/io)
#   --format F      raw (default, against fio) or vdi (against qemu-img bench)
#   after --        passed on to io-bench (e.g. --qd 64, --cache off,
#                   --jobs randread,read, --engine threads)
# fio is installed with apt-get when missing and this runs as root.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
die() { echo "bench/io: $*" >&2; exit 2; }

size=1G runtime=3 runs=3 dir="" format=raw
extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --size) size=${2:?--size needs a value}; shift 2 ;;
        --runtime) runtime=${2:?--runtime needs seconds}; shift 2 ;;
        --runs) runs=${2:?--runs needs a number}; shift 2 ;;
        --dir) dir=${2:?--dir needs a folder}; shift 2 ;;
        --format) format=${2:?--format needs raw or vdi}; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

cd "$REPO"
[ -n "$dir" ] || dir="$REPO/target/bench/io"
mkdir -p "$dir"

if ! command -v fio >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        echo "bench/io: installing fio"
        apt-get install -y fio >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y fio >/dev/null; }
    else
        die "fio is missing: apt-get install -y fio (as root)"
    fi
fi

echo "bench/io: building io-bench (cargo build --release)"
cargo build --release -p ferry-bench --bin io-bench
df -hT "$dir" | sed 's/^/bench\/io:   /'
exec target/release/io-bench --file "$dir/bench.$format" --format "$format" --size "$size" \
    --runtime "$runtime" --runs "$runs" "${extra[@]}"
