//! The virtio 1.x PCI transport ("modern" layout): capabilities that point into BAR 0, which
//! holds the common configuration, the ISR, the device configuration, one doorbell per queue
//! and the MSI-X table. INTx is used when the driver does not enable MSI-X.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{VirtioDevice, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1};
use crate::interrupt::{LevelInterrupt, MsiSender};
use crate::pci::{BarKind, BarRange, Doorbell, Msix, PciConfigSpace, PciDevice, NO_VECTOR};

const VENDOR_ID: u16 = 0x1af4;
const DEVICE_ID_BASE: u16 = 0x1040;
const BAR: usize = 0;
const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
const MAX_QUEUES: usize = 64;
/// The most times one doorbell runs a queue (see `queue_notified`).
const MAX_QUEUE_RUNS: usize = 64;

const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;

const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// What the machine gives a virtio PCI function.
pub struct VirtioPciParams {
    pub memory: GuestMemoryMmap,
    pub msi: Arc<dyn MsiSender>,
    pub intx: Arc<dyn LevelInterrupt>,
    /// The interrupt line value firmware would write (the GSI of INTA).
    pub intx_line: u8,
    /// PCI class (base, sub, prog-if).
    pub class: (u8, u8, u8),
}

pub struct VirtioPci {
    config: PciConfigSpace,
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    msix: Msix,
    intx: Arc<dyn LevelInterrupt>,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    doorbells: Vec<Arc<EventFd>>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    config_vector: u16,
    queue_select: u16,
    isr: u8,
    pci_cfg_cap: usize,
}

fn cap_body(cfg_type: u8, offset: u64, len: u64, extra: &[u8]) -> Vec<u8> {
    let cap_len = 2 + 14 + extra.len() as u8;
    let mut b = vec![cap_len, cfg_type, BAR as u8, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(len as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

impl VirtioPci {
    pub fn new(device: Box<dyn VirtioDevice>, p: VirtioPciParams) -> std::io::Result<Self> {
        let sizes = device.queue_max_sizes();
        let nq = sizes.len().min(MAX_QUEUES);
        let mut config =
            PciConfigSpace::new(VENDOR_ID, DEVICE_ID_BASE + device.device_type(), 1, p.class);
        config.set_subsystem(VENDOR_ID, 0x40 + device.device_type());
        config.set_interrupt_pin(1, p.intx_line);
        config.add_bar(BAR, BarKind::Memory32, BAR_SIZE);
        let vectors = (nq + 1) as u16;
        let msix = Msix::new(
            &mut config,
            vectors,
            BAR as u8,
            MSIX_TABLE as u32,
            MSIX_PBA as u32,
            p.msi,
        )
        .ok_or_else(|| std::io::Error::other("no room for the MSI-X capability"))?;
        let caps = [
            cap_body(CFG_COMMON, COMMON, COMMON_LEN, &[]),
            cap_body(
                CFG_NOTIFY,
                NOTIFY,
                u64::from(NOTIFY_MULTIPLIER) * nq as u64,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            cap_body(CFG_ISR, ISR, 1, &[]),
            cap_body(CFG_DEVICE, DEVICE_CFG, DEVICE_CFG_LEN, &[]),
        ];
        for c in &caps {
            config
                .add_capability(CAP_VENDOR, c, &[])
                .ok_or_else(|| std::io::Error::other("no room for a virtio capability"))?;
        }
        // VIRTIO_PCI_CAP_PCI_CFG: a window into BAR 0 through configuration space. The bar,
        // offset, length and data fields are the driver's to write.
        let mut writable = vec![0u8; 18];
        writable[2] = 0xff;
        writable[6..18].fill(0xff);
        let pci_cfg_cap = config
            .add_capability(CAP_VENDOR, &cap_body(CFG_PCI, 0, 0, &[0; 4]), &writable)
            .ok_or_else(|| std::io::Error::other("no room for a virtio capability"))?;
        let mut queues = Vec::with_capacity(nq);
        let mut doorbells = Vec::with_capacity(nq);
        for &size in sizes.iter().take(nq) {
            queues.push(Queue::new(size).map_err(|e| std::io::Error::other(e.to_string()))?);
            doorbells.push(Arc::new(EventFd::new(EFD_NONBLOCK)?));
        }
        Ok(Self {
            config,
            device,
            memory: p.memory,
            msix,
            intx: p.intx,
            queue_vectors: vec![NO_VECTOR; nq],
            queues,
            doorbells,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            isr: 0,
            pci_cfg_cap,
        })
    }

    fn offered_features(&self) -> u64 {
        self.device.device_features() | F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX
    }

    /// The eventfd that queue `index`'s doorbell signals; the vmm polls it.
    pub fn queue_event(&self, index: usize) -> Option<Arc<EventFd>> {
        self.doorbells.get(index).cloned()
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The driver rang queue `index`'s doorbell: let the device work, then interrupt it.
    pub fn queue_notified(&mut self, index: usize) {
        if let Some(e) = self.doorbells.get(index) {
            let _ = e.read();
        }
        if self.status & STATUS_DRIVER_OK == 0 || !self.queues.get(index).is_some_and(|q| q.ready())
        {
            return;
        }
        // A device may stop with buffers still waiting, to have its answers signalled first:
        // run it again for those.
        for _ in 0..MAX_QUEUE_RUNS {
            let used = self
                .device
                .process_queue(index, &mut self.queues, &self.memory);
            let answered = !used.is_empty();
            for q in used {
                self.signal_used(q);
            }
            if !answered || !self.buffers_wait(index) {
                return;
            }
        }
        // A driver that keeps the queue full does not hold the event loop for ever: the rest
        // waits for the loop's next turn. Its doorbell brings it there; the driver, which
        // added these buffers while notifications were on, may not ring again for them.
        if let Some(e) = self.doorbells.get(index) {
            let _ = e.write(1);
        }
    }

    /// Whether queue `index` has available buffers the device has not taken.
    fn buffers_wait(&self, index: usize) -> bool {
        self.queues.get(index).is_some_and(|q| {
            q.avail_idx(&self.memory, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != q.next_avail())
        })
    }

    fn signal_used(&mut self, index: usize) {
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        match queue.needs_notification(&self.memory) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => tracing::debug!("virtio queue {index}: {e}"),
        }
        let vector = self.queue_vectors.get(index).copied().unwrap_or(NO_VECTOR);
        self.interrupt(vector, ISR_QUEUE);
    }

    /// The device behind the transport (downcast with `as_any_mut`).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device's own event sources (I/O completions); the vmm polls them.
    pub fn device_events(&self) -> Vec<Arc<EventFd>> {
        self.device.event_sources()
    }

    /// Device event source `index` fired: let the device finish work, then interrupt.
    pub fn device_event(&mut self, index: usize) {
        let used = self
            .device
            .process_event(index, &mut self.queues, &self.memory);
        for q in used {
            self.signal_used(q);
        }
    }

    /// Tells the driver that the device configuration changed.
    pub fn signal_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt(self.config_vector, ISR_CONFIG);
    }

    fn interrupt(&mut self, vector: u16, isr_bit: u8) {
        if self.msix.enabled() {
            if vector != NO_VECTOR {
                self.msix.notify(vector);
            }
            return;
        }
        self.isr |= isr_bit;
        self.intx.set_level(true);
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_vectors.fill(NO_VECTOR);
        self.config_vector = NO_VECTOR;
        self.driver_features = 0;
        self.status = 0;
        self.isr = 0;
        self.intx.set_level(false);
    }

    fn selected(&mut self) -> Option<(&mut Queue, &mut u16)> {
        let i = usize::from(self.queue_select);
        Some((self.queues.get_mut(i)?, self.queue_vectors.get_mut(i)?))
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let feature_word = |f: u64, sel: u32| match sel {
            0 => f as u32,
            1 => (f >> 32) as u32,
            _ => 0,
        };
        let v: u64 = match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => u64::from(feature_word(
                self.offered_features(),
                self.device_feature_select,
            )),
            0x08 => u64::from(self.driver_feature_select),
            0x0c => u64::from(feature_word(
                self.driver_features,
                self.driver_feature_select,
            )),
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            _ => {
                let Some((q, vector)) = self.selected() else {
                    data.fill(0);
                    return;
                };
                match offset {
                    0x18 => u64::from(q.size()),
                    0x1a => u64::from(*vector),
                    0x1c => u64::from(q.ready()),
                    0x1e => u64::from(self.queue_select),
                    0x20..=0x27 => q.desc_table() >> ((offset - 0x20) * 8),
                    0x28..=0x2f => q.avail_ring() >> ((offset - 0x28) * 8),
                    0x30..=0x37 => q.used_ring() >> ((offset - 0x30) * 8),
                    _ => 0,
                }
            }
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let live = self.status & STATUS_DRIVER_OK != 0;
        match offset {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c if self.status & STATUS_FEATURES_OK == 0 => {
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features &= !(0xffff_ffffu64 << shift);
                self.driver_features |= (v & 0xffff_ffff) << shift;
            }
            0x10 => self.config_vector = v as u16,
            0x14 => self.write_status(v as u8),
            0x16 => self.queue_select = v as u16,
            _ => {
                let queue_offset = offset;
                let Some((q, vector)) = self.selected() else {
                    return;
                };
                // Queue layout is frozen once the queue is enabled (virtio 1.x 4.1.4.3).
                let frozen = q.ready() || live;
                match (queue_offset, frozen) {
                    (0x18, false) => q.set_size(v as u16),
                    (0x1a, _) => *vector = v as u16,
                    (0x1c, false) if v == 1 => q.set_ready(true),
                    (0x20 | 0x24, false) => set_half(
                        q,
                        queue_offset - 0x20,
                        v as u32,
                        Queue::set_desc_table_address,
                    ),
                    (0x28 | 0x2c, false) => set_half(
                        q,
                        queue_offset - 0x28,
                        v as u32,
                        Queue::set_avail_ring_address,
                    ),
                    (0x30 | 0x34, false) => set_half(
                        q,
                        queue_offset - 0x30,
                        v as u32,
                        Queue::set_used_ring_address,
                    ),
                    _ => {}
                }
                // An 8-byte write covers both halves of an address.
                if data.len() == 8 && matches!(queue_offset, 0x20 | 0x28 | 0x30) {
                    self.common_write(queue_offset + 4, &data[4..8]);
                }
            }
        }
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let mut status = status;
        if status & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.offered_features();
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                // The driver asked for what we did not offer: FEATURES_OK does not stick.
                status &= !STATUS_FEATURES_OK;
            }
        }
        let became_live = status & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = status;
        if became_live {
            let event_idx = self.driver_features & F_RING_EVENT_IDX != 0;
            for (i, q) in self.queues.iter_mut().enumerate() {
                q.set_event_idx(event_idx);
                if q.ready() && !q.is_valid(&self.memory) {
                    tracing::warn!("virtio queue {i}: the driver's ring layout is invalid");
                    q.set_ready(false);
                }
            }
            self.device.activate(self.driver_features);
            // Buffers may have been queued before DRIVER_OK.
            for i in 0..self.queues.len() {
                self.queue_notified(i);
            }
        }
    }

    fn pci_cfg_window(&self) -> (u8, u64, usize) {
        let b = self.config.bytes(self.pci_cfg_cap + 4, 12);
        let bar = b.first().copied().unwrap_or(0xff);
        let off = b
            .get(4..8)
            .map_or(0, |x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]));
        let len = b
            .get(8..12)
            .map_or(0, |x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]));
        (bar, u64::from(off), len as usize)
    }
}

fn set_half(q: &mut Queue, which: u64, v: u32, f: fn(&mut Queue, Option<u32>, Option<u32>)) {
    if which == 0 {
        f(q, Some(v), None)
    } else {
        f(q, None, Some(v))
    }
}

impl PciDevice for VirtioPci {
    fn config_read(&mut self, reg: usize) -> u32 {
        let data_reg = (self.pci_cfg_cap + 16) / 4;
        if reg == data_reg {
            let (bar, off, len) = self.pci_cfg_window();
            if usize::from(bar) == BAR && matches!(len, 1 | 2 | 4) {
                let mut b = [0u8; 4];
                self.bar_read(BAR, off, &mut b[..len]);
                return u32::from_le_bytes(b);
            }
        }
        self.config.read_dword(reg)
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let data_reg = (self.pci_cfg_cap + 16) / 4;
        if reg == data_reg {
            let (bar, off, len) = self.pci_cfg_window();
            if usize::from(bar) == BAR && matches!(len, 1 | 2 | 4) && offset == 0 {
                let n = len.min(data.len());
                self.bar_write(BAR, off, &data[..n]);
            }
            return;
        }
        self.config.write(reg, offset, data);
        self.msix.config_changed(&self.config);
    }

    fn bar_ranges(&mut self) -> Vec<BarRange> {
        self.config.bar_ranges()
    }

    fn declared_bars(&mut self) -> Vec<(usize, BarKind, u64)> {
        self.config.declared_bars()
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != BAR {
            return;
        }
        match offset {
            o if o < COMMON + COMMON_LEN => self.common_read(o - COMMON, data),
            ISR => {
                // Reading the ISR acknowledges it and lowers INTx.
                data[0] = std::mem::take(&mut self.isr);
                self.intx.set_level(false);
            }
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG, data)
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.table_len()).contains(&o) => {
                self.msix.table_read(o - MSIX_TABLE, data)
            }
            o if (MSIX_PBA..MSIX_PBA + self.msix.pba_len()).contains(&o) => {
                self.msix.pba_read(o - MSIX_PBA, data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != BAR {
            return;
        }
        match offset {
            o if o < COMMON + COMMON_LEN => self.common_write(o - COMMON, data),
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG, data)
            }
            o if (NOTIFY..NOTIFY + u64::from(NOTIFY_MULTIPLIER) * self.queues.len() as u64)
                .contains(&o) =>
            {
                // The doorbell without the hypervisor's help: same effect as the ioeventfd.
                let q = ((o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(e) = self.doorbells.get(q) {
                    let _ = e.write(1);
                }
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.table_len()).contains(&o) => {
                self.msix.table_write(o - MSIX_TABLE, data)
            }
            _ => {}
        }
    }

    fn doorbells(&self) -> Vec<Doorbell> {
        self.doorbells
            .iter()
            .enumerate()
            .map(|(i, e)| Doorbell {
                bar: BAR,
                offset: NOTIFY + i as u64 * u64::from(NOTIFY_MULTIPLIER),
                event: e.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress};

    /// A device with one queue that answers each request byte with that byte plus one.
    struct Echo;
    impl VirtioDevice for Echo {
        fn device_type(&self) -> u16 {
            0x3f
        }
        fn device_features(&self) -> u64 {
            1 << 5
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn reset(&mut self) {}
        fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
            self
        }
        fn process_queue(
            &mut self,
            i: usize,
            q: &mut [Queue],
            mem: &GuestMemoryMmap,
        ) -> Vec<usize> {
            let q = &mut q[i];
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let mut r = chain.clone().reader(mem).unwrap();
                let mut w = chain.writer(mem).unwrap();
                let mut b = [0u8; 1];
                r.read_exact(&mut b).unwrap();
                w.write_all(&[b[0] + 1]).unwrap();
                q.add_used(mem, head, 1).unwrap();
            }
            vec![i]
        }
    }

    use crate::interrupt::testing::{Line, Msis};

    fn w(dev: &mut VirtioPci, off: u64, v: u32, len: usize) {
        dev.bar_write(0, off, &v.to_le_bytes()[..len]);
    }
    fn r(dev: &mut VirtioPci, off: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        dev.bar_read(0, off, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn setup() -> (VirtioPci, GuestMemoryMmap, Arc<Line>, Arc<Msis>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let line = Arc::new(Line::default());
        let msis = Arc::new(Msis::default());
        let dev = VirtioPci::new(
            Box::new(Echo),
            VirtioPciParams {
                memory: mem.clone(),
                msi: msis.clone(),
                intx: line.clone(),
                intx_line: 17,
                class: (0xff, 0, 0),
            },
        )
        .unwrap();
        (dev, mem, line, msis)
    }

    /// The driver's side of initialisation (virtio 1.x 3.1.1), with one queue at 0x1000.
    fn bring_up(dev: &mut VirtioPci) {
        w(dev, 0x14, 1, 1);
        w(dev, 0x14, 3, 1);
        w(dev, 0x00, 1, 4);
        assert_eq!(r(dev, 0x04, 4) & 1, 1, "VERSION_1 offered");
        w(dev, 0x08, 1, 4);
        w(dev, 0x0c, 1, 4);
        w(dev, 0x14, 0xb, 1);
        assert_eq!(r(dev, 0x14, 1), 0xb, "FEATURES_OK accepted");
        assert_eq!(r(dev, 0x12, 2), 1);
        w(dev, 0x16, 0, 2);
        assert_eq!(r(dev, 0x18, 2), 8);
        w(dev, 0x18, 4, 2);
        dev.bar_write(0, 0x20, &0x1000u64.to_le_bytes());
        w(dev, 0x28, 0x2000, 4);
        w(dev, 0x2c, 0, 4);
        w(dev, 0x30, 0x3000, 4);
        w(dev, 0x1c, 1, 2);
        w(dev, 0x14, 0xf, 1);
    }

    fn post(mem: &GuestMemoryMmap, byte: u8) {
        // desc 0: 1 readable byte at 0x4000 -> desc 1: 1 writable byte at 0x5000.
        let d0: [u64; 2] = [0x4000, 1 | (1 << 32) | (1 << 48)];
        let d1: [u64; 2] = [0x5000, 1 | (2 << 32)];
        mem.write_obj(d0, GuestAddress(0x1000)).unwrap();
        mem.write_obj(d1, GuestAddress(0x1010)).unwrap();
        mem.write_obj(byte, GuestAddress(0x4000)).unwrap();
        let idx: u16 = mem.read_obj(GuestAddress(0x2002)).unwrap();
        mem.write_obj(0u16, GuestAddress(0x2004 + 2 * u64::from(idx % 4)))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(0x2002))
            .unwrap();
    }

    #[test]
    fn a_request_goes_round_trip_with_intx() {
        let (mut dev, mem, line, msis) = setup();
        bring_up(&mut dev);
        assert_eq!(r(&mut dev, DEVICE_CFG + 3, 1), 3, "device config window");
        post(&mem, 41);
        // The doorbell written through MMIO signals the same eventfd as an ioeventfd would.
        w(&mut dev, NOTIFY, 0, 2);
        let bell = dev.queue_event(0).unwrap();
        assert_eq!(bell.read().unwrap(), 1);
        bell.write(1).unwrap();
        dev.queue_notified(0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x5000)).unwrap(), 42);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 1);
        assert!(line.0.load(Ordering::SeqCst), "INTx raised without MSI-X");
        assert_eq!(r(&mut dev, ISR, 1), 1);
        assert!(
            !line.0.load(Ordering::SeqCst),
            "reading the ISR lowers INTx"
        );
        assert!(msis.0.lock().unwrap().is_empty());
    }

    #[test]
    fn msix_vectors_and_reset() {
        let (mut dev, mem, line, msis) = setup();
        // Enable MSI-X in configuration space and program vector 1.
        let cap = (0x40..0x100)
            .step_by(4)
            .find(|&o| dev.config_read(o / 4) & 0xff == 0x11)
            .unwrap();
        dev.config_write(cap / 4, 2, &[0x01, 0x80]);
        dev.bar_write(0, MSIX_TABLE + 16, &0xfee0_0000u32.to_le_bytes());
        dev.bar_write(0, MSIX_TABLE + 24, &0x30u32.to_le_bytes());
        dev.bar_write(0, MSIX_TABLE + 28, &0u32.to_le_bytes());
        bring_up(&mut dev);
        w(&mut dev, 0x16, 0, 2);
        w(&mut dev, 0x1a, 1, 2);
        post(&mem, 1);
        dev.queue_notified(0);
        assert_eq!(*msis.0.lock().unwrap(), vec![(0xfee0_0000, 0x30)]);
        assert!(!line.0.load(Ordering::SeqCst));
        // Reset: status 0 clears everything; the queue is not ready any more.
        w(&mut dev, 0x14, 0, 1);
        assert_eq!(r(&mut dev, 0x14, 1), 0);
        assert_eq!(r(&mut dev, 0x1c, 2), 0);
        assert_eq!(r(&mut dev, 0x1a, 2), u32::from(NO_VECTOR));
    }

    #[test]
    fn unoffered_features_are_refused() {
        let (mut dev, _, _, _) = setup();
        w(&mut dev, 0x14, 3, 1);
        w(&mut dev, 0x08, 0, 4);
        w(&mut dev, 0x0c, 1 << 7, 4); // not offered
        w(&mut dev, 0x08, 1, 4);
        w(&mut dev, 0x0c, 1, 4);
        w(&mut dev, 0x14, 0xb, 1);
        assert_eq!(r(&mut dev, 0x14, 1) & 0x8, 0);
        // Queue notifications before DRIVER_OK do nothing.
        dev.queue_notified(0);
        // Out-of-range accesses read zero and are ignored.
        assert_eq!(r(&mut dev, 0x7ffc, 4), 0);
        w(&mut dev, 0x7ffc, 0xffff_ffff, 4);
        dev.bar_write(3, 0, &[1]);
    }
}
