//! Bus 0 and configuration mechanism #1 (ports 0xCF8 address, 0xCFC data), plus the reset
//! control register at 0xCF9 that the FADT names as the ACPI reset register.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{DevFn, PciDevice};
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

/// The functions on bus 0.
#[derive(Default)]
pub struct PciRoot {
    devices: BTreeMap<DevFn, Arc<Mutex<dyn PciDevice>>>,
}

impl PciRoot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a function; returns false when the slot is taken.
    pub fn add(&mut self, devfn: DevFn, dev: Arc<Mutex<dyn PciDevice>>) -> bool {
        if self.devices.contains_key(&devfn) {
            return false;
        }
        self.devices.insert(devfn, dev);
        true
    }

    /// Each function with its description, for the machine's log.
    pub fn describe(&self) -> Vec<(DevFn, String)> {
        self.devices
            .iter()
            .map(|(d, dev)| (*d, lock(dev).describe()))
            .collect()
    }

    fn read(&self, bus: u8, devfn: DevFn, reg: usize) -> u32 {
        match (bus, self.devices.get(&devfn)) {
            (0, Some(dev)) => lock(dev).config_read(reg),
            // Nobody home: the master aborts and reads all ones.
            _ => 0xffff_ffff,
        }
    }

    fn write(&self, bus: u8, devfn: DevFn, reg: usize, offset: usize, data: &[u8]) {
        if let (0, Some(dev)) = (bus, self.devices.get(&devfn)) {
            lock(dev).config_write(reg, offset, data);
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
    use crate::pci::HostBridge;

    fn setup() -> (PciConfigIo, Arc<RecordingExit>) {
        let mut root = PciRoot::new();
        assert!(root.add(DevFn::new(0, 0), Arc::new(Mutex::new(HostBridge::new()))));
        assert!(!root.add(DevFn::new(0, 0), Arc::new(Mutex::new(HostBridge::new()))));
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
}
