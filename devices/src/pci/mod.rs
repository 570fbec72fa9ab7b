//! PCI: configuration space, the root bus with configuration mechanism #1, and the host bridge.

mod config;
mod host_bridge;
mod root;

pub use config::PciConfigSpace;
pub use host_bridge::HostBridge;
pub use root::{
    PciConfigIo, PciRoot, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN, RESET_CONTROL_OFFSET, RESET_VALUE,
};

/// A function on the PCI bus, as configuration cycles see it.
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
}

/// A device and function number on bus 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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
