#!/bin/sh
# ferry's virtio-scsi against QEMU's nearest model and host fio: see tests/bench/controller.sh.
# Usage: tests/bench/scsi/run.sh [--runtime SECONDS] [--size MIB] [--rounds N]
exec "$(dirname "$0")/../controller.sh" --controller virtio-scsi "$@"
