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
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    echo "=== $t: ${secs}s"
    # shellcheck disable=SC2086
    if ! cargo fuzz run "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -print_final_stats=1 ${FUZZ_ARGS:-}; then
        echo "=== $t FAILED: see fuzz/artifacts/$t" >&2
        status=1
    fi
done
exit $status
