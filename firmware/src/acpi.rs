//! ACPI tables for the PC machine, built with the acpi_tables crate: RSDP, XSDT, FADT (PM1
//! block, reset register), FACS, DSDT (\_S5, the PCI root bridge with its interrupt routing, the
//! ISA devices, the pvpanic device) and MADT (one local APIC per vCPU, the IOAPIC).

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Name, Package,
    ResourceTemplate, IO,
};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::FADTBuilder;
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{Immutable, IntoBytes};

use crate::layout::{
    ACPI_START, BIOS_END, IOAPIC_ADDR, LAPIC_ADDR, PCI_MMIO32_END, PCI_MMIO32_START,
};
use crate::FirmwareError;

const OEM_ID: [u8; 6] = *b"FERRY ";
const OEM_TABLE_ID: [u8; 8] = *b"FERRYVM ";
const OEM_REVISION: u32 = 1;

/// The platform's fixed hardware, as the devices crate places it.
#[derive(Debug, Clone)]
pub struct AcpiPlatform {
    pub cpus: u8,
    pub pm1_evt_blk: u16,
    pub pm1_evt_len: u8,
    pub pm1_cnt_blk: u16,
    pub pm1_cnt_len: u8,
    pub sci_irq: u16,
    pub s5_slp_typ: u8,
    /// I/O port and value of the reset register.
    pub reset_port: u16,
    pub reset_value: u8,
    pub century_cmos_index: u8,
    pub pvpanic_port: u16,
}

/// First GSI used for PCI INTx; ISA owns 0..16 and KVM's IOAPIC has 24 pins.
pub const PCI_GSI_BASE: u32 = 16;
const PCI_GSI_COUNT: u32 = 8;

/// The GSI that INTx `pin` (0 = INTA) of PCI `slot` raises: the usual rotation, so functions
/// in neighbouring slots spread over the eight lines.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_GSI_BASE + (u32::from(slot) + u32::from(pin)) % PCI_GSI_COUNT
}

const MADT_PCAT_COMPAT: u32 = 1;

/// Interrupt Source Override (MADT type 2).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

/// Local APIC NMI (MADT type 4).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    processor_uid: u8,
    flags: u16,
    lint: u8,
}

macro_rules! raw_aml {
    ($t:ty) => {
        impl Aml for $t {
            fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
                sink.vec(self.as_bytes());
            }
        }
    };
}
raw_aml!(InterruptSourceOverride);
raw_aml!(LocalApicNmi);

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

fn dsdt(p: &AcpiPlatform) -> Vec<u8> {
    let mut body = Vec::new();

    // \_S5: the sleep type the PM1 control register turns into power-off.
    let s5_typ = p.s5_slp_typ;
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&s5_typ, &s5_typ, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);

    // The PCI root bridge with its windows and INTx routing (GSIs, no link devices).
    let prt_entries: Vec<(u32, u8, u32)> = (1u8..32)
        .flat_map(|slot| {
            (0u8..4).map(move |pin| {
                (
                    (u32::from(slot) << 16) | 0xffff,
                    pin,
                    pci_intx_gsi(slot, pin),
                )
            })
        })
        .collect();
    let prt_pkgs: Vec<Package> = prt_entries
        .iter()
        .map(|(addr, pin, gsi)| Package::new(vec![addr, pin, &aml::ZERO, gsi]))
        .collect();
    let prt_refs: Vec<&dyn Aml> = prt_pkgs.iter().map(|p| p as &dyn Aml).collect();
    let bus_range = AddressSpace::new_bus_number(0u16, 0xffu16);
    let cfg_ports = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let mmio32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        PCI_MMIO32_END as u32,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus_range, &cfg_ports, &io_low, &io_high, &mmio32]);
    Device::new(
        "_SB_.PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_ADR".into(), &aml::ZERO),
            &Name::new("_SEG".into(), &aml::ZERO),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_BBN".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &crs),
            &Name::new("_PRT".into(), &Package::new(prt_refs)),
        ],
    )
    .to_aml_bytes(&mut body);

    // ISA devices, so the guest's PNP layer binds its drivers to fixed resources.
    let isa = |path: &str, hid: &str, uid: u8, ports: &[(u16, u8)], irq: Option<u32>| {
        let ios: Vec<IO> = ports.iter().map(|&(b, l)| IO::new(b, b, 1, l)).collect();
        let int = irq.map(|n| Interrupt::new(true, true, false, false, n));
        let mut res: Vec<&dyn Aml> = ios.iter().map(|i| i as &dyn Aml).collect();
        if let Some(i) = &int {
            res.push(i);
        }
        bytes_of(&Device::new(
            path.into(),
            vec![
                &Name::new("_HID".into(), &EISAName::new(hid)),
                &Name::new("_UID".into(), &uid),
                &Name::new("_CRS".into(), &ResourceTemplate::new(res)),
            ],
        ))
    };
    body.extend(isa("_SB_.COM1", "PNP0501", 1, &[(0x3f8, 8)], Some(4)));
    body.extend(isa("_SB_.RTC_", "PNP0B00", 0, &[(0x70, 2)], Some(8)));
    body.extend(isa(
        "_SB_.KBD_",
        "PNP0303",
        0,
        &[(0x60, 1), (0x64, 1)],
        Some(1),
    ));
    // pvpanic matches on the string _HID "QEMU0001".
    let pvpanic_io = IO::new(p.pvpanic_port, p.pvpanic_port, 1, 1);
    Device::new(
        "_SB_.PEVT".into(),
        vec![
            &Name::new("_HID".into(), &"QEMU0001"),
            &Name::new("_CRS".into(), &ResourceTemplate::new(vec![&pvpanic_io])),
        ],
    )
    .to_aml_bytes(&mut body);

    let mut sdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn madt(p: &AcpiPlatform) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..p.cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    // The SCI is level-triggered, active high, as the PM block drives it.
    madt.add_structure(InterruptSourceOverride {
        kind: 2,
        length: 10,
        bus: 0,
        source: p.sci_irq as u8,
        gsi: u32::from(p.sci_irq),
        flags: 0b1101,
    });
    // NMIs arrive on LINT1 of every processor.
    madt.add_structure(LocalApicNmi {
        kind: 4,
        length: 6,
        processor_uid: 0xff,
        flags: 0,
        lint: 1,
    });
    let mut bytes = bytes_of(&madt);
    // The crate leaves the flags at zero; guests want to know there are 8259s too.
    bytes[40..44].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    fix_checksum(&mut bytes);
    bytes
}

fn fadt(p: &AcpiPlatform, dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    let io = |port: u16, len: u8| {
        GAS::new(
            GasSpace::SystemIo,
            len * 8,
            0,
            AccessSize::Undefined,
            u64::from(port),
        )
    };
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr);
    // Legacy 32-bit pointers too, for guests that predate ACPI 2.0.
    f.dsdt = (dsdt_addr as u32).into();
    f.firmware_ctrl = (facs_addr as u32).into();
    f.sci_int = p.sci_irq.into();
    // No SMI command port: the machine is always in ACPI mode.
    f.smi_cmd = 0.into();
    f.pm1a_evt_blk = u32::from(p.pm1_evt_blk).into();
    f.pm1a_cnt_blk = u32::from(p.pm1_cnt_blk).into();
    f.pm1_evt_len = p.pm1_evt_len;
    f.pm1_cnt_len = p.pm1_cnt_len;
    f.x_pm1a_evt_blk = io(p.pm1_evt_blk, p.pm1_evt_len);
    f.x_pm1a_cnt_blk = io(p.pm1_cnt_blk, p.pm1_cnt_len);
    f.century = p.century_cmos_index;
    // Legacy devices present, an 8042, no VGA.
    f.iapc_boot_arch = 0b111.into();
    f.flags = (1u32 << 0 | 1 << 2 | 1 << 4 | 1 << 5 | 1 << 10).into(); // WBINVD, C1, no power/sleep buttons, reset reg
    f.reset_reg = GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(p.reset_port),
    );
    f.reset_value = p.reset_value;
    bytes_of(&f.finalize())
}

/// Writes the tables into the BIOS area and returns the RSDP's address.
pub fn write_acpi_tables(mem: &GuestMemoryMmap, p: &AcpiPlatform) -> Result<u64, FirmwareError> {
    let mut cursor = ACPI_START;
    let mut place = |bytes: &[u8], align: u64| -> Result<u64, FirmwareError> {
        let addr = cursor.next_multiple_of(align);
        let end = addr + bytes.len() as u64;
        if end > BIOS_END {
            return Err(FirmwareError::Layout(
                "ACPI tables overflow the BIOS area".into(),
            ));
        }
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| FirmwareError::GuestMemory {
                what: "the ACPI tables",
                detail: e.to_string(),
            })?;
        cursor = end;
        Ok(addr)
    };

    // The RSDP goes first, on a 16-byte boundary the guest's BIOS-area scan finds.
    let rsdp_addr = ACPI_START;
    place(&[0u8; 36], 16)?;
    let facs_addr = place(&bytes_of(&FACS::new()), 64)?;
    let dsdt_addr = place(&dsdt(p), 16)?;
    let fadt_addr = place(&fadt(p, dsdt_addr, facs_addr), 16)?;
    let madt_addr = place(&madt(p), 16)?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&bytes_of(&xsdt), 16)?;
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    mem.write_slice(&rsdp, GuestAddress(rsdp_addr))
        .map_err(|e| FirmwareError::GuestMemory {
            what: "the RSDP",
            detail: e.to_string(),
        })?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(cpus: u8) -> AcpiPlatform {
        AcpiPlatform {
            cpus,
            pm1_evt_blk: 0x600,
            pm1_evt_len: 4,
            pm1_cnt_blk: 0x604,
            pm1_cnt_len: 2,
            sci_irq: 9,
            s5_slp_typ: 5,
            reset_port: 0xcf9,
            reset_value: 6,
            century_cmos_index: 0x32,
            pvpanic_port: 0x505,
        }
    }

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let mut hdr = [0u8; 8];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        t
    }

    #[test]
    fn tables_chain_from_rsdp_with_valid_checksums() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp_addr = write_acpi_tables(&mem, &platform(4)).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt = table_at(&mem, u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fadt = table_at(&mem, entries[0]);
        let madt = table_at(&mem, entries[1]);
        assert_eq!(&fadt[0..4], b"FACP");
        assert!(checksum_ok(&fadt));
        // PM1a control block and the reset register.
        assert_eq!(u32::from_le_bytes(fadt[64..68].try_into().unwrap()), 0x604);
        assert_eq!(
            u64::from_le_bytes(fadt[120..128].try_into().unwrap()),
            0xcf9
        );
        assert_eq!(fadt[128], 6);
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&mem, dsdt_addr);
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(8).any(|w| w == b"QEMU0001"));
        assert_eq!(&madt[0..4], b"APIC");
        assert!(checksum_ok(&madt));
        assert_eq!(u32::from_le_bytes(madt[40..44].try_into().unwrap()), 1);
        // Four local APIC entries (type 0, length 8) with ids 0..3.
        let mut ids = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            if madt[off] == 0 {
                ids.push(madt[off + 3]);
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!(ids, vec![0, 1, 2, 3]);
    }

    #[test]
    fn intx_rotation_stays_on_pci_lines() {
        for slot in 0..32 {
            for pin in 0..4 {
                let g = pci_intx_gsi(slot, pin);
                assert!((16..24).contains(&g));
            }
        }
        assert_ne!(pci_intx_gsi(1, 0), pci_intx_gsi(2, 0));
    }
}
