//! VHD images (Connectix / Virtual PC / Hyper-V, qemu's `vpc`): fixed, dynamic and
//! differencing disks.
//!
//! Layout: a 512-byte footer ("conectix", big-endian fields, ones'-complement checksum) at
//! the end of the file; dynamic and differencing disks also keep a copy of it at offset 0,
//! a 1024-byte dynamic header ("cxsparse") at the footer's data offset, a Block Allocation
//! Table (BAT, u32 sector numbers, 0xFFFFFFFF = unallocated) and data blocks, each a sector
//! bitmap (padded to 512 bytes) followed by the block's data.
//!
//! Policies (deliberate choices, pinned by tests):
//! - Virtual size follows qemu 10: the CHS geometry's size for images whose creator is
//!   `"vpc "` or `"qemu"` (unless CHS is the 65535/16/255 maximum), the footer's
//!   current_size otherwise.
//! - Bad checksums are refused (like qemu), except through [`VhdLayer::open_with`] with
//!   `accept_bad_checksums` on a read-only layer (libvhdi's leniency, for the dfvfs pair).
//! - Dynamic (type 3) disks read allocated blocks whole, ignoring the bitmap (like qemu);
//!   differencing (type 4) disks use the bitmap: a clear bit reads through to the parent.
//! - ferry writes creator `"fery"` with current_size = the requested size (rounded up to a
//!   sector) and the spec's CHS for it: qemu >= 10.0 shows exactly the requested size;
//!   qemu <= 9.2 shows the CHS size, equal only where the size is CHS-representable.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::error::{Result, StorageError};
use crate::host_file::{HostFile, LocalFile};
use crate::layer::*;

const SECTOR: u64 = 512;
/// Host page size new blocks' data is aligned to.
const HOST_PAGE: u64 = 4096;
const FOOTER_COOKIE: &[u8; 8] = b"conectix";
const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
const FOOTER_SIZE: usize = 512;
const HEADER_SIZE: usize = 1024;
const UNALLOCATED: u32 = 0xFFFF_FFFF;
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFF: u32 = 4;
/// Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC, the VHD epoch.
const VHD_EPOCH: u64 = 946_684_800;
/// The largest dynamic disk qemu and Hyper-V accept: 0xff000000 sectors (2040 GiB).
pub const MAX_DYNAMIC_SIZE: u64 = 0xff00_0000 * SECTOR;
/// The largest CHS geometry, in sectors.
const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// The block size ferry creates (the spec's default).
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Largest block size ferry reads (bounds every per-block buffer).
const MAX_BLOCK_SIZE: u64 = 1 << 28;
/// Largest parent locator ferry reads.
const MAX_LOCATOR_LEN: u32 = 64 * 1024;
/// What ferry writes as the creator application.
pub const CREATOR_APP: &[u8; 4] = b"fery";

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Ones' complement of the byte sum, with the 4-byte checksum field at `field` taken as 0.
pub fn checksum(buf: &[u8], field: usize) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| *i < field || *i >= field + 4)
        .fold(0u32, |s, (_, &b)| s.wrapping_add(u32::from(b)));
    !sum
}

/// CHS geometry (cylinders, heads, sectors per track) for `total_sectors`, as the VHD
/// specification (appendix "CHS calculation") and qemu compute it.
pub fn chs_geometry(total_sectors: u64) -> (u16, u8, u8) {
    let total = total_sectors.min(MAX_CHS_SECTORS);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

fn vhd_now() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    secs.saturating_sub(VHD_EPOCH) as u32
}

/// The guest-visible size a footer gives (qemu 10's rule, see the module comment).
fn footer_virtual_size(footer: &[u8]) -> u64 {
    let current = be64(footer, 48) / SECTOR * SECTOR;
    let (c, h, s) = (
        u64::from(be16(footer, 56)),
        u64::from(footer[58]),
        u64::from(footer[59]),
    );
    let creator = &footer[28..32];
    let max_chs = c == 65535 && h == 16 && s == 255;
    if (creator == b"vpc " || creator == b"qemu") && !max_chs {
        c * h * s * SECTOR
    } else {
        current
    }
}

/// Options for [`VhdLayer::open_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct VhdOpenOptions {
    /// Read (read-only) an image whose footer or header checksum is wrong, with a warning.
    pub accept_bad_checksums: bool,
}

pub struct VhdFormat;

impl ImageFormat for VhdFormat {
    fn kind(&self) -> FormatKind {
        FormatKind::Vhd
    }

    /// A dynamic or differencing disk starts with the footer copy; a fixed one has the
    /// footer only in its last 512 bytes, which are read here.
    fn probe(&self, path: &Path, head: &[u8]) -> bool {
        if head.starts_with(FOOTER_COOKIE) {
            return true;
        }
        if !path.is_file() {
            return false;
        }
        let Ok(file) = LocalFile::open(path, false) else {
            return false;
        };
        let Ok(len) = file.len() else { return false };
        if len < 2 * SECTOR {
            return false;
        }
        let mut footer = [0u8; FOOTER_SIZE];
        if file.read_at(&mut footer, len - SECTOR).is_err() {
            return false;
        }
        footer.starts_with(FOOTER_COOKIE) && checksum(&footer, 64) == be32(&footer, 64)
    }

    fn open(&self, path: &Path, writable: bool) -> Result<Box<dyn Layer>> {
        let file = LocalFile::open(path, writable).map_err(|e| StorageError::io(path, e))?;
        Ok(Box::new(VhdLayer::open(Arc::new(file), writable)?))
    }

    fn create(&self, path: &Path, opts: &CreateOptions) -> Result<Box<dyn Layer>> {
        let layout = CreateLayout::new(path, opts)?;
        let file = LocalFile::create(path).map_err(|e| StorageError::io(path, e))?;
        let file: Arc<dyn HostFile> = Arc::new(file);
        if let Err(e) = layout.write(&*file) {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(Box::new(VhdLayer::open(file, true)?))
    }
}

/// Everything `create` writes, computed before the file exists.
struct CreateLayout {
    path: PathBuf,
    size: u64,
    disk_type: u32,
    /// (offset, bytes) to write, footer copies last.
    pieces: Vec<(u64, Vec<u8>)>,
    file_len: u64,
}

impl CreateLayout {
    fn new(path: &Path, opts: &CreateOptions) -> Result<Self> {
        let invalid = |d: String| StorageError::Invalid(format!("{}: {d}", path.display()));
        let size = opts
            .size
            .checked_next_multiple_of(SECTOR)
            .ok_or_else(|| invalid("the size is too large".into()))?;
        let disk_type = match (opts.variant, &opts.parent) {
            (_, Some(_)) => TYPE_DIFF,
            (Variant::Fixed, None) => TYPE_FIXED,
            (Variant::Dynamic, None) => TYPE_DYNAMIC,
            (v, None) => {
                return Err(invalid(format!(
                    "VHD has no {v:?} variant (fixed or dynamic)"
                )))
            }
        };
        if size > MAX_DYNAMIC_SIZE {
            return Err(invalid(format!(
                "{size} bytes is larger than a VHD can be ({MAX_DYNAMIC_SIZE} bytes, 2040 GiB)"
            )));
        }
        let mut footer = vec![0u8; FOOTER_SIZE];
        footer[..8].copy_from_slice(FOOTER_COOKIE);
        put32(&mut footer, 8, 2); // features: reserved bit always set
        put32(&mut footer, 12, 0x0001_0000);
        put64(
            &mut footer,
            16,
            if disk_type == TYPE_FIXED {
                u64::MAX
            } else {
                SECTOR
            },
        );
        put32(&mut footer, 24, vhd_now());
        footer[28..32].copy_from_slice(CREATOR_APP);
        put32(&mut footer, 32, 0x0001_0000);
        footer[36..40].copy_from_slice(b"Wi2k");
        put64(&mut footer, 40, size);
        put64(&mut footer, 48, size);
        let (c, h, s) = chs_geometry(size / SECTOR);
        footer[56..58].copy_from_slice(&c.to_be_bytes());
        footer[58] = h;
        footer[59] = s;
        put32(&mut footer, 60, disk_type);
        footer[68..84].copy_from_slice(Uuid::new_v4().as_bytes());
        let ck = checksum(&footer, 64);
        put32(&mut footer, 64, ck);

        let mut pieces = Vec::new();
        let file_len;
        if disk_type == TYPE_FIXED {
            pieces.push((size, footer));
            file_len = size + SECTOR;
        } else {
            let bs = u64::from(DEFAULT_BLOCK_SIZE);
            let entries = size.div_ceil(bs).max(1);
            let table_offset = SECTOR + HEADER_SIZE as u64;
            let bat_len = (entries * 4).next_multiple_of(SECTOR);
            let mut header = vec![0u8; HEADER_SIZE];
            header[..8].copy_from_slice(HEADER_COOKIE);
            put64(&mut header, 8, u64::MAX);
            put64(&mut header, 16, table_offset);
            put32(&mut header, 24, 0x0001_0000);
            put32(&mut header, 28, entries as u32);
            put32(&mut header, 32, DEFAULT_BLOCK_SIZE);
            let mut end = table_offset + bat_len;
            if let Some(parent) = &opts.parent {
                end = Self::parent_fields(path, parent, &mut header, &mut pieces, end)?;
            }
            let ck = checksum(&header, 36);
            put32(&mut header, 36, ck);
            pieces.push((SECTOR, header));
            pieces.push((table_offset, vec![0xFF; bat_len as usize]));
            pieces.push((end, footer.clone()));
            pieces.push((0, footer));
            file_len = end + SECTOR;
        }
        Ok(Self {
            path: path.to_path_buf(),
            size,
            disk_type,
            pieces,
            file_len,
        })
    }

    /// Fills the parent fields of a differencing header and queues the locators' data
    /// (relative path first, then absolute) from `end`; returns the new end.
    fn parent_fields(
        path: &Path,
        parent: &CreateParent,
        header: &mut [u8],
        pieces: &mut Vec<(u64, Vec<u8>)>,
        mut end: u64,
    ) -> Result<u64> {
        let uuid = match parent.uuid {
            Some(u) => u,
            None => crate::probe::open_image(&parent.path, false)
                .ok()
                .and_then(|l| l.uuid())
                .ok_or_else(|| {
                    StorageError::Invalid(format!(
                        "{}: the parent {} has no UUID for a VHD child to record",
                        path.display(),
                        parent.path.display()
                    ))
                })?,
        };
        header[40..56].copy_from_slice(uuid.as_bytes());
        let mtime = std::fs::metadata(&parent.path)
            .and_then(|m| m.modified())
            .map_err(|e| StorageError::io(&parent.path, e))?
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        put32(header, 56, mtime.saturating_sub(VHD_EPOCH) as u32);
        let name = parent
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (i, unit) in name.encode_utf16().take(256).enumerate() {
            header[64 + 2 * i..66 + 2 * i].copy_from_slice(&unit.to_be_bytes());
        }
        let absolute =
            std::path::absolute(&parent.path).map_err(|e| StorageError::io(&parent.path, e))?;
        let child_dir = std::path::absolute(path)
            .map_err(|e| StorageError::io(path, e))?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let relative = relative_path(&child_dir, &absolute);
        let locators = [
            (b"W2ru", relative),
            (b"W2ku", absolute.to_string_lossy().into_owned()),
        ];
        for (i, (code, text)) in locators.iter().enumerate() {
            let data: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
            if data.len() > MAX_LOCATOR_LEN as usize {
                return Err(StorageError::Invalid(format!(
                    "{}: the parent's path is too long for a VHD locator",
                    path.display()
                )));
            }
            let space = (data.len() as u64).next_multiple_of(SECTOR).max(SECTOR);
            let e = 576 + 24 * i;
            header[e..e + 4].copy_from_slice(*code);
            put32(header, e + 4, space as u32);
            put32(header, e + 8, data.len() as u32);
            put64(header, e + 16, end);
            pieces.push((end, data));
            end += space;
        }
        Ok(end)
    }

    fn write(&self, file: &dyn HostFile) -> Result<()> {
        let io = |e| StorageError::io(&self.path, e);
        file.set_len(self.file_len).map_err(io)?;
        for (off, bytes) in &self.pieces {
            file.write_at(bytes, *off).map_err(io)?;
        }
        tracing::debug!(
            "{}: created VHD type {} of {} bytes",
            self.path.display(),
            self.disk_type,
            self.size
        );
        Ok(())
    }
}

/// `target` relative to the folder `from`, Windows style (`.\name`, `..\dir\name`).
fn relative_path(from: &Path, target: &Path) -> String {
    let norm = |p: &Path| -> Vec<String> {
        p.components()
            .filter(|c| !matches!(c, Component::CurDir | Component::RootDir))
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect()
    };
    let (a, b) = (norm(from), norm(target));
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = Vec::new();
    if common == a.len() {
        parts.push(".".into());
    }
    parts.extend(std::iter::repeat_n("..".to_string(), a.len() - common));
    parts.extend(b[common..].iter().cloned());
    parts.join("\\")
}

/// Dynamic and differencing disks' block map.
struct Dynamic {
    block_size: u64,
    /// The sector bitmap before each block's data, padded to a sector.
    bitmap_size: u64,
    table_offset: u64,
    state: RwLock<DynState>,
}

struct DynState {
    bat: Vec<u32>,
    /// Where the footer is (and the next new block goes).
    footer_pos: u64,
}

pub struct VhdLayer {
    path: PathBuf,
    file: Arc<dyn HostFile>,
    writable: bool,
    footer: [u8; FOOTER_SIZE],
    disk_type: u32,
    size: u64,
    uuid: Uuid,
    parent: Option<ParentRef>,
    dynamic: Option<Dynamic>,
}

impl VhdLayer {
    pub fn open(file: Arc<dyn HostFile>, writable: bool) -> Result<Self> {
        Self::open_with(file, writable, VhdOpenOptions::default())
    }

    pub fn open_with(
        file: Arc<dyn HostFile>,
        writable: bool,
        opts: VhdOpenOptions,
    ) -> Result<Self> {
        let path = file.path().to_path_buf();
        let corrupt = |d: String| StorageError::corrupt(&path, d);
        let io = |e| StorageError::io(&path, e);
        let lenient = opts.accept_bad_checksums && !writable;
        let len = file.len().map_err(io)?;
        if len < SECTOR {
            return Err(corrupt(format!(
                "the file is {len} bytes, too short for a VHD footer (512 bytes): truncated or not a VHD"
            )));
        }
        // The footer at the end is authoritative; a dynamic disk's copy at offset 0 stands in
        // when the end is damaged.
        let mut end = [0u8; FOOTER_SIZE];
        file.read_at(&mut end, len - SECTOR).map_err(io)?;
        let mut first = [0u8; FOOTER_SIZE];
        file.read_at(&mut first, 0).map_err(io)?;
        let good = |f: &[u8; FOOTER_SIZE]| checksum(f, 64) == be32(f, 64);
        let (footer, end_ok) = if end.starts_with(FOOTER_COOKIE) && good(&end) {
            (end, true)
        } else if first.starts_with(FOOTER_COOKIE) && good(&first) && be32(&first, 60) != TYPE_FIXED
        {
            tracing::warn!(
                "{}: the footer at the end is missing or damaged; using the copy at offset 0",
                path.display()
            );
            (first, false)
        } else if end.starts_with(FOOTER_COOKIE) || first.starts_with(FOOTER_COOKIE) {
            let f = if end.starts_with(FOOTER_COOKIE) {
                end
            } else {
                first
            };
            let msg = format!(
                "the VHD footer checksum is wrong (stored {:#010x}, computed {:#010x})",
                be32(&f, 64),
                checksum(&f, 64)
            );
            if !lenient {
                return Err(corrupt(msg));
            }
            tracing::warn!("{}: {msg}; reading it anyway", path.display());
            (f, end.starts_with(FOOTER_COOKIE))
        } else {
            return Err(corrupt(
                "no VHD footer: the cookie \"conectix\" is neither in the last 512 bytes nor at offset 0"
                    .into(),
            ));
        };
        let version = be32(&footer, 12);
        if version >> 16 != 1 {
            return Err(StorageError::Unsupported {
                path: path.clone(),
                detail: format!("VHD file format version {version:#010x} (ferry reads 1.x)"),
            });
        }
        let disk_type = be32(&footer, 60);
        let size = footer_virtual_size(&footer);
        let uuid = Uuid::from_bytes(footer[68..84].try_into().unwrap_or_default());
        if footer[84] != 0 {
            tracing::warn!("{}: the VHD is marked as in a saved state", path.display());
        }
        let mut layer = Self {
            path: path.clone(),
            file: file.clone(),
            writable,
            footer,
            disk_type,
            size,
            uuid,
            parent: None,
            dynamic: None,
        };
        match disk_type {
            TYPE_FIXED => {
                if size > len - SECTOR {
                    return Err(corrupt(format!(
                        "the fixed VHD's size is {size} bytes but the file holds only {} bytes of data: truncated",
                        len - SECTOR
                    )));
                }
            }
            TYPE_DYNAMIC | TYPE_DIFF => {
                let footer_pos = if end_ok {
                    len - SECTOR
                } else {
                    len.next_multiple_of(SECTOR)
                };
                layer.open_dynamic(len, footer_pos, lenient)?;
            }
            t => {
                return Err(StorageError::Unsupported {
                    path,
                    detail: format!(
                        "VHD disk type {t} (ferry reads 2 fixed, 3 dynamic, 4 differencing)"
                    ),
                })
            }
        }
        Ok(layer)
    }

    fn open_dynamic(&mut self, len: u64, footer_pos: u64, lenient: bool) -> Result<()> {
        let path = self.path.clone();
        let corrupt = |d: String| StorageError::corrupt(&path, d);
        let io = |e| StorageError::io(&path, e);
        let hoff = be64(&self.footer, 16);
        if !hoff.is_multiple_of(SECTOR) || hoff >= len {
            return Err(corrupt(format!(
                "the dynamic header offset {hoff:#x} is not sector-aligned or lies past the end of the file ({len} bytes)"
            )));
        }
        // Bytes past the end read as zeros; a header cut short is refused below, after the
        // fields that say more about what is wrong.
        let mut h = vec![0u8; HEADER_SIZE];
        self.file.read_at(&mut h, hoff).map_err(io)?;
        if !h.starts_with(HEADER_COOKIE) {
            return Err(corrupt(format!(
                "no dynamic disk header at {hoff:#x} (the cookie \"cxsparse\" is missing)"
            )));
        }
        let table_offset = be64(&h, 16);
        let entries = u64::from(be32(&h, 28));
        let bat_end = table_offset
            .checked_add(entries * 4)
            .filter(|&e| e <= len)
            .ok_or_else(|| {
                corrupt(format!(
                    "Max Table Entries too large ({entries}): a BAT of {} bytes at {table_offset:#x} does not fit in the {len}-byte file",
                    entries * 4
                ))
            })?;
        if checksum(&h, 36) != be32(&h, 36) {
            let msg = format!(
                "the VHD dynamic header checksum is wrong (stored {:#010x}, computed {:#010x})",
                be32(&h, 36),
                checksum(&h, 36)
            );
            if !lenient {
                return Err(corrupt(msg));
            }
            tracing::warn!("{}: {msg}; reading it anyway", path.display());
        }
        if hoff + HEADER_SIZE as u64 > len {
            return Err(corrupt(format!(
                "the file ends inside the dynamic header at {hoff:#x} ({len} bytes): truncated"
            )));
        }
        let version = be32(&h, 24);
        if version >> 16 != 1 {
            return Err(StorageError::Unsupported {
                path: path.clone(),
                detail: format!("VHD dynamic header version {version:#010x} (ferry reads 1.x)"),
            });
        }
        let block_size = u64::from(be32(&h, 32));
        if !block_size.is_power_of_two() || !(SECTOR..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(corrupt(format!(
                "invalid block size {block_size} (must be a power of two from 512 bytes to 256 MiB)"
            )));
        }
        if !table_offset.is_multiple_of(SECTOR) {
            return Err(corrupt(format!(
                "the BAT offset {table_offset:#x} is not sector-aligned"
            )));
        }
        if self.size > MAX_DYNAMIC_SIZE {
            return Err(corrupt(format!(
                "the disk size {} bytes is larger than a dynamic VHD can be (2040 GiB)",
                self.size
            )));
        }
        let blocks = self.size.div_ceil(block_size);
        if blocks > entries {
            return Err(corrupt(format!(
                "the BAT has {entries} entries of {block_size} bytes, too few for the {}-byte disk",
                self.size
            )));
        }
        // The BAT, bounded by the file size checked above.
        let mut raw = vec![0u8; (entries * 4) as usize];
        self.file.read_at(&mut raw, table_offset).map_err(io)?;
        let bat: Vec<u32> = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
        let bitmap_size = (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR);

        // Metadata areas no block may overlap.
        let mut meta: Vec<(u64, u64, String)> = vec![
            (hoff, hoff + HEADER_SIZE as u64, "the dynamic header".into()),
            (
                table_offset,
                bat_end.next_multiple_of(SECTOR),
                "the BAT".into(),
            ),
        ];
        if self.footer_copy_at_zero() {
            meta.push((0, SECTOR, "the footer copy".into()));
        }
        if self.disk_type == TYPE_DIFF {
            self.parent = Some(self.read_parent(&h, len, &mut meta)?);
        }
        let limit = footer_pos.min(len);
        let block_total = bitmap_size + block_size;
        let mut used: Vec<(u64, usize)> = Vec::new();
        for (i, &e) in bat.iter().enumerate().take(blocks as usize) {
            if e == UNALLOCATED {
                continue;
            }
            let start = u64::from(e) * SECTOR;
            let stop = start + block_total;
            if stop > limit {
                return Err(corrupt(format!(
                    "BAT entry {i} points at {start:#x}, past the end of the image data ({limit:#x})"
                )));
            }
            if let Some((_, _, what)) = meta.iter().find(|(s, t, _)| start < *t && *s < stop) {
                return Err(corrupt(format!(
                    "BAT entry {i} points at {start:#x}, into {what}"
                )));
            }
            used.push((start, i));
        }
        used.sort_unstable();
        for w in used.windows(2) {
            if w[1].0 < w[0].0 + block_total {
                return Err(corrupt(format!(
                    "BAT entries {} and {} point at overlapping blocks ({:#x} and {:#x})",
                    w[0].1, w[1].1, w[0].0, w[1].0
                )));
            }
        }
        let meta_end = meta.iter().map(|m| m.1).max().unwrap_or(0);
        let data_end = used.last().map_or(0, |(s, _)| s + block_total);
        let footer_pos = footer_pos
            .max(meta_end)
            .max(data_end)
            .next_multiple_of(SECTOR);
        self.dynamic = Some(Dynamic {
            block_size,
            bitmap_size,
            table_offset,
            state: RwLock::new(DynState { bat, footer_pos }),
        });
        Ok(())
    }

    fn footer_copy_at_zero(&self) -> bool {
        let mut b = [0u8; 8];
        self.file.read_at(&mut b, 0).is_ok() && &b == FOOTER_COOKIE
    }

    /// The parent's UUID and the paths the header names: relative locators, then absolute
    /// ones, then the parent's unicode name.
    fn read_parent(
        &self,
        h: &[u8],
        len: u64,
        meta: &mut Vec<(u64, u64, String)>,
    ) -> Result<ParentRef> {
        let io = |e| StorageError::io(&self.path, e);
        let uuid = Uuid::from_bytes(h[40..56].try_into().unwrap_or_default());
        let mut relative = Vec::new();
        let mut absolute = Vec::new();
        for i in 0..8 {
            let e = 576 + 24 * i;
            let code = &h[e..e + 4];
            if code == [0; 4] {
                continue;
            }
            let data_len = be32(h, e + 8);
            let off = be64(h, e + 16);
            // The data space field is bytes for Windows and sectors in the spec: only the
            // data's own length is taken as metadata.
            let space = u64::from(data_len).next_multiple_of(SECTOR);
            let known = matches!(code, b"W2ru" | b"W2ku" | b"Wi2r" | b"Wi2k");
            if data_len == 0
                || data_len > MAX_LOCATOR_LEN
                || off.checked_add(u64::from(data_len)).is_none_or(|x| x > len)
            {
                if known {
                    tracing::warn!(
                        "{}: parent locator {} is empty, too long or past the end of the file; ignored",
                        self.path.display(),
                        String::from_utf8_lossy(code)
                    );
                }
                continue;
            }
            meta.push((off, off + space.min(len - off), "a parent locator".into()));
            if !known {
                continue;
            }
            let mut data = vec![0u8; data_len as usize];
            self.file.read_at(&mut data, off).map_err(io)?;
            let text = if code.starts_with(b"W2") {
                let units: Vec<u16> = data
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16_lossy(&units)
            } else {
                String::from_utf8_lossy(&data).into_owned()
            };
            let text = text.trim_end_matches('\0').to_string();
            if text.is_empty() {
                continue;
            }
            let p = windows_path(&text);
            if code == b"W2ru" || code == b"Wi2r" {
                relative.push(p);
            } else {
                absolute.push(p);
            }
        }
        let units: Vec<u16> = h[64..576]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        let name = String::from_utf16_lossy(&units);
        let name = name.trim_end_matches('\0');
        let mut hints = relative;
        hints.extend(absolute);
        if !name.is_empty() {
            let p = windows_path(name);
            if !hints.contains(&p) {
                hints.push(p);
            }
            // A Windows absolute name: also look for its file name beside the child.
            if let Some(base) = name.rsplit(['\\', '/']).next() {
                let b = PathBuf::from(base);
                if !base.is_empty() && !hints.contains(&b) {
                    hints.push(b);
                }
            }
        }
        Ok(ParentRef {
            uuid: Some(uuid),
            modification_uuid: None,
            path_hints: hints,
        })
    }

    /// The disk type from the footer: 2 fixed, 3 dynamic, 4 differencing.
    pub fn disk_type(&self) -> u32 {
        self.disk_type
    }

    /// The creator application recorded in the footer.
    pub fn creator(&self) -> [u8; 4] {
        [
            self.footer[28],
            self.footer[29],
            self.footer[30],
            self.footer[31],
        ]
    }

    /// The dynamic header's block size (None for fixed disks).
    pub fn block_size(&self) -> Option<u64> {
        self.dynamic.as_ref().map(|d| d.block_size)
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        crate::error::check_range(&self.path, offset, len, self.size)
    }

    fn io(&self, e: std::io::Error) -> StorageError {
        StorageError::io(&self.path, e)
    }

    fn read_bitmap(&self, d: &Dynamic, entry: u32) -> Result<Vec<u8>> {
        let mut bm = vec![0u8; ((d.block_size / SECTOR).div_ceil(8)) as usize];
        self.file
            .read_at(&mut bm, u64::from(entry) * SECTOR)
            .map_err(|e| self.io(e))?;
        Ok(bm)
    }

    /// Status of the run at `offset` (within one layer), at most `len` bytes.
    fn dyn_status(&self, d: &Dynamic, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        let st = d.state.read().unwrap_or_else(|e| e.into_inner());
        let end = offset + len;
        let mut state: Option<Allocation> = None;
        let mut pos = offset;
        while pos < end {
            let idx = pos / d.block_size;
            let bend = ((idx + 1) * d.block_size).min(end);
            let entry = st.bat[idx as usize];
            if entry == UNALLOCATED || self.disk_type == TYPE_DYNAMIC {
                let s = if entry == UNALLOCATED {
                    Allocation::Unallocated
                } else {
                    Allocation::Data
                };
                match state {
                    None => state = Some(s),
                    Some(prev) if prev != s => break,
                    _ => {}
                }
                pos = bend;
                continue;
            }
            let bm = self.read_bitmap(d, entry)?;
            while pos < bend {
                let sec = (pos % d.block_size) / SECTOR;
                let bit = bm[(sec / 8) as usize] & (0x80 >> (sec % 8)) != 0;
                let s = if bit {
                    Allocation::Data
                } else {
                    Allocation::Unallocated
                };
                match state {
                    None => state = Some(s),
                    Some(prev) if prev != s => return Ok((prev, pos - offset)),
                    _ => {}
                }
                pos = ((pos / SECTOR + 1) * SECTOR).min(bend);
            }
        }
        Ok((
            state.unwrap_or(Allocation::Unallocated),
            (pos - offset).max(1).min(len),
        ))
    }

    fn dyn_read(&self, d: &Dynamic, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let (state, run) = self.dyn_status(d, off, (buf.len() - done) as u64)?;
            let run = run as usize;
            let part = &mut buf[done..done + run];
            match state {
                Allocation::Data => {
                    // A Data run never crosses a block boundary in a differencing disk, but
                    // may in a dynamic one: read block by block.
                    let mut p = 0usize;
                    while p < part.len() {
                        let o = off + p as u64;
                        let idx = o / d.block_size;
                        let n =
                            ((idx + 1) * d.block_size - o).min((part.len() - p) as u64) as usize;
                        let entry =
                            d.state.read().unwrap_or_else(|e| e.into_inner()).bat[idx as usize];
                        let host = u64::from(entry) * SECTOR + d.bitmap_size + o % d.block_size;
                        self.file
                            .read_at(&mut part[p..p + n], host)
                            .map_err(|e| self.io(e))?;
                        p += n;
                    }
                }
                _ => part.fill(0),
            }
            done += run;
        }
        Ok(())
    }

    /// Writes within one block.
    fn dyn_write_block(
        &self,
        d: &Dynamic,
        buf: &[u8],
        offset: u64,
        lower: &dyn LowerLayers,
    ) -> Result<()> {
        let idx = (offset / d.block_size) as usize;
        let in_block = offset % d.block_size;
        let mut st = d.state.write().unwrap_or_else(|e| e.into_inner());
        let entry = st.bat[idx];
        let diff = self.disk_type == TYPE_DIFF;
        if entry != UNALLOCATED && !diff {
            let host = u64::from(entry) * SECTOR + d.bitmap_size + in_block;
            return self.file.write_at(buf, host).map_err(|e| self.io(e));
        }
        // A new block goes where the footer is. Order, so that a crash after any step leaves
        // a valid image (at worst an unreferenced, leaked block):
        //   1. the footer at the new end of the file (the old one stays until step 2: the
        //      last 512 bytes of the file are always a footer);
        //   2. the block: data, then its bitmap (over the old footer's place);
        //   3. the BAT entry: only now does the block become part of the disk.
        // A write into an existing differencing block writes the data, then sets its bits.
        let new = entry == UNALLOCATED;
        let block_host = if new {
            // Place the block so its data (after the bitmap) starts on a 4 KiB boundary: the
            // guest's 4 KiB writes then cover whole host pages instead of straddling two.
            (st.footer_pos + d.bitmap_size).next_multiple_of(HOST_PAGE) - d.bitmap_size
        } else {
            u64::from(entry) * SECTOR
        };
        let block_total = d.bitmap_size + d.block_size;
        let sector = u32::try_from(block_host / SECTOR)
            .ok()
            .filter(|&s| s != UNALLOCATED)
            .ok_or_else(|| {
                StorageError::corrupt(
                    &self.path,
                    "the file is too large for another block (BAT entries are 32-bit sector numbers)",
                )
            })?;
        if new {
            self.file
                .write_at(&self.footer, block_host + block_total)
                .map_err(|e| self.io(e))?;
        }
        let data_host = block_host + d.bitmap_size;
        let block_start = idx as u64 * d.block_size;
        let mut bitmap;
        if diff {
            // Only the written sectors get their bits; partial sectors take the rest of
            // their bytes from this layer (bit set) or from `lower` (bit clear). Untouched
            // sectors keep reading through to the parent.
            bitmap = if new {
                vec![0u8; ((d.block_size / SECTOR).div_ceil(8)) as usize]
            } else {
                self.read_bitmap(d, entry)?
            };
            let first = in_block / SECTOR;
            let last = (in_block + buf.len() as u64 - 1) / SECTOR;
            let a_start = first * SECTOR;
            let mut data = vec![0u8; ((last - first + 1) * SECTOR) as usize];
            let bit = |bm: &[u8], s: u64| bm[(s / 8) as usize] & (0x80 >> (s % 8)) != 0;
            for s in [first, last] {
                let head = s == first && !in_block.is_multiple_of(SECTOR);
                let tail = s == last && !(in_block + buf.len() as u64).is_multiple_of(SECTOR);
                if !(head || tail) {
                    continue;
                }
                let at = ((s - first) * SECTOR) as usize;
                let sector = &mut data[at..at + SECTOR as usize];
                if bit(&bitmap, s) {
                    self.file
                        .read_at(sector, data_host + s * SECTOR)
                        .map_err(|e| self.io(e))?;
                } else {
                    lower.read_at(sector, block_start + s * SECTOR)?;
                }
            }
            let skip = (in_block - a_start) as usize;
            data[skip..skip + buf.len()].copy_from_slice(buf);
            self.file
                .write_at(&data, data_host + a_start)
                .map_err(|e| self.io(e))?;
            let before = bitmap.clone();
            for s in first..=last {
                bitmap[(s / 8) as usize] |= 0x80 >> (s % 8);
            }
            if new || bitmap != before {
                self.file
                    .write_at(&bitmap, block_host)
                    .map_err(|e| self.io(e))?;
            }
        } else {
            // A dynamic disk (no parent: `lower` is all zeros). The footer written at the new
            // end already extended the file over the block, so the rest of it is a hole that
            // reads as zeros: only the guest's bytes are written, then the bitmap with every
            // bit set (as qemu and Windows do).
            self.file
                .write_at(buf, data_host + in_block)
                .map_err(|e| self.io(e))?;
            bitmap = vec![0xFF; d.bitmap_size as usize];
            self.file
                .write_at(&bitmap, block_host)
                .map_err(|e| self.io(e))?;
        }
        if new {
            self.file
                .write_at(&sector.to_be_bytes(), d.table_offset + idx as u64 * 4)
                .map_err(|e| self.io(e))?;
            st.bat[idx] = sector;
            st.footer_pos = block_host + block_total;
        }
        Ok(())
    }
}

/// A path as stored in a locator or the unicode name, with `\` as `/`.
fn windows_path(s: &str) -> PathBuf {
    PathBuf::from(s.replace('\\', "/"))
}

impl Layer for VhdLayer {
    fn format(&self) -> FormatKind {
        FormatKind::Vhd
    }
    fn variant(&self) -> Variant {
        if self.disk_type == TYPE_FIXED {
            Variant::Fixed
        } else {
            Variant::Dynamic
        }
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn files(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }
    fn host_files(&self) -> Vec<Arc<dyn HostFile>> {
        vec![self.file.clone()]
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn uuid(&self) -> Option<Uuid> {
        Some(self.uuid)
    }
    fn parent(&self) -> Option<ParentRef> {
        self.parent.clone()
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        self.check(offset, len)?;
        match &self.dynamic {
            _ if len == 0 => Ok((Allocation::Data, 0)),
            None => Ok((Allocation::Data, len)),
            Some(d) => self.dyn_status(d, offset, len),
        }
    }
    fn host_run(&self, offset: u64, len: u64) -> Result<Option<(u64, u64)>> {
        self.check(offset, len)?;
        match &self.dynamic {
            None => Ok(Some((offset, len))),
            // A dynamic disk's allocated block reads whole (its bitmap is not consulted); a
            // differencing disk's may read through to the parent sector by sector.
            Some(d) if self.disk_type == TYPE_DYNAMIC => {
                let st = d.state.read().unwrap_or_else(|e| e.into_inner());
                Ok(crate::layer::block_host_run(
                    offset,
                    len,
                    d.block_size,
                    |index| {
                        let entry = *st.bat.get(usize::try_from(index).ok()?)?;
                        (entry != UNALLOCATED).then(|| u64::from(entry) * SECTOR + d.bitmap_size)
                    },
                ))
            }
            Some(_) => Ok(None),
        }
    }
    fn mapped_file(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        match &self.dynamic {
            None => self.file.read_at(buf, offset).map_err(|e| self.io(e)),
            Some(d) => self.dyn_read(d, buf, offset),
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64, lower: &dyn LowerLayers) -> Result<()> {
        if !self.writable {
            return Err(StorageError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.check(offset, buf.len() as u64)?;
        let Some(d) = &self.dynamic else {
            return self.file.write_at(buf, offset).map_err(|e| self.io(e));
        };
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let n = ((off / d.block_size + 1) * d.block_size - off).min((buf.len() - done) as u64)
                as usize;
            self.dyn_write_block(d, &buf[done..done + n], off, lower)?;
            done += n;
        }
        Ok(())
    }
    /// Fixed disks: the host range is punched (reads zeros). Dynamic and differencing disks:
    /// blocks the range covers whole return to unallocated (zeros, or the parent's data);
    /// the BAT entry is cleared first, then the old block's space is punched (it stays a
    /// leak inside the file, as in every VHD writer). Partial blocks are left as they are.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(StorageError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.check(offset, len)?;
        let Some(d) = &self.dynamic else {
            let start = offset.next_multiple_of(SECTOR);
            let end = (offset + len) / SECTOR * SECTOR;
            if start < end {
                self.file
                    .punch_hole(start, end - start)
                    .map_err(|e| self.io(e))?;
            }
            return Ok(());
        };
        let first = offset.div_ceil(d.block_size);
        let end = offset + len;
        // The last block may be cut short by the disk's end.
        let last = if end == self.size {
            self.size.div_ceil(d.block_size)
        } else {
            end / d.block_size
        };
        let mut st = d.state.write().unwrap_or_else(|e| e.into_inner());
        for idx in first..last {
            let entry = st.bat[idx as usize];
            if entry == UNALLOCATED {
                continue;
            }
            self.file
                .write_at(&UNALLOCATED.to_be_bytes(), d.table_offset + idx * 4)
                .map_err(|e| self.io(e))?;
            st.bat[idx as usize] = UNALLOCATED;
            let host = u64::from(entry) * SECTOR;
            if let Err(e) = self.file.punch_hole(host, d.bitmap_size + d.block_size) {
                tracing::debug!(
                    "{}: could not free a discarded block: {e}",
                    self.path.display()
                );
            }
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        if self.writable {
            self.file.sync().map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    fn set_uuid(&self, uuid: Uuid, _modification: Option<Uuid>) -> Result<()> {
        if !self.writable {
            return Err(StorageError::ReadOnly {
                path: self.path.clone(),
            });
        }
        let mut footer = self.footer;
        footer[68..84].copy_from_slice(uuid.as_bytes());
        let ck = checksum(&footer, 64);
        put32(&mut footer, 64, ck);
        let io = |e| StorageError::io(&self.path, e);
        // The footer at the end first, then its copy at offset 0: either one alone is valid.
        let end = match &self.dynamic {
            Some(d) => d.state.read().unwrap_or_else(|e| e.into_inner()).footer_pos,
            None => self.file.len().map_err(io)?.saturating_sub(SECTOR),
        };
        self.file.write_at(&footer, end).map_err(io)?;
        self.file.sync().map_err(io)?;
        if self.dynamic.is_some() && self.footer_copy_at_zero() {
            self.file.write_at(&footer, 0).map_err(io)?;
            self.file.sync().map_err(io)?;
        }
        Ok(())
    }

    fn metadata_problems(&self) -> Result<Vec<String>> {
        let io = |e| StorageError::io(&self.path, e);
        let len = self.file.len().map_err(io)?;
        let mut out = Vec::new();
        let mut copies = vec![("at the end", len.saturating_sub(SECTOR))];
        if self.dynamic.is_some() {
            copies.push(("at offset 0", 0));
        }
        for (name, at) in copies {
            let mut f = [0u8; FOOTER_SIZE];
            self.file.read_at(&mut f, at).map_err(io)?;
            if !f.starts_with(FOOTER_COOKIE) {
                out.push(format!("the footer {name} is missing"));
            } else if checksum(&f, 64) != be32(&f, 64) {
                out.push(format!(
                    "the footer {name} has a bad checksum (stored {:#010x}, computed {:#010x})",
                    be32(&f, 64),
                    checksum(&f, 64)
                ));
            }
        }
        Ok(out)
    }

    fn block_table(&self) -> Result<Option<crate::layer::BlockTable>> {
        let Some(d) = &self.dynamic else {
            return Ok(None);
        };
        let st = d.state.read().unwrap_or_else(|e| e.into_inner());
        let blocks: Vec<(u64, u64)> = st
            .bat
            .iter()
            .enumerate()
            .filter(|(_, &e)| e != UNALLOCATED)
            .map(|(i, &e)| (i as u64, u64::from(e) * SECTOR))
            .collect();
        // Metadata (the BAT, parent locators) may sit anywhere before the first block: the
        // data area is judged from there on.
        let data_start = blocks.iter().map(|b| b.1).min().unwrap_or(st.footer_pos);
        Ok(Some(crate::layer::BlockTable {
            file: self.path.clone(),
            blocks,
            block_bytes: d.bitmap_size + d.block_size,
            data_start,
            data_end: st.footer_pos,
            slack: HOST_PAGE,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_matches_the_spec_examples() {
        // qemu's own sizes: 20 MiB + ... rounds to these geometries.
        assert_eq!(chs_geometry(204), (3, 4, 17));
        assert_eq!(chs_geometry(8228), (121, 4, 17));
        assert_eq!(chs_geometry(8192), (120, 4, 17));
        assert_eq!(chs_geometry(MAX_CHS_SECTORS), (65535, 16, 255));
        assert_eq!(chs_geometry(u64::MAX), (65535, 16, 255));
        assert_eq!(chs_geometry(0), (0, 4, 17));
    }

    #[test]
    fn relative_paths_are_windows_style() {
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/b/p.vhd")),
            ".\\p.vhd"
        );
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/c/p.vhd")),
            "..\\c\\p.vhd"
        );
    }

    #[test]
    fn checksum_is_ones_complement_of_the_sum() {
        let mut b = [0u8; 16];
        b[0] = 1;
        b[1] = 2;
        b[4..8].copy_from_slice(&[9, 9, 9, 9]);
        assert_eq!(checksum(&b, 4), !3u32);
    }
}
