# ferry: the two commands a fresh machine needs are `make demo` and `make test`.
.PHONY: all build deps kit demo test lint unit integration bench clean

all: build

build:
	cargo build --release -p ferry

deps:
	tests/deps.sh

kit: deps
	tests/guest-kit/build.sh target/guest-kit

# Boot the demo guest headless and show its console (in the test host where the host's
# KVM has no hardware virtualization).
demo: deps
	tests/demo.sh

# The whole test suite: formatting and lints, unit tests, then guests booted on KVM.
test: deps lint unit integration

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

unit:
	cargo test --workspace

integration:
	tests/integration/run.sh

# Benchmarks print ratios against QEMU; they are not tests.
bench: deps
	tests/bench/boot/run.sh
	tests/bench/boot/run.sh --bios
	tests/bench/formats/run.sh
	tests/bench/io/run.sh
	tests/bench/medium/run.sh
	tests/bench/scsi/run.sh --rounds 3
	tests/bench/ahci/run.sh --rounds 3
	tests/bench/exits/run.sh

clean:
	cargo clean
