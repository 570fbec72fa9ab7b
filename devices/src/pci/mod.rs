//! PCI: configuration space, the root bus with configuration mechanism #1, BAR decoding,
//! MSI-X, the host bridge, the ISA bridge and the PIIX4 power-management function.

mod config;
mod host_bridge;
mod isa_bridge;
mod mirror;
mod msi;
mod msix;
mod piix4_pm;
mod root;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use config::{affects_bars, BarKind, BarRange, PciConfigSpace, BAR_COUNT};
pub use host_bridge::host_bridge;
pub use isa_bridge::isa_bridge;
pub use mirror::{MirrorError, RegisterMirror, MIRROR_PAGE};
pub use msi::{Msi, MSI_CAP_ID};
pub use msix::{Msix, MSIX_CAP_ID, NO_VECTOR};
pub use piix4_pm::piix4_pm;
pub use root::{
    FastPathHook, PciBarWindow, PciConfigIo, PciRoot, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN,
    RESET_CONTROL_OFFSET, RESET_VALUE,
};

/// A register whose writes only need to wake the device: `offset` within memory BAR `bar`.
/// The vmm lets the hypervisor signal `event` without a VM exit (ioeventfd); a write that
/// reaches the device anyway must signal `event` itself, so both paths behave the same.
#[derive(Clone)]
pub struct Doorbell {
    pub bar: usize,
    pub offset: u64,
    pub event: Arc<EventFd>,
}

/// A function on the PCI bus, as configuration cycles and BAR accesses see it.
pub trait PciDevice: Send {
    /// Reads the 32-bit configuration register `reg` (dword index, 0..64).
    fn config_read(&mut self, reg: usize) -> u32;
    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` within register `reg`.
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]);
    /// Vendor and device IDs, class code: for the machine's log.
    fn describe(&mut self) -> String {
        let id = self.config_read(0);
        let class = self.config_read(2) >> 8;
        format!("{:04x}:{:04x} class {:06x}", id & 0xffff, id >> 16, class)
    }
    /// The BARs that decode now (see [`PciConfigSpace::bar_ranges`]).
    fn bar_ranges(&mut self) -> Vec<BarRange> {
        Vec::new()
    }
    /// The BARs the function declares: (index, kind, size); firmware assigns them.
    fn declared_bars(&mut self) -> Vec<(usize, BarKind, u64)> {
        Vec::new()
    }
    /// A read at `offset` within BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let _ = (bar, offset);
        data.fill(0xff);
    }
    /// A write at `offset` within BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let _ = (bar, offset, data);
    }
    fn doorbells(&self) -> Vec<Doorbell> {
        Vec::new()
    }
    /// A memory BAR whose reads the hypervisor may serve from a [`RegisterMirror`] the
    /// device keeps current: (BAR index, mirror as long as the BAR).
    fn mirror(&self) -> Option<(usize, Arc<RegisterMirror>)> {
        None
    }
}

/// A device and function number on bus 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevFn(pub u8);

impl DevFn {
    pub fn new(device: u8, function: u8) -> Self {
        Self(((device & 0x1f) << 3) | (function & 7))
    }
    pub fn device(self) -> u8 {
        self.0 >> 3
    }
    pub fn function(self) -> u8 {
        self.0 & 7
    }
}

impl std::fmt::Display for DevFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "00:{:02x}.{}", self.device(), self.function())
    }
}
