//! The virtio-scsi request path with hostile guest memory: descriptor tables, rings and
//! request buffers all come from the input, so chains loop, point outside guest memory, are
//! too short for their headers or carry any CDB. The device must answer or skip each chain
//! without panicking and without touching memory outside the guest's.
//!
//! Input format: byte 0 picks the queues to kick (bits 0..=3 kick queues 0..=3, then bits
//! 4..=7 kick them again); byte 1 the queue size (1..=16, a power of two) and whether
//! INDIRECT_DESC and EVENT_IDX are negotiated; the rest fills guest memory from address 0
//! (queue q's descriptor table at q * 0x300, its available ring 0x100 and used ring 0x140
//! after that; buffers anywhere). fuzz/seeds/virtio_scsi has well-formed requests to start
//! from.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use ferry_devices::pci::PciDevice;
use ferry_devices::scsi::{CdParams, CdUnit, DiskParams, DiskUnit, LogicalUnit};
use ferry_devices::virtio::scsi::VirtioScsi;
use ferry_devices::virtio::{VirtioPci, VirtioPciParams};
use ferry_devices::{LevelInterrupt, MsiSender};
use ferry_storage::io::{EngineChoice, EngineOptions, IoEngine};
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

/// One small raw image (its content does not matter).
fn disk(name: &str) -> Arc<Disk> {
    let p = std::env::temp_dir().join(format!("ferry-fuzz-vscsi-{}-{name}.raw", std::process::id()));
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(1 << 20))
        .expect("temporary image");
    Arc::new(Disk::open(&p, true, &[]).expect("raw image opens"))
}

fn disk_unit() -> LogicalUnit {
    LogicalUnit::Disk(
        DiskUnit::new(DiskParams {
            size_bytes: 1 << 20,
            block_size: 512,
            nonrotational: false,
            discard: true,
            read_only: false,
            write_cache: false, // every write is FUA: the write-then-flush path runs too
            vendor: "FERRY",
            product: "HARDDISK",
            serial: "F0".into(),
            wwn: 0,
        })
        .expect("disk unit"),
    )
}

/// The device lives across runs, as in a VM: each run resets it (the driver writes status 0)
/// and sets it up again over new guest memory contents.
struct Machine {
    mem: GuestMemoryMmap,
    dev: VirtioPci,
}

fn machine() -> &'static Mutex<Machine> {
    static M: OnceLock<Mutex<Machine>> = OnceLock::new();
    M.get_or_init(|| {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).expect("memory");
        let mut scsi = VirtioScsi::new(2);
        // Port 0 through an I/O engine (asynchronous), port 2 inline, port 1 an empty drive.
        let d0 = disk("0");
        let engine = IoEngine::new(
            d0.clone(),
            mem.clone(),
            EngineOptions {
                engine: EngineChoice::ThreadPool,
                threads: 1,
                discard: true,
                ..Default::default()
            },
        )
        .expect("engine");
        scsi.attach(0, disk_unit(), Some(d0), Some(engine))
            .expect("port 0");
        let cd = CdUnit::new(CdParams {
            vendor: "FERRY",
            product: "DVD-ROM",
            serial: "F1".into(),
            atapi: false,
        });
        scsi.attach(1, LogicalUnit::Cd(cd), None, None)
            .expect("port 1");
        scsi.attach(2, disk_unit(), Some(disk("2")), None)
            .expect("port 2");
        let irq = Arc::new(NoIrq);
        let dev = VirtioPci::new(
            Box::new(scsi),
            VirtioPciParams {
                memory: mem.clone(),
                msi: irq.clone(),
                intx: irq,
                intx_line: 16,
                class: (1, 0, 0),
            },
        )
        .expect("transport");
        Mutex::new(Machine { mem, dev })
    })
}

fn w(dev: &mut VirtioPci, off: u64, v: u64, len: usize) {
    dev.bar_write(0, off, &v.to_le_bytes()[..len]);
}

fuzz_target!(|data: &[u8]| {
    let [kick, size, rest @ ..] = data else {
        return;
    };
    let mut m = machine().lock().unwrap_or_else(|e| e.into_inner());
    let Machine { mem, dev } = &mut *m;
    // Reset first: requests of the last run that are still on the engine complete into
    // nothing once the device is reset.
    w(dev, 0x14, 0, 1);
    let zeros = vec![0u8; MEMORY];
    mem.write_slice(&zeros, GuestAddress(0)).expect("in range");
    let n = rest.len().min(MEMORY);
    mem.write_slice(&rest[..n], GuestAddress(0)).expect("in range");
    let qsize = 1u64 << (size % 5);
    w(dev, 0x14, 3, 1);
    w(dev, 0x08, 1, 4);
    w(dev, 0x0c, 1, 4);
    w(dev, 0x08, 0, 4);
    w(dev, 0x0c, u64::from(*size & 0x30) << 24, 4); // sometimes EVENT_IDX / INDIRECT
    w(dev, 0x14, 0xb, 1);
    for q in 0..4u64 {
        let base = q * 0x300;
        w(dev, 0x16, q, 2);
        w(dev, 0x18, qsize, 2);
        w(dev, 0x20, base, 8);
        w(dev, 0x28, base + 0x100, 8);
        w(dev, 0x30, base + 0x140, 8);
        w(dev, 0x1c, 1, 2);
    }
    w(dev, 0x14, 0xf, 1);
    for round in 0..2 {
        for q in 0..4usize {
            if kick & (1 << (q + 4 * round)) != 0 {
                dev.queue_notified(q);
            }
        }
        // Let the engine finish what it took, as the event loop would.
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_micros(200));
            dev.device_event(0);
        }
    }
});
