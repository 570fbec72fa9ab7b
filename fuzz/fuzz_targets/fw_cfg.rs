//! The fw_cfg device on the port bus, as `FW_CFG_PORT` puts it, with guest memory that the
//! DMA interface reads its requests from and copies items into. Port accesses and DMA control
//! structures come from the input; the device must never panic, and a DMA request started
//! with one 64-bit write must end with its control word 0 or ERROR.
//!
//! Guest memory: 0..0x10000 and 0x11000..0x20000 (a hole between, to straddle).
//! Input: a sequence of operations, each starting with one control byte:
//!
//! ```text
//! ctrl bits 0..=1  kind: 0 port read, 1 port write, 2 DMA request, 3 select a known key
//! ctrl bits 2..=3  kinds 0/1: size 1, 2, 4, 8
//! next byte        kinds 0/1: port offset from FW_CFG_PORT, minus 2 (so it probes both edges)
//! next `size` bytes   data for writes
//! kind 2: 3 bytes structure address (LE, taken modulo 0x20000), 4 bytes control (BE),
//!         2 bytes length (LE; ctrl bit 4: 4 bytes), 3 bytes destination (LE, modulo 0x20000;
//!         ctrl bit 5: 8 raw bytes); ctrl bit 7 starts it with one 64-bit write at 0x514,
//!         otherwise with the low half alone at 0x518
//! kind 3: one byte, indexing a table of keys (items, files, absent ones)
//! ```
#![no_main]

use std::sync::{Arc, Mutex};

use ferry_devices::fw_cfg::{keys, FwCfg, FW_CFG_PORT, FW_CFG_PORT_LEN};
use ferry_devices::Bus;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_MASK: u64 = 0x1_ffff;

/// Keys worth selecting: the device's own, the caller's, the files, absent ones and the
/// old write-channel bit.
const KEYS: [u16; 12] = [
    keys::SIGNATURE,
    keys::ID,
    keys::FILE_DIR,
    keys::NB_CPUS,
    0x8003,
    0x0020,
    0x0021,
    0x0022,
    0x0023,
    0x0024,
    0x4022,
    0x3fff,
];

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    /// `N` bytes, zero-padded when the input runs out.
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.byte().unwrap_or(0);
        }
        out
    }
    fn le(&mut self, n: usize) -> u64 {
        let mut v = 0u64;
        for i in 0..n {
            v |= u64::from(self.byte().unwrap_or(0)) << (8 * i);
        }
        v
    }
}

fn device() -> (Bus, GuestMemoryMmap) {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x11000), 0xf000),
    ])
    .expect("valid guest memory");
    let mut dev = FwCfg::new(mem.clone());
    dev.add_file("bootorder", b"/pci@i0cf8/ide@1,1/drive@0/disk@0\0".to_vec())
        .unwrap();
    dev.add_file("etc/e820", (0u8..20).collect()).unwrap();
    // Longer than one zero-fill chunk.
    dev.add_file("etc/table-loader", (0..5000).map(|i| i as u8).collect())
        .unwrap();
    dev.add_file("opt/empty", Vec::new()).unwrap();
    dev.add_item(keys::NB_CPUS, 2u16.to_le_bytes().to_vec())
        .unwrap();
    dev.add_item(0x8003, vec![0xe8; 40]).unwrap();
    let mut pio = Bus::new();
    pio.insert(FW_CFG_PORT, FW_CFG_PORT_LEN, Arc::new(Mutex::new(dev)))
        .unwrap();
    (pio, mem)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let (pio, mem) = device();

    while let Some(ctrl) = input.byte() {
        match ctrl & 3 {
            kind @ (0 | 1) => {
                let size = [1, 2, 4, 8][usize::from((ctrl >> 2) & 3)];
                let Some(off) = input.byte() else { break };
                let port = (FW_CFG_PORT + u64::from(off)).wrapping_sub(2);
                let mut buf = [0u8; 8];
                let buf = &mut buf[..size];
                if kind == 1 {
                    for b in buf.iter_mut() {
                        *b = input.byte().unwrap_or(0);
                    }
                    pio.write(port, buf);
                } else {
                    pio.read(port, buf);
                }
            }
            2 => {
                let at = input.le(3) & MEM_MASK;
                let control: [u8; 4] = input.array();
                let length = input.le(if ctrl & 0x10 != 0 { 4 } else { 2 }) as u32;
                let dst = if ctrl & 0x20 != 0 {
                    u64::from_le_bytes(input.array())
                } else {
                    input.le(3) & MEM_MASK
                };
                let mut s = [0u8; 16];
                s[..4].copy_from_slice(&control);
                s[4..8].copy_from_slice(&length.to_be_bytes());
                s[8..].copy_from_slice(&dst.to_be_bytes());
                // Parts of a structure in the hole or past the end stay unwritten.
                for (i, b) in s.iter().enumerate() {
                    let _ = mem.write_obj(*b, GuestAddress(at + i as u64));
                }
                if ctrl & 0x80 != 0 {
                    assert!(pio.write(FW_CFG_PORT + 4, &at.to_be_bytes()));
                    if let Ok(status) = mem.read_obj::<[u8; 4]>(GuestAddress(at)) {
                        let status = u32::from_be_bytes(status);
                        assert!(status <= 1, "DMA status {status:#x} at {at:#x}");
                    }
                } else {
                    assert!(pio.write(FW_CFG_PORT + 8, &(at as u32).to_be_bytes()));
                }
            }
            _ => {
                let key = KEYS[usize::from(input.byte().unwrap_or(0)) % KEYS.len()];
                assert!(pio.write(FW_CFG_PORT, &key.to_le_bytes()));
            }
        }
    }
});
