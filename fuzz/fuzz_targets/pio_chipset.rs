//! The PC chipset on the port-I/O bus, driven by guest `in`/`out` instructions: every byte a
//! guest writes to a port is untrusted. The bus is assembled exactly as `vmm/src/machine.rs`
//! does it, with no-op interrupt and exit handles.
//!
//! Input format: a 4-byte preamble (cpus; guest memory above 32 MiB in 256 MiB, then in 1 MiB
//! units; one unused byte), then
//! a sequence of operations, each starting with one control byte:
//!
//! ```text
//! ctrl bits 0..=1  kind: 0 read, 1 write, 2 console input, 3 read or write at a raw port
//! ctrl bits 2..=3  size: 1, 2, 4, 4 (kinds 0, 1, 3; bit 7 picks write for kind 3)
//! ctrl bits 4..=6  device for kinds 0/1: serial, i8042, cmos, acpi pm, pvpanic, pci, pci, pci
//! next byte        kinds 0/1: offset from the device's base, minus 2 (so it probes both edges)
//! next 2 bytes     kind 3: port, little endian, taken modulo 0x1000
//! next `size` bytes   data for writes
//! kind 2: one length byte, then that many bytes (at most 32) typed on the console
//! ```
#![no_main]

use std::sync::{Arc, Mutex};

use ferry_devices::acpi_pm::{self, AcpiPm};
use ferry_devices::bus::lock;
use ferry_devices::cmos::{self, Cmos};
use ferry_devices::i8042::{self, I8042};
use ferry_devices::pci::{self, host_bridge, DevFn, PciConfigIo, PciRoot};
use ferry_devices::pvpanic::{self, PvPanic};
use ferry_devices::serial::{self, Serial};
use ferry_devices::{Bus, EdgeInterrupt, ExitHandle, ExitRequest};
use ferry_firmware::MemoryMap;
use libfuzzer_sys::fuzz_target;

struct NoIrq;
impl EdgeInterrupt for NoIrq {
    fn trigger(&self) {}
}

struct NoExit;
impl ExitHandle for NoExit {
    fn request_exit(&self, _why: ExitRequest) {}
}

/// (base, len) of each device, in the order the control byte selects them.
const DEVICES: [(u64, u64); 8] = [
    (serial::COM1_PORT, serial::UART_PORT_LEN),
    (i8042::I8042_BASE, i8042::I8042_LEN),
    (cmos::CMOS_PORT, cmos::CMOS_LEN),
    (acpi_pm::PM_BASE, acpi_pm::PM_LEN),
    (pvpanic::PVPANIC_PORT, 1),
    (pci::PCI_CONFIG_IO_BASE, pci::PCI_CONFIG_IO_LEN),
    (pci::PCI_CONFIG_IO_BASE, pci::PCI_CONFIG_IO_LEN),
    (pci::PCI_CONFIG_IO_BASE, pci::PCI_CONFIG_IO_LEN),
];

/// The port bus of `machine.rs`, plus a handle on the UART for console input.
fn chipset(memory: u64, cpus: u8) -> (Bus, Arc<Mutex<Serial>>) {
    let map = MemoryMap::new(memory).expect("valid memory size");
    let exit: Arc<dyn ExitHandle> = Arc::new(NoExit);
    let mut pio = Bus::new();
    let serial = Arc::new(Mutex::new(Serial::new(
        Arc::new(NoIrq),
        Box::new(std::io::sink()),
    )));
    pio.insert(serial::COM1_PORT, serial::UART_PORT_LEN, serial.clone())
        .unwrap();
    let kbd = I8042::new(Arc::new(NoIrq), exit.clone());
    pio.insert(
        i8042::I8042_BASE,
        i8042::I8042_LEN,
        Arc::new(Mutex::new(kbd)),
    )
    .unwrap();
    let rtc = Cmos::new(
        cmos::MemoryLayout {
            low_end: map.low_end,
            high_size: map.high_size,
        },
        cpus,
    );
    pio.insert(cmos::CMOS_PORT, cmos::CMOS_LEN, Arc::new(Mutex::new(rtc)))
        .unwrap();
    pio.insert(
        acpi_pm::PM_BASE,
        acpi_pm::PM_LEN,
        Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
    )
    .unwrap();
    pio.insert(
        pvpanic::PVPANIC_PORT,
        1,
        Arc::new(Mutex::new(PvPanic::new(exit.clone()))),
    )
    .unwrap();
    let mut root = PciRoot::new();
    root.add(DevFn::new(0, 0), Arc::new(Mutex::new(host_bridge())));
    let _ = root.describe();
    pio.insert(
        pci::PCI_CONFIG_IO_BASE,
        pci::PCI_CONFIG_IO_LEN,
        Arc::new(Mutex::new(PciConfigIo::new(Arc::new(root), exit))),
    )
    .unwrap();
    (pio, serial)
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b
    }
}

fn access(pio: &Bus, port: u64, size: usize, write: bool, input: &mut Input) {
    let mut buf = [0u8; 4];
    let data = &mut buf[..size];
    if write {
        let src = input.bytes(size);
        data[..src.len()].copy_from_slice(src);
        pio.write(port, data);
    } else {
        pio.read(port, data);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let cpus = input.byte().unwrap_or(0).max(1);
    // 32 MiB up to 64 GiB: the CMOS reports the size, and sizes above 3 GiB have high RAM.
    let memory = (32u64 << 20)
        + (u64::from(input.byte().unwrap_or(0)) << 28)
        + (u64::from(input.byte().unwrap_or(0)) << 20);
    let _ = input.byte();
    let (pio, serial) = chipset(memory, cpus);

    while let Some(ctrl) = input.byte() {
        let size = [1, 2, 4, 4][usize::from((ctrl >> 2) & 3)];
        match ctrl & 3 {
            kind @ (0 | 1) => {
                let (base, _) = DEVICES[usize::from((ctrl >> 4) & 7)];
                let Some(off) = input.byte() else { break };
                let port = (base + u64::from(off)).wrapping_sub(2);
                access(&pio, port, size, kind == 1, &mut input);
            }
            2 => {
                let n = usize::from(input.byte().unwrap_or(0) & 31);
                let bytes = input.bytes(n).to_vec();
                let mut s = lock(&serial);
                let room = s.input_room();
                let fed = s.enqueue_input(&bytes);
                assert!(fed <= bytes.len() && fed <= room);
            }
            _ => {
                let lo = input.byte().unwrap_or(0);
                let hi = input.byte().unwrap_or(0);
                let port = u64::from(u16::from_le_bytes([lo, hi])) & 0xfff;
                access(&pio, port, size, ctrl & 0x80 != 0, &mut input);
            }
        }
    }
});
