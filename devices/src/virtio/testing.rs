//! A minimal virtio driver for unit tests: split rings in plain guest memory, driven through
//! the PCI transport's registers exactly as a guest driver would. Requests go one at a time
//! (`request`), or several are posted before any is waited for (`post`, `complete`).

use std::collections::HashMap;
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
    /// Used elements read from the rings and not yet claimed: (queue, head) -> length.
    used: HashMap<(usize, u16), u32>,
    /// Where the next posted chain's descriptors and buffers go (reset when none is
    /// outstanding).
    next_desc: Vec<u16>,
    next_buf: u64,
    outstanding: usize,
}

/// A chain posted and not yet completed.
pub struct Posted {
    q: usize,
    head: u16,
    ins: Vec<(u64, usize)>,
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
            used: HashMap::new(),
            next_desc: vec![0; n],
            next_buf: BUFFERS,
            outstanding: 0,
        }
    }

    /// Posts one chain and waits for it: `out` buffers the device reads, then writable
    /// buffers of `in_lens` bytes. Returns the used length, or None if the device left the
    /// chain unused, and the writable buffers' contents.
    pub fn request(
        &mut self,
        q: usize,
        out: &[&[u8]],
        in_lens: &[usize],
    ) -> (Option<u32>, Vec<Vec<u8>>) {
        let p = self.post(q, out, in_lens);
        self.complete(p)
    }

    /// Posts one chain and rings the doorbell, without waiting for the device's answer.
    pub fn post(&mut self, q: usize, out: &[&[u8]], in_lens: &[usize]) -> Posted {
        if self.outstanding == 0 {
            self.next_buf = BUFFERS;
            self.next_desc.fill(0);
        }
        self.outstanding += 1;
        let base = ring_base(q);
        let mut addr = self.next_buf;
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
        self.next_buf = addr;
        let head = self.next_desc[q];
        let n = descs.len();
        assert!(
            usize::from(head) + n <= usize::from(QUEUE_SIZE),
            "descriptor table full"
        );
        self.next_desc[q] += n as u16;
        for (i, (a, l, f)) in descs.into_iter().enumerate() {
            let next = if i + 1 < n { 1 } else { 0 };
            let index = u64::from(head) + i as u64;
            let raw: [u64; 2] = [
                a,
                u64::from(l) | (u64::from(f | next) << 32) | ((index + 1) << 48),
            ];
            self.mem
                .write_obj(raw, GuestAddress(base + 16 * index))
                .unwrap();
        }
        let idx: u16 = self.mem.read_obj(GuestAddress(base + 0x102)).unwrap();
        self.mem
            .write_obj(
                head,
                GuestAddress(base + 0x104 + 2 * u64::from(idx % QUEUE_SIZE)),
            )
            .unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(base + 0x102))
            .unwrap();
        self.dev.queue_notified(q);
        Posted { q, head, ins }
    }

    /// The used length of a posted chain if the device has answered it, without letting the
    /// device look at its event sources.
    pub fn answered(&mut self, p: &Posted) -> Option<u32> {
        self.read_used(p.q);
        self.used.get(&(p.q, p.head)).copied()
    }

    /// Waits for a posted chain: requests on an I/O engine finish later, so the device's
    /// event sources are polled a while. Returns what `request` does.
    pub fn complete(&mut self, p: Posted) -> (Option<u32>, Vec<Vec<u8>>) {
        let events = self.dev.device_events().len();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.answered(&p).is_none() && events > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
            for i in 0..events {
                self.dev.device_event(i);
            }
        }
        self.outstanding -= 1;
        let len = self.used.remove(&(p.q, p.head));
        let contents = p
            .ins
            .into_iter()
            .map(|(a, l)| {
                let mut v = vec![0u8; l];
                self.mem.read_slice(&mut v, GuestAddress(a)).unwrap();
                v
            })
            .collect();
        (len, contents)
    }

    /// Moves queue `q`'s new used elements into `used`.
    fn read_used(&mut self, q: usize) {
        let base = ring_base(q);
        let used: u16 = self.mem.read_obj(GuestAddress(base + 0x202)).unwrap();
        while self.used_seen[q] != used {
            let slot = u64::from(self.used_seen[q] % QUEUE_SIZE);
            let elem = base + 0x204 + 8 * slot;
            let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
            self.used.insert((q, id as u16), len);
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
    }
}
