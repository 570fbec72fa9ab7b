#!/bin/sh
# ferry's ahci against QEMU's nearest model and host fio: see tests/bench/controller.sh.
# Usage: tests/bench/ahci/run.sh [--runtime SECONDS] [--size MIB] [--rounds N]
exec "$(dirname "$0")/../controller.sh" --controller ahci "$@"
