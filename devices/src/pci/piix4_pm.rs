//! The PIIX4 power-management function (PCI 8086:7113) at 00:01.3: firmware finds the ACPI
//! register block through its PMBA register (OVMF's timer library reads the PM timer's port
//! from it) and asks it about SMM.
//!
//! The block stays where the FADT puts it: PMBA and the enable bit read back fixed, whatever
//! firmware writes. ferry offers no SMM, and says so the way SeaBIOS checks: APMC_EN already
//! set in DEVACTB means "SMM set up", so SeaBIOS skips it instead of waiting for an SMI.

use super::PciConfigSpace;

const PMBA: usize = 0x40;
const DEVACTB: usize = 0x58;
const APMC_EN: u32 = 1 << 25;
const PMREGMISC: usize = 0x80;
const PMIOSE: u8 = 1 << 0;
const IO_SPACE: u32 = 1;

/// The function's configuration space; `pm_base` is the I/O port of the ACPI PM1 block.
pub fn piix4_pm(pm_base: u16) -> PciConfigSpace {
    let mut config = PciConfigSpace::new(0x8086, 0x7113, 0x03, (0x06, 0x80, 0x00));
    config.set(PMBA, &(u32::from(pm_base) | IO_SPACE).to_le_bytes());
    config.set(DEVACTB, &APMC_EN.to_le_bytes());
    config.set(PMREGMISC, &[PMIOSE]);
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::PciDevice;

    #[test]
    fn pm_block_is_fixed_and_smm_reads_as_done() {
        let mut pm = piix4_pm(0x600);
        assert_eq!(pm.config_read(0), 0x7113_8086);
        assert_eq!(pm.config_read(PMBA / 4), 0x601);
        // OVMF programs its own base (0xb000); the block does not move.
        pm.config_write(PMBA / 4, 0, &0xb001u32.to_le_bytes());
        assert_eq!(pm.config_read(PMBA / 4), 0x601);
        assert_eq!(pm.config_read(DEVACTB / 4) & APMC_EN, APMC_EN);
        assert_eq!(pm.config_read(PMREGMISC / 4) & 0xff, 1);
    }
}
