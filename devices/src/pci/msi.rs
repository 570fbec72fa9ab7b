//! MSI (PCI Local Bus 3.0, section 6.8.1): one vector, a 64-bit message address, no
//! per-vector masking. Devices that predate MSI-X (the ICH AHCI) offer this capability.

use std::sync::Arc;

use super::PciConfigSpace;
use crate::interrupt::MsiSender;

pub const MSI_CAP_ID: u8 = 0x05;
const CONTROL_ENABLE: u16 = 1 << 0;
const CONTROL_64BIT: u16 = 1 << 7;

pub struct Msi {
    /// Offset of the capability's ID byte.
    cap_offset: usize,
    sender: Arc<dyn MsiSender>,
}

impl Msi {
    /// Appends the capability; None when configuration space is full.
    pub fn new(config: &mut PciConfigSpace, sender: Arc<dyn MsiSender>) -> Option<Self> {
        // Message control, address low and high, data, reserved.
        let mut body = Vec::with_capacity(14);
        body.extend_from_slice(&CONTROL_64BIT.to_le_bytes());
        body.extend_from_slice(&[0; 12]);
        // Enable and Multiple Message Enable (which stays 0: one vector is all it has), the
        // dword-aligned address and the 16-bit data.
        let writable = [
            0x71, 0x00, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        let cap_offset = config.add_capability(MSI_CAP_ID, &body, &writable)?;
        Some(Self { cap_offset, sender })
    }

    fn control(&self, config: &PciConfigSpace) -> u16 {
        let b = config.bytes(self.cap_offset + 2, 2);
        match b {
            [lo, hi] => u16::from_le_bytes([*lo, *hi]),
            _ => 0,
        }
    }

    pub fn enabled(&self, config: &PciConfigSpace) -> bool {
        self.control(config) & CONTROL_ENABLE != 0
    }

    /// Sends the message if the driver enabled MSI; false when it has not.
    pub fn notify(&self, config: &PciConfigSpace) -> bool {
        if !self.enabled(config) {
            return false;
        }
        let dword = |off: usize| -> u32 {
            match config.bytes(self.cap_offset + off, 4) {
                [a, b, c, d] => u32::from_le_bytes([*a, *b, *c, *d]),
                _ => 0,
            }
        };
        let address = u64::from(dword(4)) | (u64::from(dword(8)) << 32);
        let data = dword(12) & 0xffff;
        self.sender.send(address, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Sent(Mutex<Vec<(u64, u32)>>);
    impl MsiSender for Sent {
        fn send(&self, a: u64, d: u32) {
            self.0.lock().unwrap().push((a, d));
        }
    }

    #[test]
    fn sends_only_when_enabled_with_the_programmed_message() {
        let mut config = PciConfigSpace::new(0x8086, 0x2829, 2, (1, 6, 1));
        let sent = Arc::new(Sent::default());
        let msi = Msi::new(&mut config, sent.clone()).unwrap();
        let cap = config.read_dword(0x34 / 4) as usize & 0xff;
        assert_eq!(config.read_dword(cap / 4) & 0xff, u32::from(MSI_CAP_ID));
        assert!(!msi.notify(&config));
        config.write(cap / 4 + 1, 0, &0xfee0_1003u32.to_le_bytes());
        config.write(cap / 4 + 2, 0, &0u32.to_le_bytes());
        config.write(cap / 4 + 3, 0, &0x4041u32.to_le_bytes());
        config.write(cap / 4, 2, &1u16.to_le_bytes());
        assert!(msi.enabled(&config));
        assert!(msi.notify(&config));
        // The low two address bits are not writable.
        assert_eq!(*sent.0.lock().unwrap(), vec![(0xfee0_1000, 0x4041)]);
    }
}
