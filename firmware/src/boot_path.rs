//! OpenFirmware device paths for the `bootorder` fw_cfg file, in the form QEMU writes them.
//! SeaBIOS (src/boot.c) matches each disk it finds against these lines as a glob prefix:
//! `/pci@i0cf8/*@SLOT[,FUNC]` for the controller, then `/drive@PORT/disk@0` for ATA and AHCI,
//! `/*@0/*@TARGET,LUN` for SCSI, all numbers in lower-case hex with no leading zeros.

/// The root PCI bus behind the 0xcf8 configuration ports.
const PCI_ROOT: &str = "/pci@i0cf8";

/// Vendor and device id of ferry's AHCI controller (devices::ahci, an ICH8M). QEMU names a PCI
/// device after its class where that class has an OpenFirmware name (SCSI: `scsi`, IDE: `ide`)
/// and as `pciVVVV,DDDD` otherwise, as for SATA.
const AHCI_NAME: &str = "pci8086,2829";

/// The path of a PCI function on the root bus: `/pci@i0cf8/NAME@SLOT[,FUNC]`.
pub fn pci_device_path(name: &str, slot: u8, func: u8) -> String {
    if func == 0 {
        format!("{PCI_ROOT}/{name}@{slot:x}")
    } else {
        format!("{PCI_ROOT}/{name}@{slot:x},{func:x}")
    }
}

/// A disk behind a virtio-scsi controller: `/pci@i0cf8/scsi@3/channel@0/disk@0,0`.
pub fn virtio_scsi_disk_path(slot: u8, func: u8, target: u16, lun: u32) -> String {
    format!(
        "{}/channel@0/disk@{target:x},{lun:x}",
        pci_device_path("scsi", slot, func)
    )
}

/// A disk on an AHCI port (each port is its own ATA channel, the disk its master):
/// `/pci@i0cf8/pci8086,2829@4/drive@0/disk@0`.
pub fn ahci_disk_path(slot: u8, func: u8, port: u8) -> String {
    format!(
        "{}/drive@{port:x}/disk@0",
        pci_device_path(AHCI_NAME, slot, func)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_qemu_and_seabios() {
        assert_eq!(
            virtio_scsi_disk_path(3, 0, 0, 0),
            "/pci@i0cf8/scsi@3/channel@0/disk@0,0"
        );
        assert_eq!(
            virtio_scsi_disk_path(0x1a, 2, 17, 0x10),
            "/pci@i0cf8/scsi@1a,2/channel@0/disk@11,10"
        );
        assert_eq!(
            ahci_disk_path(4, 0, 0),
            "/pci@i0cf8/pci8086,2829@4/drive@0/disk@0"
        );
        assert_eq!(
            ahci_disk_path(0x1f, 2, 29),
            "/pci@i0cf8/pci8086,2829@1f,2/drive@1d/disk@0"
        );
        assert_eq!(pci_device_path("ethernet", 5, 0), "/pci@i0cf8/ethernet@5");
    }

    /// SeaBIOS's glob_prefix: `*` skips to the next `/` or the glob's next character, and the
    /// glob must end where the path ends or at a `/`.
    fn glob_prefix(glob: &str, path: &str) -> bool {
        let (g, s) = (glob.as_bytes(), path.as_bytes());
        let (mut i, mut j) = (0, 0);
        loop {
            if i == g.len() && (j == s.len() || s[j] == b'/') {
                return true;
            }
            if i < g.len() && g[i] == b'*' {
                if j == s.len() || s[j] == b'/' || g.get(i + 1) == s.get(j) {
                    i += 1;
                } else {
                    j += 1;
                }
                continue;
            }
            if i == g.len() || j == s.len() || g[i] != s[j] {
                return false;
            }
            i += 1;
            j += 1;
        }
    }

    #[test]
    fn seabios_finds_the_disks() {
        // What build_scsi_path and build_ata_path make for the same devices.
        assert!(glob_prefix(
            "/pci@i0cf8/*@3/*@0/*@0,0",
            &virtio_scsi_disk_path(3, 0, 0, 0)
        ));
        assert!(glob_prefix(
            "/pci@i0cf8/*@1a,2/*@0/*@11,10",
            &virtio_scsi_disk_path(0x1a, 2, 17, 0x10)
        ));
        assert!(!glob_prefix(
            "/pci@i0cf8/*@3/*@0/*@1,0",
            &virtio_scsi_disk_path(3, 0, 0, 0)
        ));
        assert!(glob_prefix(
            "/pci@i0cf8/*@4/drive@2/disk@0",
            &ahci_disk_path(4, 0, 2)
        ));
        assert!(!glob_prefix(
            "/pci@i0cf8/*@4/drive@0/disk@0",
            &ahci_disk_path(4, 0, 2)
        ));
    }
}
