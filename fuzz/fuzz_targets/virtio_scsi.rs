//! The virtio-scsi request path with hostile guest memory: descriptor tables, rings and
//! request buffers all come from the input, so chains loop, point outside guest memory, are
//! too short for their headers or carry any CDB. The device must answer or skip each chain
//! without panicking and without touching memory outside the guest's.
//!
//! Input format: byte 0 picks the queues to kick (bits 0..=3 kick queues 0..=3, then bits
//! 4..=7 kick them again); byte 1 the queue size (1..=16, a power of two) and whether
//! INDIRECT_DESC and EVENT_IDX are negotiated; the rest fills guest memory from address 0
//! (rings at 0x1000 + queue * 0x400; buffers anywhere).
#![no_main]

use std::sync::{Arc, OnceLock};

use ferry_devices::pci::PciDevice;
use ferry_devices::scsi::{CdParams, CdUnit, DiskParams, DiskUnit, LogicalUnit};
use ferry_devices::virtio::scsi::VirtioScsi;
use ferry_devices::virtio::{VirtioPci, VirtioPciParams};
use ferry_devices::{LevelInterrupt, MsiSender};
use ferry_storage::Disk;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEMORY: usize = 0x4_0000;

struct NoIrq;
impl LevelInterrupt for NoIrq {
    fn set_level(&self, _: bool) {}
}
impl MsiSender for NoIrq {
    fn send(&self, _: u64, _: u32) {}
}

/// One small raw image shared by every run (its content does not matter).
fn disk() -> Arc<Disk> {
    static DISK: OnceLock<Arc<Disk>> = OnceLock::new();
    DISK.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("ferry-fuzz-vscsi-{}.raw", std::process::id()));
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(1 << 20))
            .expect("temporary image");
        Arc::new(Disk::open(&p, true, &[]).expect("raw image opens"))
    })
    .clone()
}

fn w(dev: &mut VirtioPci, off: u64, v: u64, len: usize) {
    dev.bar_write(0, off, &v.to_le_bytes()[..len]);
}

fuzz_target!(|data: &[u8]| {
    let [kick, size, rest @ ..] = data else {
        return;
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).expect("memory");
    let n = rest.len().min(MEMORY);
    mem.write_slice(&rest[..n], GuestAddress(0)).expect("in range");

    let mut scsi = VirtioScsi::new(2);
    let unit = DiskUnit::new(DiskParams {
        size_bytes: 1 << 20,
        block_size: 512,
        nonrotational: false,
        discard: true,
        read_only: false,
        write_cache: true,
        vendor: "FERRY",
        product: "HARDDISK",
        serial: "F0".into(),
        wwn: 0,
    })
    .expect("disk unit");
    scsi.attach(0, LogicalUnit::Disk(unit), Some(disk()))
        .expect("port 0");
    let cd = CdUnit::new(CdParams {
        vendor: "FERRY",
        product: "DVD-ROM",
        serial: "F1".into(),
        atapi: false,
    });
    scsi.attach(1, LogicalUnit::Cd(cd), None).expect("port 1");
    let irq = Arc::new(NoIrq);
    let Ok(mut dev) = VirtioPci::new(
        Box::new(scsi),
        VirtioPciParams {
            memory: mem.clone(),
            msi: irq.clone(),
            intx: irq,
            intx_line: 16,
            class: (1, 0, 0),
        },
    ) else {
        return;
    };
    let qsize = 1u64 << (size % 5);
    w(&mut dev, 0x14, 3, 1);
    w(&mut dev, 0x08, 1, 4);
    w(&mut dev, 0x0c, 1, 4);
    w(&mut dev, 0x08, 0, 4);
    w(&mut dev, 0x0c, u64::from(*size & 0x30) << 24, 4); // sometimes EVENT_IDX / INDIRECT
    w(&mut dev, 0x14, 0xb, 1);
    for q in 0..4u64 {
        let base = 0x1000 + q * 0x400;
        w(&mut dev, 0x16, q, 2);
        w(&mut dev, 0x18, qsize, 2);
        w(&mut dev, 0x20, base, 8);
        w(&mut dev, 0x28, base + 0x100, 8);
        w(&mut dev, 0x30, base + 0x200, 8);
        w(&mut dev, 0x1c, 1, 2);
    }
    w(&mut dev, 0x14, 0xf, 1);
    for round in 0..2 {
        for q in 0..4usize {
            if kick & (1 << (q + 4 * round)) != 0 {
                dev.queue_notified(q);
            }
        }
    }
});
