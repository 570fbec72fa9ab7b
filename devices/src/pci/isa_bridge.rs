//! The PIIX3 PCI-to-ISA bridge (PCI 8086:7000) at 00:01.0: where firmware and older guests
//! look for the PC's legacy side, and its PIRQ route registers, which SeaBIOS programs.
//!
//! The routes are kept for the guest to read back. ferry's PCI lines reach the IOAPIC at GSI
//! 16..23 as the DSDT's _PRT says; a guest that runs the 8259 PIC alone (no APIC) does not
//! get PCI INTx, which QEMU would route through these registers.

use super::PciConfigSpace;

/// PIRQA..PIRQD route control: IRQ number in bits 0-3, bit 7 set = not routed.
const PIRQ_ROUTE: usize = 0x60;
const PIRQ_COUNT: usize = 4;
const PIRQ_DISABLED: u8 = 0x80;
const HEADER_TYPE: usize = 0x0e;
/// Function 0 of a multi-function device, as on a PIIX (IDE, USB and PM are functions 1-3).
const MULTI_FUNCTION: u8 = 0x80;

/// The bridge's configuration space, which is all there is of it.
pub fn isa_bridge() -> PciConfigSpace {
    let mut config = PciConfigSpace::new(0x8086, 0x7000, 0x00, (0x06, 0x01, 0x00));
    config.set(HEADER_TYPE, &[MULTI_FUNCTION]);
    config.set(PIRQ_ROUTE, &[PIRQ_DISABLED; PIRQ_COUNT]);
    config.set_writable(PIRQ_ROUTE, &[0x8f; PIRQ_COUNT]);
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::PciDevice;

    #[test]
    fn identifies_as_piix3_and_keeps_pirq_routes() {
        let mut b = isa_bridge();
        assert_eq!(b.config_read(0), 0x7000_8086);
        assert_eq!(b.config_read(0x08 / 4) >> 8, 0x06_01_00);
        assert_eq!((b.config_read(0x0c / 4) >> 16) & 0xff, 0x80);
        assert_eq!(b.config_read(PIRQ_ROUTE / 4), 0x8080_8080);
        // SeaBIOS routes PIRQA..D to IRQs 10, 10, 11, 11.
        b.config_write(PIRQ_ROUTE / 4, 0, &[10, 10, 11, 11]);
        assert_eq!(b.config_read(PIRQ_ROUTE / 4), 0x0b0b_0a0a);
        // Reserved bits 4-6 stay clear.
        b.config_write(PIRQ_ROUTE / 4, 0, &[0xff]);
        assert_eq!(b.config_read(PIRQ_ROUTE / 4) & 0xff, 0x8f);
    }
}
