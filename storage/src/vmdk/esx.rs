//! ESX snapshot extents, read-only (QEMU only reads them too): VMFSSPARSE extents in the
//! "COWD" layout (ESX 2/3 redo logs and vmfsSparse deltas) and SESPARSE extents (ESXi 6.5+
//! space-efficient sparse). Both are a grain directory of grain-table locations, grain tables
//! of grain locations, and grains; only the headers and the entry encodings differ, so one
//! reader ([`EsxSparse`]) decodes both.
//!
//! VMware documents neither; the facts are those QEMU's block/vmdk.c relies on.
//! - COWD: "COWD", then u32 LE version (1), flags, disk sectors, granularity (sectors per
//!   grain), directory offset (sectors) and entries, in a 2048-byte header. Directory entries
//!   are u32 sector numbers of tables of 4096 u32 grain sector numbers; 0 = not allocated.
//! - seSparse: a 512-byte constant header of u64 LE fields (magic 0xcafebabe, version
//!   0x200000001, capacity, grain size 8 sectors, table size 64 sectors = 4096 u64 entries,
//!   flags, 4 reserved, then offset/size pairs in sectors: volatile header, journal header,
//!   journal, grain directory, grain tables, free bitmap, back map, grains) and a volatile
//!   header (magic 0xcafecafe, free table count, next transaction, replay-journal flag).
//!   Directory entries are 0 (no table) or 0x10000000_xxxxxxxx, a table's index in the
//!   tables area. Table entries by top nibble: 0 not allocated (the entry all zero), 1 unmapped
//!   and 2 zeroed (both read zeros, hiding the parent), 3 allocated: the grain's index in the
//!   grains area is bits 48..60 plus bits 0..48 shifted up by 12.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::sparse::{GT_CACHE_LIMIT, MAX_GRAIN_SECTORS, SECTOR};
use crate::error::{Result, StorageError};
use crate::host_file::HostFile;
use crate::layer::Allocation;

pub const COWD_MAGIC: &[u8; 4] = b"COWD";
/// The first 8 bytes of a seSparse extent: its magic as a little-endian u64.
pub const SESPARSE_MAGIC: [u8; 8] = 0xcafe_babe_u64.to_le_bytes();
const SE_VOLATILE_MAGIC: u64 = 0xcafe_cafe;
const SE_VERSION: u64 = 0x2_0000_0001;
const SE_GRAIN_SECTORS: u64 = 8;
const SE_TABLE_SECTORS: u64 = 64;
/// 64 TiB: the most a seSparse disk holds.
const SE_MAX_SECTORS: u64 = 1 << 37;
const COWD_VERSION: u32 = 1;
const COWD_TABLE_ENTRIES: u64 = 4096;
/// The header flag ESX sets while a COWD file is open for writing.
const COWD_INCONSISTENT: u32 = 4;

#[derive(Debug, Clone, Copy)]
enum Layout {
    Cowd,
    /// Byte offsets of the grain tables area and of the grains area.
    SeSparse {
        tables: u64,
        grains: u64,
    },
}

enum Grain {
    Unallocated,
    Zero,
    At(u64),
}

pub struct EsxSparse {
    pub file: Arc<dyn HostFile>,
    pub path: PathBuf,
    layout: Layout,
    /// Bytes the extent holds.
    capacity: u64,
    grain: u64,
    per_table: u64,
    /// Directory entries as stored (validated at open).
    dir: Vec<u64>,
    tables: HashMap<usize, Vec<u64>>,
    cached: usize,
    file_len: u64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Whether `bytes` at sector `sector` lie inside a file of `len` bytes (no overflow).
fn fits(sector: u64, bytes: u64, len: u64) -> bool {
    sector
        .checked_mul(SECTOR)
        .and_then(|o| o.checked_add(bytes))
        .is_some_and(|end| end <= len)
}

fn read_entries(file: &dyn HostFile, at: u64, n: usize, wide: bool) -> Result<Vec<u64>> {
    let size = if wide { 8 } else { 4 };
    let mut raw = vec![0u8; n * size];
    file.read_at(&mut raw, at)
        .map_err(|e| StorageError::io(file.path(), e))?;
    Ok(raw
        .chunks_exact(size)
        .map(|c| {
            if wide {
                le64(c, 0)
            } else {
                u64::from(le32(c, 0))
            }
        })
        .collect())
}

impl EsxSparse {
    /// Opens a COWD extent.
    pub fn open_cowd(file: Arc<dyn HostFile>) -> Result<Self> {
        let path = file.path().to_path_buf();
        let len = file.len().map_err(|e| StorageError::io(&path, e))?;
        let bad = |d: String| StorageError::corrupt(&path, format!("COWD sparse extent: {d}"));
        if len < SECTOR {
            return Err(bad(format!("truncated: {len} bytes, less than its header")));
        }
        let mut h = [0u8; 28];
        file.read_at(&mut h, 0)
            .map_err(|e| StorageError::io(&path, e))?;
        if &h[..4] != COWD_MAGIC {
            return Err(bad("no COWD magic".into()));
        }
        let field = |i: usize| le32(&h, 4 + 4 * i);
        let (version, flags, sectors, gran, dir_at, dir_len) =
            (field(0), field(1), field(2), field(3), field(4), field(5));
        if version != COWD_VERSION {
            return Err(StorageError::Unsupported {
                path,
                detail: format!("COWD sparse extent version {version} (ferry reads version 1)"),
            });
        }
        let gran = u64::from(gran);
        if gran == 0 || gran > MAX_GRAIN_SECTORS {
            return Err(bad(format!(
                "a grain of {gran} sectors (expected 1 to {MAX_GRAIN_SECTORS})"
            )));
        }
        if sectors == 0 {
            return Err(bad("a disk of 0 sectors".into()));
        }
        let need = u64::from(sectors).div_ceil(COWD_TABLE_ENTRIES * gran);
        if u64::from(dir_len) < need {
            return Err(bad(format!(
                "its grain directory has {dir_len} entries, but {sectors} sectors need {need}"
            )));
        }
        if dir_at == 0 || !fits(u64::from(dir_at), need * 4, len) {
            return Err(bad(format!(
                "grain directory at sector {dir_at} is outside the file ({len} bytes)"
            )));
        }
        if flags & COWD_INCONSISTENT != 0 {
            tracing::warn!(
                "{}: the COWD extent was not closed cleanly (ESX marks it inconsistent while open)",
                path.display()
            );
        }
        // Only the entries the disk needs; the file's size bounds them (checked above).
        let dir = read_entries(&*file, u64::from(dir_at) * SECTOR, need as usize, false)?;
        let table_bytes = COWD_TABLE_ENTRIES * 4;
        if let Some((i, e)) = dir
            .iter()
            .enumerate()
            .find(|(_, &e)| e != 0 && !fits(e, table_bytes, len))
        {
            return Err(bad(format!(
                "grain directory entry {i} points to a grain table at sector {e}, past the end of the file"
            )));
        }
        Ok(Self {
            file,
            path,
            layout: Layout::Cowd,
            capacity: u64::from(sectors) * SECTOR,
            grain: gran * SECTOR,
            per_table: COWD_TABLE_ENTRIES,
            dir,
            tables: HashMap::new(),
            cached: 0,
            file_len: len,
        })
    }

    /// Opens a seSparse extent.
    pub fn open_se(file: Arc<dyn HostFile>) -> Result<Self> {
        let path = file.path().to_path_buf();
        let len = file.len().map_err(|e| StorageError::io(&path, e))?;
        let bad = |d: String| StorageError::corrupt(&path, format!("seSparse extent: {d}"));
        let unsupported = |d: String| StorageError::Unsupported {
            path: path.clone(),
            detail: format!("seSparse extent: {d}"),
        };
        if len < SECTOR {
            return Err(bad(format!("truncated: {len} bytes, less than its header")));
        }
        let mut h = [0u8; 512];
        file.read_at(&mut h, 0)
            .map_err(|e| StorageError::io(&path, e))?;
        let q = |i: usize| le64(&h, 8 * i);
        if h[..8] != SESPARSE_MAGIC {
            return Err(bad(format!("bad magic {:#018x}", q(0))));
        }
        // The format is undocumented: anything QEMU has not seen is refused, not guessed at.
        if q(1) != SE_VERSION {
            return Err(unsupported(format!(
                "version {:#x} (ferry reads {SE_VERSION:#x})",
                q(1)
            )));
        }
        if q(3) != SE_GRAIN_SECTORS || q(4) != SE_TABLE_SECTORS {
            return Err(unsupported(format!(
                "grains of {} sectors and tables of {} (ferry reads {SE_GRAIN_SECTORS} and {SE_TABLE_SECTORS})",
                q(3),
                q(4)
            )));
        }
        if q(5) != 0 || (6..=9).any(|i| q(i) != 0) || h[26 * 8..].iter().any(|&b| b != 0) {
            return Err(unsupported(
                "flags or reserved header fields are set (a newer variant?)".into(),
            ));
        }
        let capacity = q(2);
        if capacity == 0 || capacity > SE_MAX_SECTORS {
            return Err(bad(format!(
                "capacity of {capacity} sectors (expected 1 to {SE_MAX_SECTORS})"
            )));
        }
        let (vol_at, dir_at, dir_sectors) = (q(10), q(16), q(17));
        let (tables_at, tables_sectors, grains_at) = (q(18), q(19), q(24));
        if vol_at == 0 || !fits(vol_at, SECTOR, len) {
            return Err(bad(format!(
                "volatile header at sector {vol_at} is outside the file ({len} bytes)"
            )));
        }
        let mut v = [0u8; 512];
        file.read_at(&mut v, vol_at * SECTOR)
            .map_err(|e| StorageError::io(&path, e))?;
        if le64(&v, 0) != SE_VOLATILE_MAGIC {
            return Err(bad(format!(
                "bad volatile header magic {:#018x}",
                le64(&v, 0)
            )));
        }
        if le64(&v, 24) != 0 {
            return Err(unsupported(
                "its journal was never replayed (ESXi did not close the disk cleanly); power the VM on in ESXi once, or consolidate its snapshots, then try again".into(),
            ));
        }
        if v[32..].iter().any(|&b| b != 0) {
            return Err(unsupported(
                "reserved volatile header bytes are set (a newer variant?)".into(),
            ));
        }
        let per_table = SE_TABLE_SECTORS * SECTOR / 8;
        let need = capacity.div_ceil(per_table * SE_GRAIN_SECTORS);
        if dir_sectors.saturating_mul(SECTOR / 8) < need {
            return Err(bad(format!(
                "its grain directory of {dir_sectors} sectors is too small for {capacity} sectors"
            )));
        }
        if dir_at == 0 || !fits(dir_at, need * 8, len) {
            return Err(bad(format!(
                "grain directory at sector {dir_at} is outside the file ({len} bytes)"
            )));
        }
        let tables_bytes = tables_sectors.saturating_mul(SECTOR);
        if tables_at == 0 || !fits(tables_at, tables_bytes, len) {
            return Err(bad(format!(
                "grain tables area at sector {tables_at} ({tables_sectors} sectors) is outside the file ({len} bytes)"
            )));
        }
        if !fits(grains_at, 0, len) {
            return Err(bad(format!(
                "grains area at sector {grains_at} is past the end of the file"
            )));
        }
        let table_count = tables_sectors / SE_TABLE_SECTORS;
        let dir = read_entries(&*file, dir_at * SECTOR, need as usize, true)?;
        for (i, &e) in dir.iter().enumerate() {
            if e == 0 {
                continue;
            }
            if e >> 32 != 0x1000_0000 {
                return Err(bad(format!(
                    "grain directory entry {i} ({e:#018x}) is not a table reference"
                )));
            }
            if e & 0xffff_ffff >= table_count {
                return Err(bad(format!(
                    "grain directory entry {i} names table {}, past the {table_count} of the tables area",
                    e & 0xffff_ffff
                )));
            }
        }
        Ok(Self {
            file,
            path,
            layout: Layout::SeSparse {
                tables: tables_at * SECTOR,
                grains: grains_at * SECTOR,
            },
            capacity: capacity * SECTOR,
            grain: SE_GRAIN_SECTORS * SECTOR,
            per_table,
            dir,
            tables: HashMap::new(),
            cached: 0,
            file_len: len,
        })
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// The grain table `t`, read on first use; `None` where the directory has none.
    fn table(&mut self, t: usize) -> Result<Option<&Vec<u64>>> {
        let Some(&d) = self.dir.get(t).filter(|&&d| d != 0) else {
            return Ok(None);
        };
        if !self.tables.contains_key(&t) {
            if self.cached > GT_CACHE_LIMIT {
                self.tables.clear();
                self.cached = 0;
            }
            let n = self.per_table as usize;
            let table = match self.layout {
                Layout::Cowd => read_entries(&*self.file, d * SECTOR, n, false)?,
                Layout::SeSparse { tables, .. } => {
                    let at = tables + (d & 0xffff_ffff) * SE_TABLE_SECTORS * SECTOR;
                    read_entries(&*self.file, at, n, true)?
                }
            };
            self.cached += n * 8;
            self.tables.insert(t, table);
        }
        Ok(self.tables.get(&t))
    }

    /// Where grain `g` is, checked against the file.
    fn grain_at(&mut self, g: u64) -> Result<Grain> {
        let per = self.per_table;
        let layout = self.layout;
        let Some(table) = self.table((g / per) as usize)? else {
            return Ok(Grain::Unallocated);
        };
        let e = table[(g % per) as usize];
        let bad = |d: String| StorageError::corrupt(&self.path, format!("grain {g}: {d}"));
        let at = match layout {
            Layout::Cowd if e == 0 => return Ok(Grain::Unallocated),
            Layout::Cowd => e.checked_mul(SECTOR),
            Layout::SeSparse { grains, .. } => match e >> 60 {
                0 if e == 0 => return Ok(Grain::Unallocated),
                1 | 2 => return Ok(Grain::Zero),
                3 => {
                    let index = ((e >> 48) & 0xfff) | ((e & 0xffff_ffff_ffff) << 12);
                    index
                        .checked_mul(self.grain)
                        .and_then(|o| o.checked_add(grains))
                }
                _ => {
                    return Err(bad(format!(
                        "grain table entry {e:#018x} has an unknown type"
                    )))
                }
            },
        };
        match at {
            Some(at)
                if at
                    .checked_add(self.grain)
                    .is_some_and(|end| end <= self.file_len) =>
            {
                Ok(Grain::At(at))
            }
            _ => Err(bad(format!(
                "grain table entry {e:#x} points past the end of the file ({} bytes)",
                self.file_len
            ))),
        }
    }

    fn state(&mut self, g: u64) -> Result<Allocation> {
        Ok(match self.grain_at(g)? {
            Grain::Unallocated => Allocation::Unallocated,
            Grain::Zero => Allocation::Zero,
            Grain::At(_) => Allocation::Data,
        })
    }

    /// State and length of the run at `off` (bytes within the extent), at most `len`.
    pub fn status(&mut self, off: u64, len: u64) -> Result<(Allocation, u64)> {
        let per = self.per_table;
        let g0 = off / self.grain;
        let first = self.state(g0)?;
        let mut end = (g0 + 1) * self.grain;
        while end < off + len {
            let g = end / self.grain;
            let t = (g / per) as usize;
            if first == Allocation::Unallocated && self.dir.get(t).is_none_or(|&d| d == 0) {
                // No table: its whole span is unallocated.
                end = (t as u64 + 1) * per * self.grain;
                continue;
            }
            if self.state(g)? != first {
                break;
            }
            end += self.grain;
        }
        Ok((first, (end - off).min(len)))
    }

    /// Reads `buf` at byte `off` of the extent; unallocated and zeroed grains read as zeros.
    pub fn read(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let in_grain = pos % self.grain;
            let n = ((self.grain - in_grain) as usize).min(buf.len() - done);
            let part = &mut buf[done..done + n];
            match self.grain_at(pos / self.grain)? {
                Grain::Unallocated | Grain::Zero => part.fill(0),
                Grain::At(at) => self
                    .file
                    .read_at(part, at + in_grain)
                    .map_err(|e| StorageError::io(&self.path, e))?,
            }
            done += n;
        }
        Ok(())
    }
}
