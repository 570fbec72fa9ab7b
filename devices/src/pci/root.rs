//! Bus 0 and configuration mechanism #1 (ports 0xCF8 address, 0xCFC data), plus the reset
//! control register at 0xCF9 that the FADT names as the ACPI reset register.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use vmm_sys_util::eventfd::EventFd;

use super::{affects_bars, BarKind, BarRange, DevFn, PciDevice, RegisterMirror, MIRROR_PAGE};
use crate::bus::lock;
use crate::{BusDevice, ExitHandle, ExitRequest};

pub const PCI_CONFIG_IO_BASE: u64 = 0xcf8;
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// Offset of the reset control register (port 0xCF9) within the range.
pub const RESET_CONTROL_OFFSET: u64 = 1;
/// The value the FADT tells the guest to write there: full reset, reset CPU.
pub const RESET_VALUE: u8 = 0x06;
const RESET_CPU: u8 = 1 << 2;
const ENABLE: u32 = 1 << 31;

/// Where the vmm gives the hypervisor a device's fast paths: doorbells (ioeventfd on KVM)
/// and register mirrors (a read-only memory slot). Called whenever such a BAR moves, so the
/// fast paths follow the guest's (or firmware's) layout.
pub trait FastPathHook: Send + Sync {
    fn attach(&self, addr: u64, event: &EventFd);
    fn detach(&self, addr: u64, event: &EventFd);
    /// Maps `mirror` read-only at guest-physical `addr` (page aligned).
    fn map_mirror(&self, addr: u64, mirror: &Arc<RegisterMirror>);
    fn unmap_mirror(&self, addr: u64, mirror: &Arc<RegisterMirror>);
}

type Device = Arc<Mutex<dyn PciDevice>>;

/// The functions on bus 0 and where their BARs decode.
#[derive(Default)]
pub struct PciRoot {
    devices: BTreeMap<DevFn, Device>,
    decode: RwLock<Vec<(BarRange, DevFn)>>,
    fast_path_hook: Option<Arc<dyn FastPathHook>>,
}

impl PciRoot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a function; returns false when the slot is taken.
    pub fn add(&mut self, devfn: DevFn, dev: Device) -> bool {
        if self.devices.contains_key(&devfn) {
            return false;
        }
        self.devices.insert(devfn, dev);
        true
    }

    pub fn set_fast_path_hook(&mut self, hook: Arc<dyn FastPathHook>) {
        self.fast_path_hook = Some(hook);
    }

    /// Each function with its description, for the machine's log.
    pub fn describe(&self) -> Vec<(DevFn, String)> {
        self.devices
            .iter()
            .map(|(d, dev)| (*d, lock(dev).describe()))
            .collect()
    }

    /// Assigns every BAR an address as firmware does: memory BARs upwards from `mmio.0`, I/O
    /// BARs upwards from `io.0`, each aligned to its size; then enables decoding. Returns false
    /// when a window is too small.
    pub fn assign_bars(&self, mmio: (u64, u64), io: (u64, u64)) -> bool {
        let (mut next_mem, mut next_io) = (mmio.0, io.0);
        let mut ok = true;
        for (&devfn, dev) in &self.devices {
            let bars = lock(dev).declared_bars();
            let mut command = 0u8;
            for (index, kind, size) in bars {
                let (next, end) = match kind {
                    BarKind::Io => (&mut next_io, io.1),
                    _ => (&mut next_mem, mmio.1),
                };
                let base = next.next_multiple_of(size);
                if base + size > end {
                    tracing::warn!("pci {devfn}: no room for BAR{index} ({size:#x} bytes)");
                    ok = false;
                    continue;
                }
                *next = base + size;
                let reg = 4 + index;
                self.write(0, devfn, reg, 0, &(base as u32).to_le_bytes());
                if kind == BarKind::Memory64 {
                    self.write(0, devfn, reg + 1, 0, &((base >> 32) as u32).to_le_bytes());
                }
                command |= if kind == BarKind::Io { 1 } else { 2 };
            }
            if command != 0 {
                let cur = lock(dev).config_read(1) as u8;
                self.write(0, devfn, 1, 0, &[cur | command]);
            }
        }
        ok
    }

    /// The device, BAR index and offset that decode `addr` of `kind` (I/O or memory).
    fn bar_at(&self, io: bool, addr: u64) -> Option<(Device, usize, u64)> {
        let decode = self.decode.read().unwrap_or_else(|e| e.into_inner());
        let (r, devfn) = decode
            .iter()
            .find(|(r, _)| (r.kind == BarKind::Io) == io && r.contains(addr))?;
        let dev = self.devices.get(devfn)?.clone();
        Some((dev, r.index, addr - r.base))
    }

    fn read(&self, bus: u8, devfn: DevFn, reg: usize) -> u32 {
        match (bus, self.devices.get(&devfn)) {
            (0, Some(dev)) => lock(dev).config_read(reg),
            // Nobody home: the master aborts and reads all ones.
            _ => 0xffff_ffff,
        }
    }

    fn write(&self, bus: u8, devfn: DevFn, reg: usize, offset: usize, data: &[u8]) {
        let (0, Some(dev)) = (bus, self.devices.get(&devfn)) else {
            return;
        };
        let mut d = lock(dev);
        d.config_write(reg, offset, data);
        if affects_bars(reg) {
            let ranges = d.bar_ranges();
            let doorbells = d.doorbells();
            let mirror = d.mirror();
            drop(d);
            self.update_decode(devfn, ranges, &doorbells, mirror.as_ref());
        }
    }

    fn update_decode(
        &self,
        devfn: DevFn,
        ranges: Vec<BarRange>,
        doorbells: &[super::Doorbell],
        mirror: Option<&(usize, Arc<RegisterMirror>)>,
    ) {
        let mut decode = self.decode.write().unwrap_or_else(|e| e.into_inner());
        let old: Vec<BarRange> = decode
            .iter()
            .filter(|(_, d)| *d == devfn)
            .map(|(r, _)| *r)
            .collect();
        if old == ranges {
            return;
        }
        decode.retain(|(_, d)| *d != devfn);
        decode.extend(ranges.iter().map(|r| (*r, devfn)));
        drop(decode);
        let Some(hook) = &self.fast_path_hook else {
            return;
        };
        let addr = |set: &[BarRange], bell: &super::Doorbell| {
            set.iter()
                .find(|r| r.index == bell.bar && r.kind != BarKind::Io)
                .map(|r| r.base + bell.offset)
        };
        for bell in doorbells {
            let (before, after) = (addr(&old, bell), addr(&ranges, bell));
            if before == after {
                continue;
            }
            if let Some(a) = before {
                hook.detach(a, &bell.event);
            }
            if let Some(a) = after {
                hook.attach(a, &bell.event);
            }
        }
        if let Some((bar, mirror)) = mirror {
            // Only where the whole BAR is whole pages: elsewhere reads keep exiting.
            let at = |set: &[BarRange]| {
                set.iter()
                    .find(|r| {
                        r.index == *bar
                            && r.kind != BarKind::Io
                            && r.size == mirror.len()
                            && r.base.is_multiple_of(MIRROR_PAGE)
                    })
                    .map(|r| r.base)
            };
            let (before, after) = (at(&old), at(&ranges));
            if before != after {
                if let Some(a) = before {
                    hook.unmap_mirror(a, mirror);
                }
                if let Some(a) = after {
                    hook.map_mirror(a, mirror);
                }
            }
        }
    }
}

/// The part of the address space where PCI BARs live (the 32-bit MMIO hole, or the I/O ports
/// above the legacy devices): accesses go to whichever BAR decodes them now.
pub struct PciBarWindow {
    root: Arc<PciRoot>,
    base: u64,
    io: bool,
}

impl PciBarWindow {
    pub fn new(root: Arc<PciRoot>, base: u64, io: bool) -> Self {
        Self { root, base, io }
    }
}

impl BusDevice for PciBarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.root.bar_at(self.io, self.base + offset) {
            Some((dev, bar, off)) => lock(&dev).bar_read(bar, off, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((dev, bar, off)) = self.root.bar_at(self.io, self.base + offset) {
            lock(&dev).bar_write(bar, off, data);
        }
    }
}

/// Ports 0xCF8..=0xCFF.
pub struct PciConfigIo {
    address: u32,
    reset_control: u8,
    root: Arc<PciRoot>,
    exit: Arc<dyn ExitHandle>,
}

impl PciConfigIo {
    pub fn new(root: Arc<PciRoot>, exit: Arc<dyn ExitHandle>) -> Self {
        Self {
            address: 0,
            reset_control: 0,
            root,
            exit,
        }
    }

    fn target(&self) -> Option<(u8, DevFn, usize)> {
        if self.address & ENABLE == 0 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let devfn = DevFn((self.address >> 8) as u8);
        let reg = ((self.address >> 2) & 0x3f) as usize;
        Some((bus, devfn, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (RESET_CONTROL_OFFSET, 1) => data[0] = self.reset_control,
            (4..=7, _) => {
                let start = (offset - 4) as usize;
                if let Some((bus, devfn, reg)) = self.target() {
                    let v = self.root.read(bus, devfn, reg).to_le_bytes();
                    if let Some(src) = v.get(start..start + data.len()) {
                        data.copy_from_slice(src);
                    }
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => {
                // Bits 1:0 are reserved and read as zero.
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & !3;
            }
            (RESET_CONTROL_OFFSET, 1) => {
                if data[0] & RESET_CPU != 0 {
                    self.exit.request_exit(ExitRequest::Reset);
                }
                self.reset_control = data[0] & !RESET_CPU;
            }
            (4..=7, _) => {
                let start = (offset - 4) as usize;
                if start + data.len() > 4 {
                    return;
                }
                if let Some((bus, devfn, reg)) = self.target() {
                    self.root.write(bus, devfn, reg, start, data);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::testing::RecordingExit;
    use crate::pci::host_bridge;

    fn setup() -> (PciConfigIo, Arc<RecordingExit>) {
        let mut root = PciRoot::new();
        assert!(root.add(DevFn::new(0, 0), Arc::new(Mutex::new(host_bridge()))));
        assert!(!root.add(DevFn::new(0, 0), Arc::new(Mutex::new(host_bridge()))));
        let exit = Arc::new(RecordingExit::default());
        (PciConfigIo::new(Arc::new(root), exit.clone()), exit)
    }

    fn cfg_read(io: &mut PciConfigIo, devfn: DevFn, reg: u32, size: usize, off: u64) -> u32 {
        io.write(
            0,
            &(ENABLE | (u32::from(devfn.0) << 8) | (reg << 2)).to_le_bytes(),
        );
        let mut b = [0u8; 4];
        io.read(4 + off, &mut b[..size]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn enumerates_host_bridge_only() {
        let (mut io, _) = setup();
        assert_eq!(cfg_read(&mut io, DevFn::new(0, 0), 0, 4, 0), 0x1237_8086);
        assert_eq!(cfg_read(&mut io, DevFn::new(0, 0), 0, 2, 2), 0x1237);
        assert_eq!(cfg_read(&mut io, DevFn::new(0, 0), 2, 1, 3), 0x06);
        assert_eq!(cfg_read(&mut io, DevFn::new(1, 0), 0, 4, 0), 0xffff_ffff);
        // Without the enable bit nothing is decoded.
        io.write(0, &0u32.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xffff_ffff);
    }

    #[test]
    fn pam_registers_are_writable() {
        let (mut io, _) = setup();
        io.write(0, &(ENABLE | (0x58 & !3)).to_le_bytes());
        io.write(4 + 1, &[0x33]);
        assert_eq!(cfg_read(&mut io, DevFn::new(0, 0), 0x58 >> 2, 1, 1), 0x33);
    }

    #[test]
    fn reset_register() {
        let (mut io, exit) = setup();
        io.write(1, &[0x02]);
        assert!(exit.requests().is_empty());
        io.write(1, &[RESET_VALUE]);
        assert_eq!(exit.requests(), vec![ExitRequest::Reset]);
    }

    struct BarDev {
        config: crate::pci::PciConfigSpace,
        bell: Arc<EventFd>,
        mirror: Arc<RegisterMirror>,
        last_write: Option<(usize, u64)>,
    }
    impl PciDevice for BarDev {
        fn config_read(&mut self, reg: usize) -> u32 {
            self.config.read_dword(reg)
        }
        fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
            self.config.write(reg, offset, data)
        }
        fn bar_ranges(&mut self) -> Vec<BarRange> {
            self.config.bar_ranges()
        }
        fn declared_bars(&mut self) -> Vec<(usize, BarKind, u64)> {
            self.config.declared_bars()
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, _: &[u8]) {
            self.last_write = Some((bar, offset));
        }
        fn doorbells(&self) -> Vec<crate::pci::Doorbell> {
            vec![crate::pci::Doorbell {
                bar: 0,
                offset: 0x10,
                event: self.bell.clone(),
            }]
        }
        fn mirror(&self) -> Option<(usize, Arc<RegisterMirror>)> {
            Some((0, self.mirror.clone()))
        }
    }

    #[derive(Default)]
    struct Hook(Mutex<Vec<(&'static str, u64)>>);
    impl FastPathHook for Hook {
        fn attach(&self, addr: u64, _: &EventFd) {
            self.0.lock().unwrap().push(("bell+", addr));
        }
        fn detach(&self, addr: u64, _: &EventFd) {
            self.0.lock().unwrap().push(("bell-", addr));
        }
        fn map_mirror(&self, addr: u64, _: &Arc<RegisterMirror>) {
            self.0.lock().unwrap().push(("mirror+", addr));
        }
        fn unmap_mirror(&self, addr: u64, _: &Arc<RegisterMirror>) {
            self.0.lock().unwrap().push(("mirror-", addr));
        }
    }

    #[test]
    fn bars_are_assigned_decoded_and_followed() {
        let mut config = crate::pci::PciConfigSpace::new(0x1af4, 0x1000, 0, (1, 0, 0));
        config.add_bar(0, BarKind::Memory32, 0x1000);
        config.add_bar(1, BarKind::Io, 0x20);
        let dev = Arc::new(Mutex::new(BarDev {
            config,
            bell: Arc::new(EventFd::new(0).unwrap()),
            mirror: Arc::new(RegisterMirror::new(0x1000).unwrap()),
            last_write: None,
        }));
        let mut root = PciRoot::new();
        root.add(DevFn::new(1, 0), dev.clone());
        let hook = Arc::new(Hook::default());
        root.set_fast_path_hook(hook.clone());
        let root = Arc::new(root);
        assert!(root.assign_bars((0xc000_0000, 0xc000_2000), (0xc000, 0x10000)));
        assert_eq!(
            *hook.0.lock().unwrap(),
            vec![("bell+", 0xc000_0010), ("mirror+", 0xc000_0000)]
        );
        let mut mmio = PciBarWindow::new(root.clone(), 0xc000_0000, false);
        let mut pio = PciBarWindow::new(root.clone(), 0xc000, true);
        let mut b = [0u8; 1];
        mmio.read(0x5, &mut b);
        assert_eq!(b[0], 0x05);
        pio.read(0x3, &mut b);
        assert_eq!(b[0], 0x13);
        mmio.read(0x1000, &mut b);
        assert_eq!(b[0], 0xff, "past the BAR: nobody answers");
        mmio.write(0x44, &[1]);
        assert_eq!(dev.lock().unwrap().last_write, Some((0, 0x44)));
        // The guest moves BAR0 (through configuration cycles): decoding and the doorbell follow.
        let mut io = PciConfigIo::new(root.clone(), Arc::new(RecordingExit::default()));
        io.write(
            0,
            &(ENABLE | (u32::from(DevFn::new(1, 0).0) << 8) | (4 << 2)).to_le_bytes(),
        );
        io.write(4, &0xc000_1000u32.to_le_bytes());
        assert_eq!(
            *hook.0.lock().unwrap(),
            vec![
                ("bell+", 0xc000_0010),
                ("mirror+", 0xc000_0000),
                ("bell-", 0xc000_0010),
                ("bell+", 0xc000_1010),
                ("mirror-", 0xc000_0000),
                ("mirror+", 0xc000_1000),
            ]
        );
        mmio.read(0x1005, &mut b);
        assert_eq!(b[0], 0x05);
        // Memory decoding off: nothing answers, the doorbell is detached.
        io.write(
            0,
            &(ENABLE | (u32::from(DevFn::new(1, 0).0) << 8) | (1 << 2)).to_le_bytes(),
        );
        io.write(4, &[0x1, 0]);
        mmio.read(0x1005, &mut b);
        assert_eq!(b[0], 0xff);
        assert_eq!(
            hook.0.lock().unwrap()[6..],
            [("bell-", 0xc000_1010), ("mirror-", 0xc000_1000)]
        );
    }
}
