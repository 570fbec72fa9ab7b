//! The AHCI HBA with hostile guest memory and registers: command headers, command tables,
//! FISes, ATAPI packets and PRDTs all come from the input, as do register writes. The HBA
//! must answer, fail or ignore each command without panicking and without touching memory
//! outside the guest's.
//!
//! Input format: byte 0 is the number of register writes (mod 16) that follow as 5 bytes
//! each (byte: port register offset / 4 within port 0..3 or the generic block, then a
//! little-endian u32); then two little-endian u32: PxSACT and PxCI for every port; the rest
//! fills guest memory from address 0. Port p's command list is at p * 0x2000 and its
//! received-FIS area at p * 0x2000 + 0x1000. Port 0 is a disk behind an I/O engine, port 1
//! an ATAPI drive with a medium, port 2 a disk without an engine, port 3 empty.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use ferry_devices::ahci::{Ahci, AhciParams, Unit};
use ferry_devices::ata::{AtaDevice, AtaDiskParams, AtapiParams};
use ferry_devices::pci::PciDevice;
use ferry_devices::{LevelInterrupt, MsiSender};
use ferry_storage::io::{DeferredSubmit, EngineChoice, EngineOptions, IoEngine};
use ferry_storage::Disk;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEMORY: usize = 0x4_0000;
const SIZE: u64 = 1 << 20;

struct NoIrq;
impl LevelInterrupt for NoIrq {
    fn set_level(&self, _: bool) {}
}
impl MsiSender for NoIrq {
    fn send(&self, _: u64, _: u32) {}
}

fn disk(name: &str) -> Arc<Disk> {
    let p = std::env::temp_dir().join(format!("ferry-fuzz-ahci-{}-{name}.raw", std::process::id()));
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(SIZE))
        .expect("temporary image");
    Arc::new(Disk::open(&p, true, &[]).expect("raw image opens"))
}

fn ata_disk() -> AtaDevice {
    AtaDevice::disk(AtaDiskParams {
        size_bytes: SIZE,
        nonrotational: true,
        discard: true,
        read_only: false,
        model: "FERRY HARDDISK".into(),
        serial: "F0".into(),
        firmware: "1.0".into(),
        ncq: true,
    })
}

struct Machine {
    mem: GuestMemoryMmap,
    dev: Ahci,
}

fn machine() -> &'static Mutex<Machine> {
    static M: OnceLock<Mutex<Machine>> = OnceLock::new();
    M.get_or_init(|| {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).expect("memory");
        let irq = Arc::new(NoIrq);
        let mut dev = Ahci::new(AhciParams {
            memory: mem.clone(),
            msi: irq.clone(),
            intx: irq,
            intx_line: 11,
            ports: 4,
        })
        .expect("hba");
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
        dev.attach(
            0,
            Unit {
                device: ata_disk(),
                medium: Some(d0),
                engine: Some(engine),
            },
        )
        .expect("port 0");
        let mut cd = AtaDevice::atapi(AtapiParams {
            model: "FERRY DVD-ROM".into(),
            serial: "F1".into(),
            firmware: "1.0".into(),
        });
        if let Some(d) = cd.as_atapi_mut() {
            d.insert(SIZE);
        }
        dev.attach(
            1,
            Unit {
                device: cd,
                medium: Some(disk("1")),
                engine: None,
            },
        )
        .expect("port 1");
        dev.attach(
            2,
            Unit {
                device: ata_disk(),
                medium: Some(disk("2")),
                engine: None,
            },
        )
        .expect("port 2");
        Mutex::new(Machine { mem, dev })
    })
}

fn w(dev: &mut Ahci, off: u64, v: u32) {
    dev.bar_write(5, off, &v.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16);
    if rest.len() < n * 5 + 8 {
        return;
    }
    let (ops, rest) = rest.split_at(n * 5);
    let (issue, memory) = rest.split_at(8);
    let mut m = machine().lock().unwrap_or_else(|e| e.into_inner());
    let Machine { mem, dev } = &mut *m;
    // HBA reset: whatever the last run left running is orphaned.
    w(dev, 0x04, 1);
    let zeros = vec![0u8; MEMORY];
    mem.write_slice(&zeros, GuestAddress(0)).expect("in range");
    let len = memory.len().min(MEMORY);
    mem.write_slice(&memory[..len], GuestAddress(0)).expect("in range");
    w(dev, 0x04, 1 << 31 | 1 << 1);
    for p in 0..4u64 {
        let base = 0x100 + p * 0x80;
        w(dev, base, (p * 0x2000) as u32);
        w(dev, base + 0x08, (p * 0x2000 + 0x1000) as u32);
        w(dev, base + 0x14, u32::MAX);
        w(dev, base + 0x18, 1 << 4 | 1);
    }
    for op in ops.chunks_exact(5) {
        let off = u64::from(op[0]) * 4 % 0x300;
        w(dev, off, u32::from_le_bytes([op[1], op[2], op[3], op[4]]));
        if op[0] & 1 != 0 {
            dev.run_ports().into_iter().for_each(DeferredSubmit::submit);
        }
    }
    let sact = u32::from_le_bytes([issue[0], issue[1], issue[2], issue[3]]);
    let ci = u32::from_le_bytes([issue[4], issue[5], issue[6], issue[7]]);
    for p in 0..4u64 {
        let base = 0x100 + p * 0x80;
        w(dev, base + 0x34, sact);
        w(dev, base + 0x38, ci);
    }
    dev.run_ports().into_iter().for_each(DeferredSubmit::submit);
    for _ in 0..3 {
        std::thread::sleep(std::time::Duration::from_micros(200));
        dev.io_event(0);
        dev.run_ports().into_iter().for_each(DeferredSubmit::submit);
    }
});
