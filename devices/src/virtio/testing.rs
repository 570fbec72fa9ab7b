//! A minimal virtio driver for unit tests: split rings in plain guest memory, one request at
//! a time, driven through the PCI transport's registers exactly as a guest driver would.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{VirtioDevice, VirtioPci, VirtioPciParams};
use crate::interrupt::{LevelInterrupt, MsiSender};
use crate::pci::PciDevice;

const QUEUE_SIZE: u16 = 16;
const RINGS: u64 = 0x1_0000;
const BUFFERS: u64 = 0x10_0000;
const MEMORY: usize = 0x100_0000;

#[derive(Default)]
pub struct Line(pub AtomicBool);
impl LevelInterrupt for Line {
    fn set_level(&self, a: bool) {
        self.0.store(a, Ordering::SeqCst);
    }
}

#[derive(Default)]
pub struct Msis(pub Mutex<Vec<(u64, u32)>>);
impl MsiSender for Msis {
    fn send(&self, a: u64, d: u32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((a, d));
    }
}

pub struct Driver {
    pub mem: GuestMemoryMmap,
    pub dev: VirtioPci,
    pub line: Arc<Line>,
    used_seen: Vec<u16>,
}

fn ring_base(q: usize) -> u64 {
    RINGS + q as u64 * 0x1000
}

impl Driver {
    /// Guest memory for a driver (devices that need it at construction get a clone).
    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap()
    }

    /// Negotiates VERSION_1 plus `features` and enables every queue.
    pub fn new(device: Box<dyn VirtioDevice>, features: u64) -> Self {
        Self::with_memory(Self::memory(), device, features)
    }

    pub fn with_memory(mem: GuestMemoryMmap, device: Box<dyn VirtioDevice>, features: u64) -> Self {
        let line = Arc::new(Line::default());
        let mut dev = VirtioPci::new(
            device,
            VirtioPciParams {
                memory: mem.clone(),
                msi: Arc::new(Msis::default()),
                intx: line.clone(),
                intx_line: 16,
                class: (1, 0, 0),
            },
        )
        .unwrap();
        let w = |dev: &mut VirtioPci, off: u64, v: u64, len: usize| {
            dev.bar_write(0, off, &v.to_le_bytes()[..len])
        };
        w(&mut dev, 0x14, 3, 1);
        let all = features | super::F_VERSION_1;
        w(&mut dev, 0x08, 0, 4);
        w(&mut dev, 0x0c, all & 0xffff_ffff, 4);
        w(&mut dev, 0x08, 1, 4);
        w(&mut dev, 0x0c, all >> 32, 4);
        w(&mut dev, 0x14, 0xb, 1);
        let n = dev.queue_count();
        for q in 0..n {
            let base = ring_base(q);
            w(&mut dev, 0x16, q as u64, 2);
            w(&mut dev, 0x18, u64::from(QUEUE_SIZE), 2);
            w(&mut dev, 0x20, base, 8);
            w(&mut dev, 0x28, base + 0x100, 8);
            w(&mut dev, 0x30, base + 0x200, 8);
            w(&mut dev, 0x1c, 1, 2);
        }
        w(&mut dev, 0x14, 0xf, 1);
        Self {
            mem,
            dev,
            line,
            used_seen: vec![0; n],
        }
    }

    /// Posts one chain: `out` buffers the device reads, then writable buffers of `in_lens`
    /// bytes; rings the doorbell. Returns the used length, or None if the device left the
    /// chain unused, and the writable buffers' contents.
    pub fn request(
        &mut self,
        q: usize,
        out: &[&[u8]],
        in_lens: &[usize],
    ) -> (Option<u32>, Vec<Vec<u8>>) {
        let base = ring_base(q);
        let mut addr = BUFFERS;
        let mut descs: Vec<(u64, u32, u16)> = Vec::new();
        for b in out {
            self.mem.write_slice(b, GuestAddress(addr)).unwrap();
            descs.push((addr, b.len() as u32, 0));
            addr += (b.len() as u64).next_multiple_of(16).max(16);
        }
        let mut ins = Vec::new();
        for &l in in_lens {
            self.mem
                .write_slice(&vec![0xee; l], GuestAddress(addr))
                .unwrap();
            descs.push((addr, l as u32, 2));
            ins.push((addr, l));
            addr += (l as u64).next_multiple_of(16).max(16);
        }
        let n = descs.len();
        for (i, (a, l, f)) in descs.into_iter().enumerate() {
            let next = if i + 1 < n { 1 } else { 0 };
            let raw: [u64; 2] = [
                a,
                u64::from(l) | (u64::from(f | next) << 32) | ((i as u64 + 1) << 48),
            ];
            self.mem
                .write_obj(raw, GuestAddress(base + 16 * i as u64))
                .unwrap();
        }
        let idx: u16 = self.mem.read_obj(GuestAddress(base + 0x102)).unwrap();
        self.mem
            .write_obj(
                0u16,
                GuestAddress(base + 0x104 + 2 * u64::from(idx % QUEUE_SIZE)),
            )
            .unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(base + 0x102))
            .unwrap();
        self.dev.queue_notified(q);
        let mut used: u16 = self.mem.read_obj(GuestAddress(base + 0x202)).unwrap();
        // Requests on an I/O engine finish later: poll the device's event sources a while.
        let events = self.dev.device_events().len();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while used == self.used_seen[q] && events > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
            for i in 0..events {
                self.dev.device_event(i);
            }
            used = self.mem.read_obj(GuestAddress(base + 0x202)).unwrap();
        }
        let len = if used != self.used_seen[q] {
            let slot = u64::from(self.used_seen[q] % QUEUE_SIZE);
            self.used_seen[q] = used;
            Some(
                self.mem
                    .read_obj::<u32>(GuestAddress(base + 0x204 + 8 * slot + 4))
                    .unwrap(),
            )
        } else {
            None
        };
        let contents = ins
            .into_iter()
            .map(|(a, l)| {
                let mut v = vec![0u8; l];
                self.mem.read_slice(&mut v, GuestAddress(a)).unwrap();
                v
            })
            .collect();
        (len, contents)
    }
}
