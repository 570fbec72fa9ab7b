//! The i440FX host bridge (PCI 8086:1237) at 00:00.0, as guests and SeaBIOS expect on a PC.

use super::{PciConfigSpace, PciDevice};

/// PAM0..PAM6 (BIOS shadowing control) and SMRAM: writable so firmware can program them.
const PAM_START: usize = 0x59;
const PAM_COUNT: usize = 7;
const SMRAM: usize = 0x72;

pub struct HostBridge {
    config: PciConfigSpace,
}

impl HostBridge {
    pub fn new() -> Self {
        let mut config = PciConfigSpace::new(0x8086, 0x1237, 0x02, (0x06, 0x00, 0x00));
        config.set_writable(PAM_START, &[0xff; PAM_COUNT]);
        config.set(SMRAM, &[0x02]);
        config.set_writable(SMRAM, &[0x78]);
        Self { config }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_dword(reg)
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
    }
}
