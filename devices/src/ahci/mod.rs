//! AHCI SATA HBA (AHCI 1.3.1) as the Intel ICH8M presents it to a VirtualBox guest (PCI
//! 8086:2829, class 01:06:01): up to 30 ports, 32 command slots with NCQ, MSI or INTx,
//! HBA reset, COMRESET and hot-plug. Each port's ATA or ATAPI device is the shared ATA core
//! in `crate::ata`; data moves through the port's I/O engine.
//!
//! Register accesses arrive on vCPU threads (MMIO exits on BAR 5); I/O completions arrive on
//! the event loop through [`Ahci::io_event`]. Register reads have no side effects in AHCI,
//! so BAR 5 has a [`RegisterMirror`]: where the hypervisor maps it, the guest reads the
//! registers from memory without a VM exit (Linux's interrupt handler reads IS, PxIS and
//! PxSACT for every interrupt). The controller stores each changed register there before
//! the guest can look: before it raises an interrupt and before a register write returns.

mod fis;
mod port;
mod sg;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use ferry_storage::io::DeferredSubmit;
use ferry_storage::Disk;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use port::Port;
pub use port::Unit;

use crate::interrupt::{LevelInterrupt, MsiSender};
use crate::pci::{BarKind, BarRange, Msi, PciConfigSpace, PciDevice, RegisterMirror};

pub const VENDOR_ID: u16 = 0x8086;
/// ICH8M AHCI, as VirtualBox's IntelAhci.
pub const DEVICE_ID: u16 = 0x2829;
pub const MAX_PORTS: usize = 30;
/// The AHCI base address (ABAR) is BAR 5.
const ABAR: usize = 5;
/// Generic host control plus 30 ports of 0x80 bytes.
const ABAR_SIZE: u64 = 0x1000;
const PORTS_BASE: u64 = 0x100;
const PORT_SIZE: u64 = 0x80;
/// Every port's bit in a port mask.
const ALL_PORTS: u32 = (1 << MAX_PORTS) - 1;

mod ghc {
    pub const CAP: u64 = 0x00;
    pub const GHC: u64 = 0x04;
    pub const IS: u64 = 0x08;
    pub const PI: u64 = 0x0c;
    pub const VS: u64 = 0x10;
    /// HBA reset, interrupt enable, AHCI enable.
    pub const HR: u32 = 1 << 0;
    pub const IE: u32 = 1 << 1;
    pub const AE: u32 = 1 << 31;
}

/// CAP: 64-bit addressing, NCQ, AHCI-only, command list override, PIO multiple DRQ blocks,
/// Gen2 speed, 32 slots (NCS = 31).
const CAP_BASE: u32 =
    (1 << 31) | (1 << 30) | (1 << 24) | (1 << 18) | (1 << 15) | (2 << 20) | (31 << 8);
/// AHCI 1.1, which the ICH8M implements.
const VERSION: u32 = 0x0001_0100;

pub struct AhciParams {
    pub memory: GuestMemoryMmap,
    pub msi: Arc<dyn MsiSender>,
    pub intx: Arc<dyn LevelInterrupt>,
    pub intx_line: u8,
    /// Ports implemented (1..=30).
    pub ports: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AhciError {
    #[error("an AHCI controller has 1 to {MAX_PORTS} ports, not {0}")]
    PortCount(usize),
    #[error("port {port} is past the controller's {ports} ports")]
    NoSuchPort { port: usize, ports: usize },
    #[error("port {0} is already in use")]
    PortInUse(usize),
    #[error("port {0} has nothing attached")]
    PortEmpty(usize),
    #[error("port {0} is not a CD/DVD drive")]
    NotAtapi(usize),
    #[error("configuration space has no room for the MSI capability")]
    NoRoom,
    #[error("cannot create an eventfd: {0}")]
    EventFd(String),
    #[error(transparent)]
    Mirror(#[from] crate::pci::MirrorError),
}

pub struct Ahci {
    config: PciConfigSpace,
    memory: GuestMemoryMmap,
    msi: Msi,
    intx: Arc<dyn LevelInterrupt>,
    ports: Vec<Port>,
    ghc: u32,
    is: u32,
    /// Fires when a port's I/O engine appears or goes, so the event loop re-registers them.
    sources_changed: Arc<EventFd>,
    /// Fires when software issued commands: the event loop then fetches and starts them
    /// ([`Ahci::run_ports`]), so the vCPU goes back to the guest at once and the host I/O
    /// (a page-cache copy, for a buffered read) runs beside it.
    kick: Arc<EventFd>,
    /// BAR 5 as guest reads see it where the hypervisor maps it.
    mirror: Arc<RegisterMirror>,
    /// Ports whose registers may have changed since they were last stored in the mirror.
    dirty: u32,
}

impl Ahci {
    pub fn new(p: AhciParams) -> Result<Self, AhciError> {
        if !(1..=MAX_PORTS).contains(&p.ports) {
            return Err(AhciError::PortCount(p.ports));
        }
        let mut config = PciConfigSpace::new(VENDOR_ID, DEVICE_ID, 2, (0x01, 0x06, 0x01));
        config.set_subsystem(VENDOR_ID, DEVICE_ID);
        config.set_interrupt_pin(1, p.intx_line);
        config.add_bar(ABAR, BarKind::Memory32, ABAR_SIZE);
        // Power management (PCI PM 1.2, D0 only in practice): drivers look for it.
        config
            .add_capability(
                0x01,
                &[0x03, 0x00, 0x00, 0x00, 0x00, 0x00],
                &[0, 0, 0x03, 0],
            )
            .ok_or(AhciError::NoRoom)?;
        let msi = Msi::new(&mut config, p.msi).ok_or(AhciError::NoRoom)?;
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(|e| AhciError::EventFd(e.to_string()));
        let sources_changed = eventfd()?;
        let kick = eventfd()?;
        let mut ahci = Self {
            config,
            memory: p.memory,
            msi,
            intx: p.intx,
            ports: (0..p.ports).map(|_| Port::new(None, true)).collect(),
            ghc: ghc::AE,
            is: 0,
            sources_changed: Arc::new(sources_changed),
            kick: Arc::new(kick),
            mirror: Arc::new(RegisterMirror::new(ABAR_SIZE)?),
            dirty: ALL_PORTS,
        };
        ahci.flush_mirror();
        Ok(ahci)
    }

    /// Stores the generic host control registers and every dirty port's registers in the
    /// mirror. Only what `read_reg` answers is stored: everything else there stays zero,
    /// as `read_reg` answers it.
    fn flush_mirror(&mut self) {
        for offset in [ghc::CAP, ghc::GHC, ghc::IS, ghc::PI, ghc::VS] {
            self.mirror.store(offset, self.read_reg(offset));
        }
        let dirty = std::mem::take(&mut self.dirty);
        for (i, p) in self.ports.iter().enumerate() {
            if dirty & (1 << i) == 0 {
                continue;
            }
            let base = PORTS_BASE + i as u64 * PORT_SIZE;
            for offset in port::reg::ALL {
                self.mirror.store(base + offset, p.read(offset));
            }
        }
    }

    /// Ports with a device: those whose registers the engine's completions change.
    fn busy_ports(&self) -> u32 {
        self.ports
            .iter()
            .enumerate()
            .filter(|(_, p)| p.unit.is_some() || p.in_flight_count() > 0)
            .fold(0, |m, (i, _)| m | 1 << i)
    }

    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    fn port_index(&self, port: usize) -> Result<usize, AhciError> {
        if port < self.ports.len() {
            Ok(port)
        } else {
            Err(AhciError::NoSuchPort {
                port,
                ports: self.ports.len(),
            })
        }
    }

    /// Puts a device on `port` before the guest runs.
    pub fn attach(&mut self, port: usize, unit: Unit) -> Result<(), AhciError> {
        let i = self.port_index(port)?;
        if self.ports[i].unit.is_some() {
            return Err(AhciError::PortInUse(port));
        }
        self.ports[i] = Port::new(Some(unit), true);
        self.dirty |= 1 << i;
        self.flush_mirror();
        Ok(())
    }

    /// Hot-plug: a device appears on `port` of a running guest, which sees a connect change.
    pub fn plug(&mut self, port: usize, unit: Unit) -> Result<(), AhciError> {
        let i = self.port_index(port)?;
        if self.ports[i].unit.is_some() {
            return Err(AhciError::PortInUse(port));
        }
        self.ports[i].plug(unit, &self.memory);
        self.dirty |= 1 << i;
        let _ = self.sources_changed.write(1);
        self.update_irq();
        Ok(())
    }

    /// Hot-unplug: the device on `port` goes away; what it was running is dropped.
    pub fn unplug(&mut self, port: usize) -> Result<Unit, AhciError> {
        let i = self.port_index(port)?;
        let unit = self.ports[i].unplug().ok_or(AhciError::PortEmpty(port))?;
        self.dirty |= 1 << i;
        let _ = self.sources_changed.write(1);
        self.update_irq();
        Ok(unit)
    }

    /// Puts `medium` into the ATAPI drive on `port`, or empties it (None). The guest sees a
    /// unit attention (MEDIUM CHANGED or NOT READY) on its next packet command, as Linux's
    /// sr driver polls for with GET EVENT STATUS NOTIFICATION. The new medium is read
    /// through the image layer on the event loop.
    pub fn change_medium(
        &mut self,
        port: usize,
        medium: Option<Arc<Disk>>,
    ) -> Result<(), AhciError> {
        let i = self.port_index(port)?;
        let unit = self.ports[i]
            .unit
            .as_mut()
            .ok_or(AhciError::PortEmpty(port))?;
        let drive = unit
            .device
            .as_atapi_mut()
            .ok_or(AhciError::NotAtapi(port))?;
        match &medium {
            Some(m) => drive.insert(m.size()),
            None => drive.eject(),
        }
        unit.medium = medium;
        unit.engine = None;
        self.dirty |= 1 << i;
        self.flush_mirror();
        let _ = self.sources_changed.write(1);
        Ok(())
    }

    pub fn unit_mut(&mut self, port: usize) -> Option<&mut Unit> {
        self.ports.get_mut(port)?.unit.as_mut()
    }

    /// The eventfd that fires when the set of I/O engines changes (hot-plug).
    pub fn sources_changed(&self) -> Arc<EventFd> {
        self.sources_changed.clone()
    }

    /// The eventfd that fires when software issued commands.
    pub fn kick_event(&self) -> Arc<EventFd> {
        self.kick.clone()
    }

    /// Fetches and starts the commands software issued since the last call. The host I/O
    /// starts when the caller submits what this returns, after letting go of the lock it
    /// holds on the controller: a read of host-cached data is copied inside that submission,
    /// and the guest's register accesses must not wait for it.
    #[must_use = "the commands' I/O starts only when submitted"]
    pub fn run_ports(&mut self) -> Vec<DeferredSubmit> {
        let _ = self.kick.read();
        self.dirty |= self.busy_ports();
        let mut submits = Vec::new();
        for p in &mut self.ports {
            submits.extend(p.run(&self.memory));
        }
        self.update_irq();
        submits
    }

    /// Collects what every port's engine has finished: after the submissions `run_ports`
    /// returned, the commands the kernel completed inside them (a cached read, a buffered
    /// write), answered without waiting for another wake of the event loop.
    pub fn reap_ports(&mut self) {
        self.dirty |= self.busy_ports();
        for p in &mut self.ports {
            if p.in_flight_count() > 0 {
                p.reap(&self.memory);
            }
        }
        self.update_irq();
    }

    /// Each port's I/O engine completion eventfd, by port.
    pub fn io_events(&self) -> Vec<(usize, EventFd)> {
        let _ = self.sources_changed.read();
        self.ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((i, p.engine_event()?.try_clone().ok()?)))
            .collect()
    }

    /// Port `port`'s engine has completions.
    pub fn io_event(&mut self, port: usize) {
        let Some(p) = self.ports.get_mut(port) else {
            return;
        };
        p.reap(&self.memory);
        self.dirty |= 1 << port;
        self.update_irq();
    }

    /// Recomputes IS from the ports and drives the interrupt: MSI for each new event (and
    /// again while IS stays set after software cleared part of it), or the INTx level.
    fn update_irq(&mut self) {
        self.update_irq_with(false);
    }

    fn update_irq_with(&mut self, again: bool) {
        let mut raised = again;
        for (i, p) in self.ports.iter_mut().enumerate() {
            if p.take_raised() {
                raised = true;
            }
            if p.interrupt_pending() {
                self.is |= 1 << i;
            }
        }
        self.signal(raised);
    }

    fn signal(&mut self, new_event: bool) {
        // What the interrupt announces is readable before it arrives.
        self.flush_mirror();
        let enabled = self.ghc & ghc::IE != 0;
        if self.msi.enabled(&self.config) {
            self.intx.set_level(false);
            if enabled && new_event && self.is != 0 {
                self.msi.notify(&self.config);
            }
        } else {
            self.intx.set_level(enabled && self.is != 0);
        }
    }

    fn reset(&mut self) {
        for p in &mut self.ports {
            p.reset(true);
        }
        self.ghc = ghc::AE;
        self.is = 0;
        self.dirty = ALL_PORTS;
        self.intx.set_level(false);
    }

    fn cap(&self) -> u32 {
        CAP_BASE | (self.ports.len() as u32 - 1)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            ghc::CAP => self.cap(),
            ghc::GHC => self.ghc,
            ghc::IS => self.is,
            ghc::PI => (1u64 << self.ports.len()).wrapping_sub(1) as u32,
            ghc::VS => VERSION,
            o if o >= PORTS_BASE => {
                let i = ((o - PORTS_BASE) / PORT_SIZE) as usize;
                self.ports
                    .get(i)
                    .map_or(0, |p| p.read((o - PORTS_BASE) % PORT_SIZE))
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            ghc::GHC => {
                if value & ghc::HR != 0 {
                    self.reset();
                    return;
                }
                self.ghc = ghc::AE | (value & ghc::IE);
                // Interrupts pending before IE was set are delivered now.
                self.update_irq_with(true);
            }
            ghc::IS => {
                self.is &= !value;
                // A port still asking keeps its bit (and, with MSI, interrupts again) so
                // nothing raised while software handled the last one is lost.
                self.update_irq_with(true);
            }
            o if o >= PORTS_BASE => {
                let i = ((o - PORTS_BASE) / PORT_SIZE) as usize;
                if let Some(p) = self.ports.get_mut(i) {
                    self.dirty |= 1 << i;
                    p.write((o - PORTS_BASE) % PORT_SIZE, value, &self.memory);
                    if p.has_work() {
                        let _ = self.kick.write(1);
                    }
                    self.update_irq();
                }
            }
            _ => {}
        }
    }
}

impl PciDevice for Ahci {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_dword(reg)
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
        // Switching between MSI and INTx moves a pending interrupt with it.
        self.signal(false);
    }

    fn bar_ranges(&mut self) -> Vec<BarRange> {
        self.config.bar_ranges()
    }

    fn declared_bars(&mut self) -> Vec<(usize, BarKind, u64)> {
        self.config.declared_bars()
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != ABAR {
            data.fill(0xff);
            return;
        }
        // Registers are dwords (what drivers use); narrower reads take their bytes, a qword
        // read two dwords.
        if data.len() == 4 && offset & 3 == 0 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            let v = self.read_reg(at & !3);
            *b = (v >> ((at & 3) * 8)) as u8;
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != ABAR {
            return;
        }
        let mut i = 0;
        while i < data.len() {
            let at = offset + i as u64;
            let aligned = at & !3;
            let shift = (at & 3) * 8;
            let n = (4 - (at & 3) as usize).min(data.len() - i);
            let mut v = 0u32;
            for (j, &b) in data[i..i + n].iter().enumerate() {
                v |= u32::from(b) << (shift + 8 * j as u64);
            }
            // A narrow write to a plain register keeps its other bytes; ones to clear and
            // ones to set mean nothing in the bytes not written.
            let mask = if n == 4 {
                u32::MAX
            } else {
                (((1u64 << (8 * n)) - 1) as u32) << shift
            };
            let keep = if is_plain(aligned) {
                self.read_reg(aligned) & !mask
            } else {
                0
            };
            self.write_reg(aligned, keep | (v & mask));
            i += n;
        }
        // The guest's next read may be served by the mirror. A write that raised or
        // re-evaluated the interrupt has stored everything already (`signal`); what is
        // left dirty is an HBA reset's.
        if self.dirty != 0 {
            self.flush_mirror();
        }
    }

    fn mirror(&self) -> Option<(usize, Arc<RegisterMirror>)> {
        Some((ABAR, self.mirror.clone()))
    }
}

/// Registers whose writes store a value (rather than clear or set the bits written).
fn is_plain(offset: u64) -> bool {
    if offset < PORTS_BASE {
        return offset == ghc::GHC;
    }
    use port::reg;
    matches!(
        (offset - PORTS_BASE) % PORT_SIZE,
        reg::CLB | reg::CLBU | reg::FB | reg::FBU | reg::IE | reg::CMD | reg::SCTL
    )
}
