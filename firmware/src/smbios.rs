//! SMBIOS 2.8 tables in QEMU's fw_cfg form: a 31-byte `_SM_` entry point
//! (`etc/smbios/smbios-anchor`) and the structure table (`etc/smbios/smbios-tables`). The
//! firmware copies the table into its own memory and fills in the entry point's table address
//! and checksums (SeaBIOS: smbios_romfile_setup in src/fw/biostables.c); it takes the
//! structure count and largest structure size from the entry point as given, and the table
//! length must equal the file's size.

use crate::MemoryMap;

pub const ANCHOR_FILE: &str = "etc/smbios/smbios-anchor";
pub const TABLES_FILE: &str = "etc/smbios/smbios-tables";

const VENDOR: &str = "ferry";
const PRODUCT: &str = "ferry VM";
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// SMBIOS wants a release date in MM/DD/YYYY; this is when the table layout last changed.
const RELEASE_DATE: &str = "01/01/2025";

/// Memory device (type 17) pieces, like QEMU's 16 GiB DIMMs; each size fits the 15-bit MiB field.
const MAX_DIMM: u64 = 16 << 30;

/// "No handle" in a structure's reference to another, e.g. for the memory error information.
const NO_HANDLE: u16 = 0xfffe;

#[derive(Debug, Clone)]
pub struct SmbiosSpec<'a> {
    /// The VM's UUID in RFC 4122 byte order.
    pub uuid: [u8; 16],
    pub cpus: u8,
    pub memory: &'a MemoryMap,
}

#[derive(Debug, Clone)]
pub struct SmbiosFiles {
    pub anchor: Vec<u8>,
    pub tables: Vec<u8>,
}

/// The structure table under construction.
#[derive(Default)]
struct Structures {
    bytes: Vec<u8>,
    count: u16,
    max_size: u16,
}

impl Structures {
    /// Appends one structure: the header, `formatted` (what follows the header) and the string
    /// set, whose strings are numbered from 1. Returns the structure's handle.
    fn add(&mut self, kind: u8, formatted: &[u8], strings: &[&str]) -> u16 {
        let handle = self.count;
        let start = self.bytes.len();
        self.bytes.push(kind);
        self.bytes.push((4 + formatted.len()) as u8);
        self.bytes.extend_from_slice(&handle.to_le_bytes());
        self.bytes.extend_from_slice(formatted);
        for s in strings {
            self.bytes.extend_from_slice(s.as_bytes());
            self.bytes.push(0);
        }
        // The set ends with an extra NUL; an empty set is two NULs.
        if strings.is_empty() {
            self.bytes.push(0);
        }
        self.bytes.push(0);
        self.count += 1;
        self.max_size = self.max_size.max((self.bytes.len() - start) as u16);
        handle
    }
}

/// A structure's formatted area, field by field.
#[derive(Default)]
struct Fields(Vec<u8>);

impl Fields {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// SMBIOS stores the UUID's first three fields little-endian; RFC 4122 has them big-endian.
pub fn smbios_uuid(rfc4122: [u8; 16]) -> [u8; 16] {
    let mut u = rfc4122;
    u[0..4].reverse();
    u[4..6].reverse();
    u[6..8].reverse();
    u
}

pub fn smbios_files(spec: &SmbiosSpec) -> SmbiosFiles {
    let mut s = Structures::default();

    // Type 0, BIOS information: ISA, PCI, selectable boot, EDD, boot from CD; ACPI and USB
    // legacy; targeted content distribution and "this is a virtual machine".
    let characteristics: u64 = 1 << 4 | 1 << 7 | 1 << 15 | 1 << 16 | 1 << 19;
    s.add(
        0,
        &Fields::default()
            .u8(1) // vendor
            .u8(2) // version
            .u16(0xe800) // starting segment, as QEMU gives it
            .u8(3) // release date
            .u8(0) // ROM size: 64 KiB units, minus one
            .u64(characteristics)
            .bytes(&[0b11, 0b10100])
            .bytes(&[0, 0]) // system BIOS release
            .bytes(&[0xff, 0xff]) // no embedded controller
            .0,
        &[VENDOR, VERSION, RELEASE_DATE],
    );

    // Type 1, system information.
    s.add(
        1,
        &Fields::default()
            .u8(1) // manufacturer
            .u8(2) // product
            .u8(3) // version
            .u8(0) // serial number
            .bytes(&smbios_uuid(spec.uuid))
            .u8(0x06) // woken by the power switch
            .u8(0) // SKU
            .u8(0) // family
            .0,
        &[VENDOR, PRODUCT, VERSION],
    );

    // Type 3, chassis: "other", all states safe, no contained elements.
    s.add(
        3,
        &Fields::default()
            .u8(1) // manufacturer
            .u8(0x01) // type: other
            .bytes(&[0, 0, 0]) // version, serial, asset tag
            .bytes(&[0x03, 0x03, 0x03]) // boot-up, power supply, thermal state: safe
            .u8(0x02) // security: unknown
            .u32(0) // OEM defined
            .bytes(&[0, 0, 0, 0]) // height, power cords, contained count and record length
            .u8(0) // SKU
            .0,
        &[VENDOR],
    );

    // Type 4, one processor per vCPU, one core and thread each.
    for cpu in 0..spec.cpus {
        let socket = format!("CPU {cpu}");
        s.add(
            4,
            &Fields::default()
                .u8(1) // socket designation
                .u8(0x03) // central processor
                .u8(0xfe) // family: see family 2
                .u8(2) // manufacturer
                .u64(0) // processor id
                .u8(0) // version
                .u8(0) // voltage
                .u16(0) // external clock: unknown
                .u16(2000) // max speed, MHz
                .u16(2000) // current speed
                .u8(0x41) // socket populated, CPU enabled
                .u8(0x01) // upgrade: other
                .u16(0xffff) // L1, L2, L3 cache handles: none
                .u16(0xffff)
                .u16(0xffff)
                .bytes(&[0, 0, 0]) // serial, asset tag, part number
                .bytes(&[1, 1, 1]) // cores, enabled cores, threads
                .u16(0x02) // characteristics: unknown
                .u16(0x01) // family 2: other
                .0,
            &[&socket, VENDOR],
        );
    }

    // Type 16, the physical memory array that the memory devices sit in.
    let total = spec.memory.total;
    let dimms = total.div_ceil(MAX_DIMM);
    let capacity_kib = total.div_ceil(1024);
    let (capacity, extended) = match u32::try_from(capacity_kib) {
        Ok(k) if k < 0x8000_0000 => (k, 0),
        _ => (0x8000_0000, total),
    };
    let array = s.add(
        16,
        &Fields::default()
            .u8(0x01) // location: other
            .u8(0x03) // use: system memory
            .u8(0x06) // error correction: multi-bit ECC
            .u32(capacity)
            .u16(NO_HANDLE) // memory error information
            .u16(dimms as u16)
            .u64(extended)
            .0,
        &[],
    );

    // Type 17, the memory devices, each up to 16 GiB.
    for i in 0..dimms {
        let size = (total - i * MAX_DIMM).min(MAX_DIMM);
        let locator = format!("DIMM {i}");
        s.add(
            17,
            &Fields::default()
                .u16(array)
                .u16(NO_HANDLE) // memory error information
                .u16(64) // total width
                .u16(64) // data width
                .u16(size.div_ceil(1 << 20) as u16) // size in MiB
                .u8(0x09) // form factor: DIMM
                .u8(0) // device set
                .u8(1) // device locator
                .u8(0) // bank locator
                .u8(0x07) // type: RAM
                .u16(0x02) // type detail: other
                .u16(0) // speed: unknown
                .u8(2) // manufacturer
                .bytes(&[0, 0, 0]) // serial, asset tag, part number
                .u8(0) // attributes: unknown rank
                .u32(0) // extended size: unused
                .u16(0) // configured speed
                .u16(0) // minimum, maximum, configured voltage: unknown
                .u16(0)
                .u16(0)
                .0,
            &[&locator, VENDOR],
        );
    }

    // Type 19, where the array's RAM appears: below the PCI hole and above 4 GiB.
    for (addr, len) in spec.memory.ram_ranges() {
        let (start, end) = (addr.0, addr.0 + len - 1);
        // KiB fields, with byte-addressed extended fields beyond their reach.
        let (start_kib, end_kib, ext_start, ext_end) =
            match (u32::try_from(start >> 10), u32::try_from(end >> 10)) {
                (Ok(s), Ok(e)) if e != u32::MAX => (s, e, 0, 0),
                _ => (u32::MAX, u32::MAX, start, end),
            };
        s.add(
            19,
            &Fields::default()
                .u32(start_kib)
                .u32(end_kib)
                .u16(array)
                .u8(1) // partition width
                .u64(ext_start)
                .u64(ext_end)
                .0,
            &[],
        );
    }

    // Type 32, system boot information: no errors.
    s.add(32, &Fields::default().bytes(&[0; 6]).u8(0).0, &[]);
    s.add(127, &[], &[]);

    SmbiosFiles {
        anchor: anchor(s.bytes.len() as u16, s.count, s.max_size),
        tables: s.bytes,
    }
}

/// The 2.1-style entry point, with its table address 0 for the firmware to fill in.
fn anchor(table_len: u16, count: u16, max_size: u16) -> Vec<u8> {
    let mut a = Fields::default()
        .bytes(b"_SM_")
        .u8(0) // checksum
        .u8(0x1f) // length
        .bytes(&[2, 8]) // version 2.8
        .u16(max_size)
        .u8(0) // entry point revision
        .bytes(&[0; 5]) // formatted area
        .bytes(b"_DMI_")
        .u8(0) // intermediate checksum
        .u16(table_len)
        .u32(0) // table address
        .u16(count)
        .u8(0x28) // BCD revision
        .0;
    // The intermediate checksum first: the outer one covers it.
    a[0x15] = checksum(&a[0x10..]);
    a[4] = checksum(&a[..0x10]);
    a
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    struct Parsed {
        kind: u8,
        handle: u16,
        formatted: Vec<u8>,
        strings: Vec<String>,
    }

    /// Walks the table as a guest's dmidecode would, checking each structure's framing.
    fn parse(t: &[u8]) -> (Vec<Parsed>, usize) {
        let mut out = Vec::new();
        let mut off = 0;
        let mut max = 0;
        while off < t.len() {
            let (kind, len) = (t[off], t[off + 1] as usize);
            assert!(len >= 4);
            let handle = u16::from_le_bytes([t[off + 2], t[off + 3]]);
            let formatted = t[off + 4..off + len].to_vec();
            let set = &t[off + len..];
            let end = set.windows(2).position(|w| w == [0, 0]).unwrap();
            let strings: Vec<String> = if end == 0 {
                vec![]
            } else {
                set[..end]
                    .split(|&b| b == 0)
                    .map(|s| String::from_utf8(s.to_vec()).unwrap())
                    .collect()
            };
            assert!(strings.iter().all(|s| !s.is_empty()));
            let size = len + end + 2;
            max = max.max(size);
            off += size;
            out.push(Parsed {
                kind,
                handle,
                formatted,
                strings,
            });
            if kind == 127 {
                break;
            }
        }
        assert_eq!(off, t.len(), "bytes after the end structure");
        (out, max)
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn table_and_anchor_agree() {
        let mem = MemoryMap::new(40 << 30).unwrap();
        let uuid = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        let f = smbios_files(&SmbiosSpec {
            uuid,
            cpus: 2,
            memory: &mem,
        });
        let a = &f.anchor;
        assert_eq!(a.len(), 31);
        assert_eq!(&a[0..4], b"_SM_");
        assert_eq!(&a[0x10..0x15], b"_DMI_");
        assert_eq!((a[5], a[6], a[7], a[0x1e]), (31, 2, 8, 0x28));
        assert_eq!(sum(&a[..0x10]), 0);
        assert_eq!(sum(&a[0x10..]), 0);

        let (structs, max) = parse(&f.tables);
        let u16_at = |o: usize| u16::from_le_bytes([a[o], a[o + 1]]);
        assert_eq!(u16_at(0x16) as usize, f.tables.len());
        assert_eq!(u16_at(0x1c) as usize, structs.len());
        assert_eq!(u16_at(8) as usize, max);
        let handles: HashSet<u16> = structs.iter().map(|s| s.handle).collect();
        assert_eq!(handles.len(), structs.len());

        let kinds: Vec<u8> = structs.iter().map(|s| s.kind).collect();
        // 40 GiB: three DIMMs, RAM below the hole and above 4 GiB.
        assert_eq!(kinds, vec![0, 1, 3, 4, 4, 16, 17, 17, 17, 19, 19, 32, 127]);
        // Every string number a structure uses exists in its set.
        let t0 = &structs[0];
        assert_eq!(t0.strings[usize::from(t0.formatted[0]) - 1], "ferry");
        let t1 = &structs[1];
        assert_eq!(t1.formatted.len() + 4, 0x1b);
        assert_eq!(t1.strings[0..2], ["ferry", "ferry VM"]);
        assert_eq!(
            t1.formatted[4..20],
            [
                0x78, 0x56, 0x34, 0x12, 0xbc, 0x9a, 0xf0, 0xde, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
                0xcd, 0xef
            ]
        );
        assert_eq!(structs[3].strings, ["CPU 0", "ferry"]);
        assert_eq!(structs[3].formatted.len() + 4, 0x2a);
        // Memory devices add up to the RAM and point at the array.
        let array = structs[5].handle;
        let mib: u64 = structs[6..9]
            .iter()
            .map(|s| {
                assert_eq!(u16::from_le_bytes([s.formatted[0], s.formatted[1]]), array);
                assert_eq!(s.formatted.len() + 4, 0x28);
                u64::from(u16::from_le_bytes([s.formatted[8], s.formatted[9]]))
            })
            .sum();
        assert_eq!(mib << 20, 40 << 30);
        let ranges: Vec<(u64, u64)> = structs[9..11]
            .iter()
            .map(|s| {
                let f = &s.formatted;
                assert_eq!(u16::from_le_bytes([f[8], f[9]]), array);
                (
                    u64::from(u32::from_le_bytes(f[0..4].try_into().unwrap())) << 10,
                    (u64::from(u32::from_le_bytes(f[4..8].try_into().unwrap())) << 10) + 1024,
                )
            })
            .collect();
        assert_eq!(
            ranges,
            vec![
                (0, 0xc000_0000),
                (1 << 32, (1 << 32) + (40 << 30) - 0xc000_0000)
            ]
        );
    }

    #[test]
    fn small_guest_has_one_dimm() {
        let mem = MemoryMap::new(512 << 20).unwrap();
        let f = smbios_files(&SmbiosSpec {
            uuid: [0; 16],
            cpus: 1,
            memory: &mem,
        });
        let (structs, _) = parse(&f.tables);
        let kinds: Vec<u8> = structs.iter().map(|s| s.kind).collect();
        assert_eq!(kinds, vec![0, 1, 3, 4, 16, 17, 19, 32, 127]);
        assert_eq!(structs[5].formatted[8..10], 512u16.to_le_bytes());
    }
}
