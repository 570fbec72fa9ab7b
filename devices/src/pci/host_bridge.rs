//! The i440FX host bridge (PCI 8086:1237) at 00:00.0, as guests and SeaBIOS expect on a PC.

use super::PciConfigSpace;

/// PAM0..PAM6 (BIOS shadowing control) and SMRAM: writable so firmware can program them.
const PAM_START: usize = 0x59;
const PAM_COUNT: usize = 7;
const SMRAM: usize = 0x72;

/// The host bridge: identity, PAM and SMRAM registers, nothing behind them.
pub fn host_bridge() -> PciConfigSpace {
    let mut config = PciConfigSpace::new(0x8086, 0x1237, 0x02, (0x06, 0x00, 0x00));
    config.set_writable(PAM_START, &[0xff; PAM_COUNT]);
    config.set(SMRAM, &[0x02]);
    config.set_writable(SMRAM, &[0x78]);
    config
}
