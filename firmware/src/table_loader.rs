//! The fw_cfg table loader (`etc/table-loader`): a script of 128-byte commands that tells the
//! firmware where to put fw_cfg blobs, which fields in them are pointers to other blobs, and
//! which checksums to fix once those pointers hold addresses. SeaBIOS runs it in
//! src/fw/romfile_loader.c and OVMF in its AcpiPlatformDxe; direct Linux boot runs it here
//! ([`TableLoader::run`]), so both boot paths place tables by the same rules.

use std::collections::BTreeMap;

use crate::FirmwareError;

/// The fw_cfg file that carries the script.
pub const LOADER_FILE: &str = "etc/table-loader";

const ENTRY_SIZE: usize = 128;
/// File names are NUL-terminated inside 56 bytes.
const NAME_SIZE: usize = 56;

const CMD_ALLOCATE: u32 = 1;
const CMD_ADD_POINTER: u32 = 2;
const CMD_ADD_CHECKSUM: u32 = 3;

/// Where the firmware allocates a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// High memory (below 4 GiB), for the bulk of the tables.
    High = 1,
    /// The F segment (0xf0000..0x100000), where guests scan for anchors like the RSDP.
    FSeg = 2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoaderCommand {
    /// Copy the whole file into guest memory at an `align`-aligned address in `zone`.
    Allocate {
        file: String,
        align: u32,
        zone: Zone,
    },
    /// Add the address of `src_file` to the little-endian `size`-byte field at `offset` in
    /// `dest_file`: the field holds an offset into `src_file` until then.
    AddPointer {
        dest_file: String,
        src_file: String,
        offset: u32,
        size: u8,
    },
    /// Make the bytes `start..start + length` of `file` sum to zero by adjusting the byte at
    /// `offset` (which lies inside that range).
    AddChecksum {
        file: String,
        offset: u32,
        start: u32,
        length: u32,
    },
}

/// A table-loader script under construction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableLoader {
    commands: Vec<LoaderCommand>,
}

impl TableLoader {
    pub fn allocate(&mut self, file: &str, align: u32, zone: Zone) {
        self.commands.push(LoaderCommand::Allocate {
            file: file.into(),
            align,
            zone,
        });
    }

    pub fn add_pointer(&mut self, dest_file: &str, src_file: &str, offset: u32, size: u8) {
        self.commands.push(LoaderCommand::AddPointer {
            dest_file: dest_file.into(),
            src_file: src_file.into(),
            offset,
            size,
        });
    }

    pub fn add_checksum(&mut self, file: &str, offset: u32, start: u32, length: u32) {
        self.commands.push(LoaderCommand::AddChecksum {
            file: file.into(),
            offset,
            start,
            length,
        });
    }

    pub fn commands(&self) -> &[LoaderCommand] {
        &self.commands
    }

    /// The script as the firmware reads it: little-endian, every entry zero-padded to 128 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.commands.len() * ENTRY_SIZE);
        for c in &self.commands {
            let mut e = [0u8; ENTRY_SIZE];
            match c {
                LoaderCommand::Allocate { file, align, zone } => {
                    e[0..4].copy_from_slice(&CMD_ALLOCATE.to_le_bytes());
                    put_name(&mut e[4..60], file);
                    e[60..64].copy_from_slice(&align.to_le_bytes());
                    e[64] = *zone as u8;
                }
                LoaderCommand::AddPointer {
                    dest_file,
                    src_file,
                    offset,
                    size,
                } => {
                    e[0..4].copy_from_slice(&CMD_ADD_POINTER.to_le_bytes());
                    put_name(&mut e[4..60], dest_file);
                    put_name(&mut e[60..116], src_file);
                    e[116..120].copy_from_slice(&offset.to_le_bytes());
                    e[120] = *size;
                }
                LoaderCommand::AddChecksum {
                    file,
                    offset,
                    start,
                    length,
                } => {
                    e[0..4].copy_from_slice(&CMD_ADD_CHECKSUM.to_le_bytes());
                    put_name(&mut e[4..60], file);
                    e[60..64].copy_from_slice(&offset.to_le_bytes());
                    e[64..68].copy_from_slice(&start.to_le_bytes());
                    e[68..72].copy_from_slice(&length.to_le_bytes());
                }
            }
            out.extend_from_slice(&e);
        }
        out
    }

    /// Reads a script back; commands this code does not know are skipped, as SeaBIOS does.
    pub fn parse(bytes: &[u8]) -> Result<Self, FirmwareError> {
        if !bytes.len().is_multiple_of(ENTRY_SIZE) {
            return Err(invalid(format!(
                "its length {} is not a multiple of {ENTRY_SIZE}",
                bytes.len()
            )));
        }
        let mut commands = Vec::new();
        for e in bytes.chunks_exact(ENTRY_SIZE) {
            let u32_at = |o: usize| u32::from_le_bytes([e[o], e[o + 1], e[o + 2], e[o + 3]]);
            match u32_at(0) {
                CMD_ALLOCATE => commands.push(LoaderCommand::Allocate {
                    file: get_name(&e[4..60])?,
                    align: u32_at(60),
                    zone: match e[64] {
                        1 => Zone::High,
                        2 => Zone::FSeg,
                        z => return Err(invalid(format!("unknown allocation zone {z}"))),
                    },
                }),
                CMD_ADD_POINTER => commands.push(LoaderCommand::AddPointer {
                    dest_file: get_name(&e[4..60])?,
                    src_file: get_name(&e[60..116])?,
                    offset: u32_at(116),
                    size: e[120],
                }),
                CMD_ADD_CHECKSUM => commands.push(LoaderCommand::AddChecksum {
                    file: get_name(&e[4..60])?,
                    offset: u32_at(60),
                    start: u32_at(64),
                    length: u32_at(68),
                }),
                _ => {}
            }
        }
        Ok(Self { commands })
    }

    /// Runs the script the way the firmware does: `place(file, len, align, zone)` picks each
    /// allocated file's guest address, then pointers and checksums are patched in `files`.
    /// Returns every allocated file's address.
    pub fn run(
        &self,
        files: &mut BTreeMap<String, Vec<u8>>,
        mut place: impl FnMut(&str, usize, u32, Zone) -> Result<u64, FirmwareError>,
    ) -> Result<BTreeMap<String, u64>, FirmwareError> {
        let mut addrs = BTreeMap::new();
        for c in &self.commands {
            match c {
                LoaderCommand::Allocate { file, align, zone } => {
                    let len = file_of(files, file)?.len();
                    if !align.is_power_of_two() {
                        return Err(invalid(format!("alignment {align} is not a power of two")));
                    }
                    let addr = place(file, len, *align, *zone)?;
                    addrs.insert(file.clone(), addr);
                }
                LoaderCommand::AddPointer {
                    dest_file,
                    src_file,
                    offset,
                    size,
                } => {
                    let src = *addrs
                        .get(src_file)
                        .ok_or_else(|| invalid(format!("{src_file} is used before allocation")))?;
                    let dest = file_of(files, dest_file)?;
                    let (off, n) = (*offset as usize, usize::from(*size));
                    if !matches!(n, 1 | 2 | 4 | 8) || off + n > dest.len() {
                        return Err(invalid(format!("bad pointer at {dest_file}+{off}")));
                    }
                    let mut v = [0u8; 8];
                    v[..n].copy_from_slice(&dest[off..off + n]);
                    let patched = u64::from_le_bytes(v).wrapping_add(src).to_le_bytes();
                    dest[off..off + n].copy_from_slice(&patched[..n]);
                }
                LoaderCommand::AddChecksum {
                    file,
                    offset,
                    start,
                    length,
                } => {
                    let data = file_of(files, file)?;
                    let (off, s, l) = (*offset as usize, *start as usize, *length as usize);
                    if off >= data.len() || s + l > data.len() {
                        return Err(invalid(format!("bad checksum range in {file}")));
                    }
                    let sum = data[s..s + l].iter().fold(0u8, |a, b| a.wrapping_add(*b));
                    data[off] = data[off].wrapping_sub(sum);
                }
            }
        }
        Ok(addrs)
    }
}

fn invalid(detail: String) -> FirmwareError {
    FirmwareError::TableLoader(detail)
}

fn file_of<'a>(
    files: &'a mut BTreeMap<String, Vec<u8>>,
    name: &str,
) -> Result<&'a mut Vec<u8>, FirmwareError> {
    files
        .get_mut(name)
        .ok_or_else(|| invalid(format!("it names {name}, which is not a file")))
}

fn put_name(field: &mut [u8], name: &str) {
    // Our own names are constants; one that does not fit with its NUL is a bug here.
    assert!(name.len() < NAME_SIZE, "fw_cfg file name too long: {name}");
    field[..name.len()].copy_from_slice(name.as_bytes());
}

fn get_name(field: &[u8]) -> Result<String, FirmwareError> {
    let end = field
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| invalid("a file name lacks its NUL".into()))?;
    String::from_utf8(field[..end].to_vec()).map_err(|_| invalid("a file name is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_have_the_seabios_layout() {
        let mut l = TableLoader::default();
        l.allocate("etc/acpi/rsdp", 16, Zone::FSeg);
        l.add_pointer("etc/acpi/rsdp", "etc/acpi/tables", 16, 4);
        l.add_checksum("etc/acpi/rsdp", 8, 0, 20);
        let b = l.to_bytes();
        assert_eq!(b.len(), 3 * 128);
        assert_eq!(&b[0..4], &[1, 0, 0, 0]);
        assert_eq!(&b[4..17], b"etc/acpi/rsdp");
        assert_eq!(b[17], 0);
        assert_eq!(&b[60..64], &[16, 0, 0, 0]);
        assert_eq!(b[64], 2);
        let p = &b[128..256];
        assert_eq!(p[0], 2);
        assert_eq!(&p[60..75], b"etc/acpi/tables");
        assert_eq!(&p[116..121], &[16, 0, 0, 0, 4]);
        let c = &b[256..];
        assert_eq!(c[0], 3);
        assert_eq!(&c[60..72], &[8, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0]);
        assert!(c[72..].iter().all(|&x| x == 0));
        assert_eq!(TableLoader::parse(&b).unwrap(), l);
    }

    #[test]
    fn run_patches_pointers_and_checksums() {
        let mut l = TableLoader::default();
        l.allocate("a", 64, Zone::High);
        l.allocate("b", 16, Zone::FSeg);
        l.add_pointer("b", "a", 0, 4);
        l.add_checksum("b", 4, 0, 8);
        let mut files = BTreeMap::from([
            ("a".to_string(), vec![0u8; 100]),
            ("b".to_string(), vec![0x10, 0, 0, 0, 0, 0, 0, 0]),
        ]);
        let addrs = l
            .run(&mut files, |name, _, _, _| {
                Ok(if name == "a" { 0x1000_0000 } else { 0xf_0000 })
            })
            .unwrap();
        assert_eq!(addrs["b"], 0xf_0000);
        let b = &files["b"];
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 0x1000_0010);
        assert_eq!(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
    }

    #[test]
    fn bad_scripts_are_errors() {
        assert!(TableLoader::parse(&[0u8; 100]).is_err());
        let mut l = TableLoader::default();
        l.add_pointer("b", "a", 0, 4);
        let mut files = BTreeMap::from([("b".to_string(), vec![0u8; 8])]);
        assert!(l.run(&mut files, |_, _, _, _| Ok(0)).is_err());
    }
}
