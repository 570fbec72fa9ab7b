//! The guest-physical address map of the PC machine.
//!
//! ```text
//! 0x0000_0000  RAM (low)          e820 RAM up to the EBDA
//! 0x0000_0500  GDT                boot-time descriptors for the 64-bit entry
//! 0x0000_7000  zero page          Linux boot_params
//! 0x0000_9000  page tables        identity map of the first 4 GiB (PML4, PDPT, 4 PDs)
//! 0x0002_0000  kernel cmdline
//! 0x0009_fc00  EBDA               reserved
//! 0x000e_0000  ACPI tables        reserved (the RSDP is found by a BIOS-area scan, too)
//! 0x0010_0000  RAM                kernel, initrd at the top of low RAM
//! 0xc000_0000  PCI hole           32-bit PCI MMIO, IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000 RAM (high)        what does not fit below the hole
//! ```

use vm_memory::GuestAddress;

use crate::FirmwareError;

pub const GDT_ADDR: u64 = 0x500;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000; // four pages: 0xb000..0xf000
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 0x1_0000;
pub const EBDA_START: u64 = 0x9_fc00;
pub const ACPI_START: u64 = 0xe_0000;
pub const BIOS_END: u64 = 0x10_0000;
pub const KERNEL_START: u64 = 0x10_0000;
/// Start of the 32-bit PCI hole: RAM above this moves to 4 GiB.
pub const PCI_HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 1 << 32;
const TWO_GIB: u64 = 1 << 31;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Four pages KVM keeps for Intel real mode (identity-map page, then the three TSS pages), where
/// QEMU puts them: above the LAPIC and below the 16 MiB a firmware image may fill under 4 GiB.
/// The vmm puts them here, the e820 reserves them.
pub const HYPERVISOR_PAGES_START: u64 = 0xfeff_c000;
pub const HYPERVISOR_PAGES_LEN: u64 = 0x4000;
/// End of the 32-bit MMIO window offered to PCI devices (below the IOAPIC); its start is
/// [`MemoryMap::pci_mmio32_start`].
pub const PCI_MMIO32_END: u64 = 0xfebf_ffff;

/// The smallest guest ferry boots: room for the boot structures and a kernel.
pub const MIN_MEMORY: u64 = 32 << 20;

/// e820 range types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

/// Where the guest's RAM lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryMap {
    pub total: u64,
    /// End of RAM below the PCI hole (exclusive).
    pub low_end: u64,
    /// RAM at and above 4 GiB.
    pub high_size: u64,
}

impl MemoryMap {
    pub fn new(total: u64) -> Result<Self, FirmwareError> {
        if total < MIN_MEMORY {
            return Err(FirmwareError::Layout(format!(
                "{} MiB of memory is too small; a guest needs at least {} MiB",
                total >> 20,
                MIN_MEMORY >> 20
            )));
        }
        if !total.is_multiple_of(4096) {
            return Err(FirmwareError::Layout(
                "the memory size must be a multiple of 4 KiB".into(),
            ));
        }
        let low_end = total.min(PCI_HOLE_START);
        Ok(Self {
            total,
            low_end,
            high_size: total - low_end,
        })
    }

    /// Where the 32-bit PCI MMIO window starts: where SeaBIOS puts BARs on an i440FX (2 GiB
    /// when low RAM ends at or below it, else 3 GiB), so firmware, ACPI and the buses agree.
    pub fn pci_mmio32_start(&self) -> u64 {
        if self.low_end <= TWO_GIB {
            TWO_GIB
        } else {
            PCI_HOLE_START
        }
    }

    /// The RAM ranges to back with host memory.
    pub fn ram_ranges(&self) -> Vec<(GuestAddress, u64)> {
        let mut r = vec![(GuestAddress(0), self.low_end)];
        if self.high_size > 0 {
            r.push((GuestAddress(FOUR_GIB), self.high_size));
        }
        r
    }

    /// The map the guest is told about.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut v = vec![
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Type::Ram,
            },
            E820Entry {
                addr: EBDA_START,
                size: 0xa_0000 - EBDA_START,
                kind: E820Type::Reserved,
            },
            E820Entry {
                addr: ACPI_START,
                size: BIOS_END - ACPI_START,
                kind: E820Type::Reserved,
            },
            E820Entry {
                addr: BIOS_END,
                size: self.low_end - BIOS_END,
                kind: E820Type::Ram,
            },
        ];
        if self.high_size > 0 {
            v.push(E820Entry {
                addr: FOUR_GIB,
                size: self.high_size,
                kind: E820Type::Ram,
            });
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_no_high_ram() {
        let m = MemoryMap::new(256 << 20).unwrap();
        assert_eq!(m.ram_ranges(), vec![(GuestAddress(0), 256 << 20)]);
        let e = m.e820();
        assert_eq!(e.last().unwrap().addr + e.last().unwrap().size, 256 << 20);
    }

    #[test]
    fn large_guest_skips_the_pci_hole() {
        let m = MemoryMap::new(5 << 30).unwrap();
        assert_eq!(m.low_end, PCI_HOLE_START);
        assert_eq!(m.high_size, (5 << 30) - PCI_HOLE_START);
        let ram: u64 = m
            .e820()
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        // Only the legacy holes below 1 MiB are missing from what the guest sees.
        assert_eq!(ram, (5 << 30) - (BIOS_END - EBDA_START));
        for e in m.e820() {
            assert!(e.addr + e.size <= PCI_HOLE_START || e.addr >= FOUR_GIB);
        }
    }

    #[test]
    fn pci_window_starts_where_seabios_puts_bars() {
        assert_eq!(
            MemoryMap::new(512 << 20).unwrap().pci_mmio32_start(),
            1 << 31
        );
        assert_eq!(MemoryMap::new(2 << 30).unwrap().pci_mmio32_start(), 1 << 31);
        assert_eq!(
            MemoryMap::new(5 << 29).unwrap().pci_mmio32_start(),
            PCI_HOLE_START
        );
        assert_eq!(
            MemoryMap::new(5 << 30).unwrap().pci_mmio32_start(),
            PCI_HOLE_START
        );
    }

    #[test]
    fn rejects_tiny_and_unaligned() {
        assert!(MemoryMap::new(1 << 20).is_err());
        assert!(MemoryMap::new((64 << 20) + 1).is_err());
    }
}
