//! ACPI tables for the PC machine, built with the acpi_tables crate: RSDP, RSDT and XSDT, FADT
//! (PM1 block, reset register), FACS, DSDT (\_S5, the PCI root bridge with its interrupt routing,
//! the ISA devices, the pvpanic device) and MADT (one local APIC per vCPU, the IOAPIC).
//!
//! They are built once, in the form QEMU hands firmware over fw_cfg: a blob laid out from offset
//! 0 and a table-loader script that places it and patches its pointers. SeaBIOS and OVMF run that
//! script; direct Linux boot runs it here, with the BIOS area as the only zone.

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
use std::collections::BTreeMap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{Immutable, IntoBytes};

use crate::layout::{ACPI_START, BIOS_END, IOAPIC_ADDR, LAPIC_ADDR, PCI_MMIO32_END};
use crate::table_loader::{TableLoader, Zone};
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
    /// The PM timer's port (24 bits wide).
    pub pm_tmr_blk: u16,
    pub sci_irq: u16,
    pub s5_slp_typ: u8,
    /// I/O port and value of the reset register.
    pub reset_port: u16,
    pub reset_value: u8,
    pub century_cmos_index: u8,
    pub pvpanic_port: u16,
    /// Start of the 32-bit PCI MMIO window ([`crate::MemoryMap::pci_mmio32_start`]).
    pub pci_mmio32_start: u64,
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
        p.pci_mmio32_start as u32,
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
    // The crate leaves the flags at zero; guests want to know there are 8259s too. (The
    // loader script fixes the checksum.)
    bytes[40..44].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
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
    f.pm_tmr_blk = u32::from(p.pm_tmr_blk).into();
    f.pm_tmr_len = 4;
    f.x_pm_tmr_blk = io(p.pm_tmr_blk, 4);
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

/// The fw_cfg file with every table, laid out from offset 0.
pub const TABLES_FILE: &str = "etc/acpi/tables";
/// The fw_cfg file with the RSDP, which the firmware puts where guests scan for it.
pub const RSDP_FILE: &str = "etc/acpi/rsdp";

/// The tables in their fw_cfg form: blobs whose pointer fields hold offsets into
/// [`TABLES_FILE`], and the loader script that turns them into addresses.
#[derive(Debug, Clone)]
pub struct AcpiFiles {
    pub tables: Vec<u8>,
    pub rsdp: Vec<u8>,
    pub loader: TableLoader,
}

/// Appends tables to the tables blob and tells the loader about their pointers and checksums.
struct TablesBlob {
    bytes: Vec<u8>,
    loader: TableLoader,
}

impl TablesBlob {
    /// Appends `table` at `align` and returns its offset. `pointers` are its (offset, size)
    /// fields that hold offsets into this blob; every table but the FACS carries a checksum.
    fn push(&mut self, table: &[u8], align: usize, pointers: &[(u32, u8)], checksum: bool) -> u64 {
        let at = self.bytes.len().next_multiple_of(align);
        self.bytes.resize(at, 0);
        self.bytes.extend_from_slice(table);
        let at32 = at as u32;
        for &(field, size) in pointers {
            self.loader
                .add_pointer(TABLES_FILE, TABLES_FILE, at32 + field, size);
        }
        // After the pointers: the checksum covers the patched fields.
        if checksum {
            self.loader
                .add_checksum(TABLES_FILE, at32 + 9, at32, table.len() as u32);
        }
        at as u64
    }
}

/// Builds the tables as fw_cfg blobs. Direct boot runs the same script itself
/// ([`write_acpi_tables`]), so both boot paths get the same tables.
pub fn acpi_files(p: &AcpiPlatform) -> AcpiFiles {
    let mut loader = TableLoader::default();
    // The FACS needs 64-byte alignment; it goes first, at offset 0.
    loader.allocate(TABLES_FILE, 64, Zone::High);
    let mut t = TablesBlob {
        bytes: Vec::new(),
        loader,
    };
    let facs = t.push(&bytes_of(&FACS::new()), 64, &[], false);
    let dsdt = t.push(&dsdt(p), 16, &[], true);
    // FIRMWARE_CTRL, DSDT, X_FIRMWARE_CTRL, X_DSDT.
    let fadt = t.push(
        &fadt(p, dsdt, facs),
        16,
        &[(36, 4), (40, 4), (132, 8), (140, 8)],
        true,
    );
    let madt = t.push(&madt(p), 16, &[], true);
    let entries = [fadt, madt];

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    entries.iter().for_each(|&e| xsdt.add_entry(e));
    let xsdt_ptrs: Vec<(u32, u8)> = (0..entries.len() as u32).map(|i| (36 + 8 * i, 8)).collect();
    let xsdt = t.push(&bytes_of(&xsdt), 16, &xsdt_ptrs, true);
    // An RSDT as well: guests before ACPI 2.0 (Windows XP) read only the RSDT.
    let mut rsdt = Sdt::new(*b"RSDT", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    entries.iter().for_each(|&e| rsdt.append(e as u32));
    let rsdt_ptrs: Vec<(u32, u8)> = (0..entries.len() as u32).map(|i| (36 + 4 * i, 4)).collect();
    let rsdt = t.push(rsdt.as_slice(), 16, &rsdt_ptrs, true);

    let TablesBlob {
        bytes: tables,
        mut loader,
    } = t;
    let mut rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt));
    rsdp[16..20].copy_from_slice(&(rsdt as u32).to_le_bytes());
    loader.allocate(RSDP_FILE, 16, Zone::FSeg);
    loader.add_pointer(RSDP_FILE, TABLES_FILE, 16, 4);
    loader.add_pointer(RSDP_FILE, TABLES_FILE, 24, 8);
    // The ACPI 1.0 checksum covers the first 20 bytes; the extended one, all 36, after it.
    loader.add_checksum(RSDP_FILE, 8, 0, 20);
    loader.add_checksum(RSDP_FILE, 32, 0, rsdp.len() as u32);
    AcpiFiles {
        tables,
        rsdp,
        loader,
    }
}

/// Writes the tables into the BIOS area, for direct Linux boot, and returns the RSDP's address.
pub fn write_acpi_tables(mem: &GuestMemoryMmap, p: &AcpiPlatform) -> Result<u64, FirmwareError> {
    let AcpiFiles {
        tables,
        rsdp,
        loader,
    } = acpi_files(p);
    let mut files = BTreeMap::from([
        (TABLES_FILE.to_string(), tables),
        (RSDP_FILE.to_string(), rsdp),
    ]);
    // Both zones are the BIOS area here, where the guest's RSDP scan looks.
    let mut cursor = ACPI_START;
    let addrs = loader.run(&mut files, |_, len, align, _| {
        let addr = cursor.next_multiple_of(u64::from(align));
        cursor = addr + len as u64;
        if cursor > BIOS_END {
            return Err(FirmwareError::Layout(
                "ACPI tables overflow the BIOS area".into(),
            ));
        }
        Ok(addr)
    })?;
    for (name, bytes) in &files {
        mem.write_slice(bytes, GuestAddress(addrs[name]))
            .map_err(|e| FirmwareError::GuestMemory {
                what: "the ACPI tables",
                detail: e.to_string(),
            })?;
    }
    Ok(addrs[RSDP_FILE])
}

/// A PC platform as the vmm describes it, for this crate's tests.
#[cfg(test)]
pub(crate) fn test_platform(cpus: u8) -> AcpiPlatform {
    AcpiPlatform {
        cpus,
        pm1_evt_blk: 0x600,
        pm1_evt_len: 4,
        pm1_cnt_blk: 0x604,
        pm1_cnt_len: 2,
        pm_tmr_blk: 0x608,
        sci_irq: 9,
        s5_slp_typ: 5,
        reset_port: 0xcf9,
        reset_value: 6,
        century_cmos_index: 0x32,
        pvpanic_port: 0x505,
        pci_mmio32_start: 0x8000_0000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table_loader::LoaderCommand;

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
        let rsdp_addr = write_acpi_tables(&mem, &test_platform(4)).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt = table_at(&mem, u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[0..4], b"XSDT");
        let rsdt = table_at(
            &mem,
            u32::from_le_bytes(rsdp[16..20].try_into().unwrap()).into(),
        );
        assert_eq!(&rsdt[0..4], b"RSDT");
        assert!(checksum_ok(&rsdt));
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let rsdt_entries: Vec<u64> = rsdt[36..]
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()).into())
            .collect();
        assert_eq!(rsdt_entries, entries);
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
        assert_eq!(
            u64::from(u32::from_le_bytes(fadt[40..44].try_into().unwrap())),
            dsdt_addr
        );
        let facs_addr = u64::from_le_bytes(fadt[132..140].try_into().unwrap());
        assert_eq!(facs_addr % 64, 0);
        assert_eq!(&table_at(&mem, facs_addr)[0..4], b"FACS");
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

    fn u64_at(b: &[u8], o: usize, n: usize) -> u64 {
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(&b[o..o + n]);
        u64::from_le_bytes(v)
    }

    /// Plays SeaBIOS: reads the serialized script, allocates HIGH below 4 GiB and FSEG in the F
    /// segment, then follows the pointers in the patched blobs.
    #[test]
    fn loader_script_places_and_links_the_tables() {
        let files = acpi_files(&test_platform(2));
        let script = TableLoader::parse(&files.loader.to_bytes()).unwrap();
        assert_eq!(script, files.loader);
        // Every file is allocated before it is used, the RSDP in the F segment.
        match &script.commands()[0] {
            LoaderCommand::Allocate { file, align, zone } => {
                assert_eq!(
                    (file.as_str(), *align, *zone),
                    (TABLES_FILE, 64, Zone::High)
                );
            }
            c => panic!("first command {c:?}"),
        }
        assert!(script.commands().contains(&LoaderCommand::Allocate {
            file: RSDP_FILE.into(),
            align: 16,
            zone: Zone::FSeg,
        }));

        let mut blobs = BTreeMap::from([
            (TABLES_FILE.to_string(), files.tables),
            (RSDP_FILE.to_string(), files.rsdp),
        ]);
        let addrs = script
            .run(&mut blobs, |_, _, align, zone| {
                let base = match zone {
                    Zone::High => 0x7ffe_0000u64,
                    Zone::FSeg => 0xf_5a40,
                };
                assert_eq!(base % u64::from(align), 0);
                Ok(base)
            })
            .unwrap();
        // A flat guest memory with both blobs where the firmware put them.
        let tables = &blobs[TABLES_FILE];
        let base = addrs[TABLES_FILE];
        let at = |addr: u64| -> &[u8] {
            let off = (addr - base) as usize;
            let len = u32::from_le_bytes(tables[off + 4..off + 8].try_into().unwrap()) as usize;
            &tables[off..off + len]
        };

        let rsdp = &blobs[RSDP_FILE];
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2);
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(rsdp));
        let rsdt = at(u64_at(rsdp, 16, 4));
        let xsdt = at(u64_at(rsdp, 24, 8));
        assert_eq!((&rsdt[0..4], &xsdt[0..4]), (&b"RSDT"[..], &b"XSDT"[..]));
        let via_xsdt: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o, 8))
            .collect();
        let via_rsdt: Vec<u64> = (36..rsdt.len())
            .step_by(4)
            .map(|o| u64_at(rsdt, o, 4))
            .collect();
        assert_eq!(via_xsdt, via_rsdt);
        let sigs: Vec<&[u8]> = via_xsdt.iter().map(|&a| &at(a)[0..4]).collect();
        assert_eq!(sigs, vec![&b"FACP"[..], &b"APIC"[..]]);
        let fadt = at(via_xsdt[0]);
        for (dsdt_field, facs_field, n) in [(40, 36, 4), (140, 132, 8)] {
            assert_eq!(&at(u64_at(fadt, dsdt_field, n))[0..4], b"DSDT");
            let facs = u64_at(fadt, facs_field, n);
            assert_eq!(facs % 64, 0);
            assert_eq!(&at(facs)[0..4], b"FACS");
        }
        // Every table but the FACS (which has no checksum) sums to zero.
        let mut off = 0;
        let mut seen = 0;
        while off + 8 <= tables.len() {
            let t = at(base + off as u64);
            if &t[0..4] != b"FACS" {
                assert!(checksum_ok(t), "{}", String::from_utf8_lossy(&t[0..4]));
            }
            seen += 1;
            off = (off + t.len()).next_multiple_of(16);
        }
        assert_eq!(seen, 6);
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
