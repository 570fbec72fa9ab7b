//! What a BIOS or UEFI guest reads over QEMU's fw_cfg interface: the machine description that
//! SeaBIOS (src/fw/paravirt.c, src/boot.c) and OVMF expect from QEMU. Only the content lives
//! here; the device that serves it is in `devices`.

use crate::acpi::{acpi_files, AcpiPlatform, RSDP_FILE, TABLES_FILE};
use crate::layout::{E820Type, HYPERVISOR_PAGES_LEN, HYPERVISOR_PAGES_START};
use crate::smbios::{smbios_files, SmbiosSpec, ANCHOR_FILE, TABLES_FILE as SMBIOS_TABLES_FILE};
use crate::table_loader::LOADER_FILE;
use crate::MemoryMap;

/// The fixed fw_cfg items this crate fills (QEMU's FW_CFG_* selectors).
pub mod item {
    pub const UUID: u16 = 0x0002;
    pub const RAM_SIZE: u16 = 0x0003;
    pub const NB_CPUS: u16 = 0x0005;
    pub const BOOT_MENU: u16 = 0x000e;
    pub const MAX_CPUS: u16 = 0x000f;
}

/// The COM1 port, for SeaBIOS's serial console.
const COM1_PORT: u16 = 0x3f8;

/// Where an entry goes: a fixed selector, or a named file in the fw_cfg directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FwCfgKey {
    Item(u16),
    File(String),
}

/// The machine as the firmware should see it.
#[derive(Debug, Clone)]
pub struct BiosSpec<'a> {
    /// The VM's UUID in RFC 4122 byte order.
    pub uuid: [u8; 16],
    pub memory: &'a MemoryMap,
    /// The ACPI platform; its vCPU count is also the firmware's (no CPU hotplug).
    pub acpi: &'a AcpiPlatform,
    /// OpenFirmware device paths, first choice first (see [`crate::boot_path`]); empty for
    /// the firmware's own order.
    pub boot_order: Vec<String>,
    /// Offer the boot menu (F12 in SeaBIOS).
    pub boot_menu: bool,
    /// How long the boot menu prompt waits, in milliseconds.
    pub boot_menu_wait_ms: Option<u16>,
    /// Put SeaBIOS's console on COM1, for headless guests.
    pub serial_console: bool,
    /// How long SeaBIOS waits after no device booted before it reboots, in milliseconds
    /// (SeaBIOS's default is 60 s).
    pub boot_fail_wait_ms: Option<u32>,
}

/// Every fw_cfg entry the firmware reads, for the vmm to add to the device.
pub fn bios_config(spec: &BiosSpec) -> Vec<(FwCfgKey, Vec<u8>)> {
    let cpus = u16::from(spec.acpi.cpus);
    let file = |name: &str, data: Vec<u8>| (FwCfgKey::File(name.into()), data);
    let mut v = vec![
        (FwCfgKey::Item(item::UUID), spec.uuid.to_vec()),
        (
            FwCfgKey::Item(item::RAM_SIZE),
            spec.memory.total.to_le_bytes().to_vec(),
        ),
        (FwCfgKey::Item(item::NB_CPUS), cpus.to_le_bytes().to_vec()),
        (FwCfgKey::Item(item::MAX_CPUS), cpus.to_le_bytes().to_vec()),
        (
            FwCfgKey::Item(item::BOOT_MENU),
            u16::from(spec.boot_menu).to_le_bytes().to_vec(),
        ),
        file("etc/e820", e820(spec.memory)),
    ];
    if !spec.boot_order.is_empty() {
        v.push(file("bootorder", spec.boot_order.join("\n").into_bytes()));
    }
    if let Some(ms) = spec.boot_menu_wait_ms {
        v.push(file("etc/boot-menu-wait", ms.to_le_bytes().to_vec()));
    }
    if spec.serial_console {
        v.push(file("etc/sercon-port", COM1_PORT.to_le_bytes().to_vec()));
    }
    if let Some(ms) = spec.boot_fail_wait_ms {
        v.push(file("etc/boot-fail-wait", ms.to_le_bytes().to_vec()));
    }
    let acpi = acpi_files(spec.acpi);
    v.push(file(TABLES_FILE, acpi.tables));
    v.push(file(RSDP_FILE, acpi.rsdp));
    v.push(file(LOADER_FILE, acpi.loader.to_bytes()));
    let smbios = smbios_files(&SmbiosSpec {
        uuid: spec.uuid,
        cpus: spec.acpi.cpus,
        memory: spec.memory,
    });
    v.push(file(ANCHOR_FILE, smbios.anchor));
    v.push(file(SMBIOS_TABLES_FILE, smbios.tables));
    v
}

/// `etc/e820`: packed {u64 address, u64 length, u32 type} entries. Like QEMU, whole RAM ranges
/// from 0: SeaBIOS carves out the EBDA and its own areas, and takes its RAM size from here.
fn e820(memory: &MemoryMap) -> Vec<u8> {
    let ram = memory
        .ram_ranges()
        .into_iter()
        .map(|(addr, len)| (addr.0, len, E820Type::Ram));
    // SeaBIOS reserves these pages itself only when there is no etc/e820.
    let hypervisor = (
        HYPERVISOR_PAGES_START,
        HYPERVISOR_PAGES_LEN,
        E820Type::Reserved,
    );
    ram.chain([hypervisor])
        .flat_map(|(addr, len, kind)| {
            let mut e = Vec::with_capacity(20);
            e.extend_from_slice(&addr.to_le_bytes());
            e.extend_from_slice(&len.to_le_bytes());
            e.extend_from_slice(&(kind as u32).to_le_bytes());
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot_path::{ahci_disk_path, virtio_scsi_disk_path};
    use crate::layout::{FOUR_GIB, PCI_HOLE_START};

    fn find(v: &[(FwCfgKey, Vec<u8>)], key: FwCfgKey) -> Option<&[u8]> {
        v.iter().find(|(k, _)| *k == key).map(|(_, d)| d.as_slice())
    }

    fn file<'a>(v: &'a [(FwCfgKey, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
        find(v, FwCfgKey::File(name.into()))
    }

    #[test]
    fn items_and_files_have_qemus_sizes() {
        let mem = MemoryMap::new(5 << 30).unwrap();
        let acpi = crate::acpi::test_platform(3);
        let uuid: [u8; 16] = core::array::from_fn(|i| i as u8);
        let spec = BiosSpec {
            uuid,
            memory: &mem,
            acpi: &acpi,
            boot_order: vec![ahci_disk_path(4, 0, 0), virtio_scsi_disk_path(3, 0, 0, 0)],
            boot_menu: true,
            boot_menu_wait_ms: Some(2500),
            serial_console: true,
            boot_fail_wait_ms: Some(5000),
        };
        let v = bios_config(&spec);
        assert_eq!(find(&v, FwCfgKey::Item(item::UUID)), Some(&uuid[..]));
        assert_eq!(
            find(&v, FwCfgKey::Item(item::RAM_SIZE)),
            Some(&(5u64 << 30).to_le_bytes()[..])
        );
        assert_eq!(find(&v, FwCfgKey::Item(item::NB_CPUS)), Some(&[3, 0][..]));
        assert_eq!(find(&v, FwCfgKey::Item(item::MAX_CPUS)), Some(&[3, 0][..]));
        assert_eq!(find(&v, FwCfgKey::Item(item::BOOT_MENU)), Some(&[1, 0][..]));
        assert_eq!(
            file(&v, "bootorder"),
            Some(
                &b"/pci@i0cf8/pci8086,2829@4/drive@0/disk@0\n/pci@i0cf8/scsi@3/channel@0/disk@0,0"
                    [..]
            )
        );
        assert_eq!(
            file(&v, "etc/boot-menu-wait"),
            Some(&2500u16.to_le_bytes()[..])
        );
        assert_eq!(file(&v, "etc/sercon-port"), Some(&[0xf8, 0x03][..]));
        assert_eq!(
            file(&v, "etc/boot-fail-wait"),
            Some(&5000u32.to_le_bytes()[..])
        );
        for name in [
            "etc/acpi/tables",
            "etc/acpi/rsdp",
            "etc/table-loader",
            "etc/smbios/smbios-anchor",
            "etc/smbios/smbios-tables",
        ] {
            assert!(file(&v, name).is_some_and(|d| !d.is_empty()), "{name}");
        }
        // No two entries share a key.
        for (i, (k, _)) in v.iter().enumerate() {
            assert!(v[i + 1..].iter().all(|(o, _)| o != k), "{k:?}");
        }

        let e820 = file(&v, "etc/e820").unwrap();
        assert_eq!(e820.len(), 3 * 20);
        let entries: Vec<(u64, u64, u32)> = e820
            .chunks(20)
            .map(|e| {
                (
                    u64::from_le_bytes(e[0..8].try_into().unwrap()),
                    u64::from_le_bytes(e[8..16].try_into().unwrap()),
                    u32::from_le_bytes(e[16..20].try_into().unwrap()),
                )
            })
            .collect();
        assert_eq!(
            entries,
            vec![
                (0, PCI_HOLE_START, 1),
                (FOUR_GIB, (5 << 30) - PCI_HOLE_START, 1),
                (0xfeff_c000, 0x4000, 2),
            ]
        );
    }

    #[test]
    fn optional_files_are_left_out() {
        let mem = MemoryMap::new(256 << 20).unwrap();
        let acpi = crate::acpi::test_platform(3);
        let v = bios_config(&BiosSpec {
            uuid: [0; 16],
            memory: &mem,
            acpi: &acpi,
            boot_order: vec![],
            boot_menu: false,
            boot_menu_wait_ms: None,
            serial_console: false,
            boot_fail_wait_ms: None,
        });
        for name in [
            "bootorder",
            "etc/boot-menu-wait",
            "etc/sercon-port",
            "etc/boot-fail-wait",
        ] {
            assert!(file(&v, name).is_none(), "{name}");
        }
        assert_eq!(find(&v, FwCfgKey::Item(item::BOOT_MENU)), Some(&[0, 0][..]));
        assert_eq!(file(&v, "etc/e820").unwrap().len(), 2 * 20);
    }
}
