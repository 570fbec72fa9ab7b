//! MSI-X: the capability in configuration space, the vector table and the pending-bit array
//! that live in a memory BAR. Masked vectors remember that they fired and deliver on unmask.

use std::sync::Arc;

use super::PciConfigSpace;
use crate::interrupt::MsiSender;

pub const MSIX_CAP_ID: u8 = 0x11;
const ENTRY_SIZE: u64 = 16;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;
/// virtio (and others) use all ones for "no vector".
pub const NO_VECTOR: u16 = 0xffff;

#[derive(Clone, Copy, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    cap_offset: usize,
    enabled: bool,
    function_masked: bool,
    sender: Arc<dyn MsiSender>,
}

impl Msix {
    /// Adds the capability for `vectors` vectors whose table is at `table_offset` and PBA at
    /// `pba_offset` of BAR `bar` (both 8-byte aligned).
    pub fn new(
        config: &mut PciConfigSpace,
        vectors: u16,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
        sender: Arc<dyn MsiSender>,
    ) -> Option<Self> {
        let vectors = vectors.clamp(1, 2048);
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(vectors - 1).to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let cap_offset = config.add_capability(MSIX_CAP_ID, &body, &[0, 0xc0])?;
        Some(Self {
            entries: vec![
                Entry {
                    control: VECTOR_MASKED,
                    ..Default::default()
                };
                usize::from(vectors)
            ],
            pending: vec![false; usize::from(vectors)],
            cap_offset,
            enabled: false,
            function_masked: false,
            sender,
        })
    }

    pub fn vectors(&self) -> usize {
        self.entries.len()
    }

    /// Bytes of the table, then of the PBA, that the BAR must hold.
    pub fn table_len(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    pub fn pba_len(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(64) * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Call after every configuration write: picks up enable and function mask.
    pub fn config_changed(&mut self, config: &PciConfigSpace) {
        let b = config.bytes(self.cap_offset + 2, 2);
        let control = match b {
            [lo, hi] => u16::from_le_bytes([*lo, *hi]),
            _ => return,
        };
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.deliver_pending();
    }

    /// Signals `vector`. Returns false when MSI-X is off (the caller falls back to INTx).
    pub fn notify(&mut self, vector: u16) -> bool {
        if !self.enabled {
            return false;
        }
        let i = usize::from(vector);
        let Some(e) = self.entries.get(i).copied() else {
            return true; // no such vector: the guest chose not to be told
        };
        if self.function_masked || e.control & VECTOR_MASKED != 0 {
            self.pending[i] = true;
        } else {
            self.send(e);
        }
        true
    }

    fn send(&self, e: Entry) {
        let addr = (u64::from(e.addr_hi) << 32) | u64::from(e.addr_lo);
        self.sender.send(addr, e.data);
    }

    fn deliver_pending(&mut self) {
        if !self.enabled || self.function_masked {
            return;
        }
        for i in 0..self.entries.len() {
            if self.pending[i] && self.entries[i].control & VECTOR_MASKED == 0 {
                self.pending[i] = false;
                self.send(self.entries[i]);
            }
        }
    }

    /// Reads the table at `offset` (dword or qword accesses).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (chunk, off) in data.chunks_mut(4).zip((offset..).step_by(4)) {
            let Some(e) = self.entries.get((off / ENTRY_SIZE) as usize) else {
                return;
            };
            let v = match off % ENTRY_SIZE {
                0 => e.addr_lo,
                4 => e.addr_hi,
                8 => e.data,
                12 => e.control,
                _ => 0,
            };
            let bytes = v.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        for (chunk, off) in data.chunks(4).zip((offset..).step_by(4)) {
            let i = (off / ENTRY_SIZE) as usize;
            let Some(e) = self.entries.get_mut(i) else {
                return;
            };
            let [a, b, c, d] = [0, 1, 2, 3].map(|k| chunk.get(k).copied().unwrap_or(0));
            let v = u32::from_le_bytes([a, b, c, d]);
            match off % ENTRY_SIZE {
                0 => e.addr_lo = v & !0x3,
                4 => e.addr_hi = v,
                8 => e.data = v,
                12 => {
                    e.control = v & VECTOR_MASKED;
                    self.deliver_pending();
                }
                _ => {}
            }
        }
    }

    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            let bit0 = (offset + k as u64) * 8;
            *b = (0..8)
                .filter(|j| self.pending.get((bit0 + j) as usize) == Some(&true))
                .fold(0u8, |acc, j| acc | (1 << j));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u32)>>);
    impl MsiSender for Recorder {
        fn send(&self, address: u64, data: u32) {
            self.0.lock().unwrap().push((address, data));
        }
    }

    fn setup() -> (PciConfigSpace, Msix, Arc<Recorder>) {
        let mut cfg = PciConfigSpace::new(0x1af4, 0x1048, 1, (1, 0, 0));
        let rec = Arc::new(Recorder::default());
        let m = Msix::new(&mut cfg, 3, 0, 0x8000, 0x9000, rec.clone()).unwrap();
        (cfg, m, rec)
    }

    #[test]
    fn capability_describes_table() {
        let (cfg, m, _) = setup();
        assert_eq!(
            cfg.bytes(0x40, 12),
            &[0x11, 0, 2, 0, 0, 0x80, 0, 0, 0, 0x90, 0, 0]
        );
        assert_eq!(m.table_len(), 48);
        assert_eq!(m.pba_len(), 8);
    }

    #[test]
    fn masked_vectors_deliver_on_unmask() {
        let (mut cfg, mut m, rec) = setup();
        assert!(!m.notify(0), "disabled: caller falls back to INTx");
        m.table_write(16, &0xfee0_1000u32.to_le_bytes());
        m.table_write(24, &0x41u32.to_le_bytes());
        cfg.write(0x40 / 4, 2, &[0x02, 0x80]); // enable
        m.config_changed(&cfg);
        assert!(m.notify(1));
        assert!(rec.0.lock().unwrap().is_empty(), "entries start masked");
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        m.table_write(28, &0u32.to_le_bytes()); // unmask
        assert_eq!(*rec.0.lock().unwrap(), vec![(0xfee0_1000, 0x41)]);
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0);
        m.notify(1);
        assert_eq!(rec.0.lock().unwrap().len(), 2);
        // Function mask holds everything back.
        cfg.write(0x40 / 4, 2, &[0x02, 0xc0]);
        m.config_changed(&cfg);
        m.notify(1);
        assert_eq!(rec.0.lock().unwrap().len(), 2);
        cfg.write(0x40 / 4, 2, &[0x02, 0x80]);
        m.config_changed(&cfg);
        assert_eq!(rec.0.lock().unwrap().len(), 3);
        let mut q = [0u8; 8];
        m.table_read(16, &mut q);
        assert_eq!(q, [0, 0x10, 0xe0, 0xfe, 0, 0, 0, 0]);
        // Out of range accesses are ignored.
        m.table_write(4096, &[1; 4]);
        assert!(m.notify(77));
    }
}
