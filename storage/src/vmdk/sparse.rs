//! Hosted sparse extents ("KDMV"): header, grain directory and grain tables, plain and
//! stream-optimized (compressed) grains.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Result, StorageError};
use crate::host_file::HostFile;
use crate::layer::{Allocation, LowerLayers};

pub const SECTOR: u64 = 512;
pub const MAGIC: &[u8; 4] = b"KDMV";
pub const FLAG_NL_DETECT: u32 = 1;
pub const FLAG_RGD: u32 = 1 << 1;
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
pub const FLAG_COMPRESS: u32 = 1 << 16;
pub const FLAG_MARKER: u32 = 1 << 17;
pub const GD_AT_END: u64 = u64::MAX;
pub const MARKER_EOS: u32 = 0;
pub const MARKER_GT: u32 = 1;
pub const MARKER_GD: u32 = 2;
pub const MARKER_FOOTER: u32 = 3;
/// Largest extent VMDK describes (2 TiB).
pub const MAX_EXTENT_SECTORS: u64 = 1 << 32;
/// Largest grain ferry accepts (64 MiB; real images use 64 KiB).
pub(super) const MAX_GRAIN_SECTORS: u64 = 1 << 17;
/// Grain tables kept in memory before the cache is dropped and refilled.
pub(super) const GT_CACHE_LIMIT: usize = 64 << 20;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub flags: u32,
    pub capacity: u64,
    pub grain_size: u64,
    pub desc_offset: u64,
    pub desc_size: u64,
    pub num_gtes: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub overhead: u64,
    pub unclean: u8,
    pub compress: u16,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

impl Header {
    /// Parses the 512-byte sector at the start of an extent (magic included).
    pub fn parse(path: &Path, b: &[u8; 512]) -> Result<Self> {
        if &b[0..4] != MAGIC {
            return Err(StorageError::corrupt(
                path,
                "not a VMDK sparse extent (no KDMV magic)",
            ));
        }
        let h = Header {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain_size: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            num_gtes: le32(b, 44),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            overhead: le64(b, 64),
            unclean: b[72],
            compress: u16::from_le_bytes([b[77], b[78]]),
        };
        if !(1..=3).contains(&h.version) {
            return Err(StorageError::corrupt(
                path,
                format!("VMDK sparse header version {} is not 1, 2 or 3", h.version),
            ));
        }
        if h.flags & FLAG_NL_DETECT != 0 && b[73..77] != [b'\n', b' ', b'\r', b'\n'] {
            return Err(StorageError::corrupt(
                path,
                "the header's line-ending check bytes are damaged (was the file copied in text mode?)",
            ));
        }
        Ok(h)
    }

    pub fn to_bytes(self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_size.to_le_bytes());
        b[28..36].copy_from_slice(&self.desc_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.desc_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.num_gtes.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = self.unclean;
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress.to_le_bytes());
        b
    }

    pub fn gt_count(&self) -> u64 {
        let per_gt = self.num_gtes as u64 * self.grain_size;
        self.capacity.div_ceil(per_gt.max(1))
    }
}

/// Reads the header (or, for a stream whose directory is at the end, the footer copy) and
/// checks every field against the file.
pub fn read_header(file: &dyn HostFile) -> Result<(Header, Header)> {
    let path = file.path();
    let len = file.len().map_err(|e| StorageError::io(path, e))?;
    if len < SECTOR {
        return Err(StorageError::corrupt(
            path,
            format!("truncated: {len} bytes, less than a VMDK header"),
        ));
    }
    let mut b = [0u8; 512];
    file.read_at(&mut b, 0)
        .map_err(|e| StorageError::io(path, e))?;
    let first = Header::parse(path, &b)?;
    let mut h = first;
    if h.gd_offset == GD_AT_END {
        // Footer marker, footer, end-of-stream marker: the last three sectors.
        if len < 4 * SECTOR {
            return Err(StorageError::corrupt(
                path,
                "stream-optimized VMDK too short for its footer",
            ));
        }
        let mut tail = vec![0u8; 1536];
        file.read_at(&mut tail, (len & !(SECTOR - 1)) - 1536)
            .map_err(|e| StorageError::io(path, e))?;
        let fm = &tail[0..512];
        let eos = &tail[1024..1536];
        if le32(fm, 8) != 0
            || le32(fm, 12) != MARKER_FOOTER
            || le64(eos, 0) != 0
            || le32(eos, 8) != 0
            || le32(eos, 12) != MARKER_EOS
        {
            return Err(StorageError::corrupt(
                path,
                "stream-optimized VMDK has its grain directory at the end but no valid footer (unfinished or truncated stream)",
            ));
        }
        let fb: [u8; 512] = tail[512..1024].try_into().unwrap_or([0; 512]);
        h = Header::parse(path, &fb)?;
        if h.gd_offset == GD_AT_END {
            return Err(StorageError::corrupt(
                path,
                "the footer does not say where the grain directory is",
            ));
        }
    }
    validate(path, &h, len)?;
    // The descriptor is found through the first header.
    validate_desc(path, &first, len)?;
    Ok((first, h))
}

fn validate(path: &Path, h: &Header, len: u64) -> Result<()> {
    let bad = |d: String| Err(StorageError::corrupt(path, d));
    if h.grain_size == 0 || !h.grain_size.is_power_of_two() || h.grain_size > MAX_GRAIN_SECTORS {
        return bad(format!(
            "grain size of {} sectors is not a power of two up to {MAX_GRAIN_SECTORS}",
            h.grain_size
        ));
    }
    if h.num_gtes == 0 || h.num_gtes > 4096 {
        return bad(format!(
            "{} entries per grain table (expected 512)",
            h.num_gtes
        ));
    }
    if h.capacity > MAX_EXTENT_SECTORS {
        return bad(format!(
            "capacity of {} sectors is larger than a VMDK extent can be (2 TiB)",
            h.capacity
        ));
    }
    let gd_bytes = h.gt_count() * 4;
    if gd_bytes > len {
        return bad(format!(
            "its grain directory would be {gd_bytes} bytes (capacity {} sectors), more than the whole {len}-byte file",
            h.capacity
        ));
    }
    let fits = |sector: u64, bytes: u64| {
        sector
            .checked_mul(SECTOR)
            .and_then(|o| o.checked_add(bytes))
            .is_some_and(|e| e <= len)
    };
    if h.gt_count() > 0 && (h.gd_offset == 0 || !fits(h.gd_offset, gd_bytes)) {
        return bad(format!(
            "grain directory at sector {} is outside the file",
            h.gd_offset
        ));
    }
    if h.flags & FLAG_RGD != 0
        && h.gt_count() > 0
        && (h.rgd_offset == 0 || !fits(h.rgd_offset, gd_bytes))
    {
        return bad(format!(
            "redundant grain directory at sector {} is outside the file",
            h.rgd_offset
        ));
    }
    validate_desc(path, h, len)?;
    if h.overhead > len.div_ceil(SECTOR) {
        return bad(format!(
            "file truncated: the header says data starts at sector {}, past the end",
            h.overhead
        ));
    }
    if h.compress > 1 {
        return bad(format!("unknown compression algorithm {}", h.compress));
    }
    Ok(())
}

fn validate_desc(path: &Path, h: &Header, len: u64) -> Result<()> {
    let ok = h.desc_offset == 0
        || (h.desc_size <= super::descriptor::MAX_DESCRIPTOR as u64 / SECTOR
            && h.desc_offset
                .checked_mul(SECTOR)
                .and_then(|o| o.checked_add(h.desc_size * SECTOR))
                .is_some_and(|e| e <= len));
    if ok {
        Ok(())
    } else {
        Err(StorageError::corrupt(
            path,
            format!(
                "descriptor at sector {} ({} sectors) is outside the file",
                h.desc_offset, h.desc_size
            ),
        ))
    }
}

pub struct Sparse {
    pub file: Arc<dyn HostFile>,
    pub path: PathBuf,
    pub header: Header,
    /// The header at offset 0 (differs from `header` for a stream with a footer).
    pub first_header: Header,
    grain: u64,
    gt_bytes: u64,
    gd: Vec<u32>,
    rgd: Option<Vec<u32>>,
    gts: HashMap<usize, Vec<u32>>,
    cached: usize,
    /// Where the next grain or table goes.
    end: u64,
    /// The file's length as last seen (grows with every allocation).
    file_len: u64,
    compressed: bool,
    /// The directory and tables live only in memory and are written at the end on flush.
    tail_meta: bool,
    tail_dirty: bool,
    /// Every table is in memory and authoritative (a stream being written).
    keep_all: bool,
    /// The last decompressed grain (index, bytes).
    last: Option<(u64, Vec<u8>)>,
    /// A compressed extent's grain being written (index, whole content): compressed and
    /// appended when a write moves to another grain, or on flush.
    pending: Option<(u64, Vec<u8>)>,
    /// The extent belongs to a child image: a partial write into a new grain copies the rest
    /// of the grain from `lower`. When false, `lower` is all zeros and a new grain's other
    /// bytes are left as a hole (set by the layer; true, the safe choice, until then).
    pub differencing: bool,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |e| StorageError::io(path, e)
}

fn read_u32s(file: &dyn HostFile, off: u64, n: usize) -> Result<Vec<u32>> {
    let mut raw = vec![0u8; n * 4];
    file.read_at(&mut raw, off).map_err(io(file.path()))?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn u32s_bytes(v: &[u32], pad_to: u64) -> Vec<u8> {
    let mut out: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    out.resize(out.len().max(pad_to as usize), 0);
    out
}

fn marker(val: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[0..8].copy_from_slice(&val.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

impl Sparse {
    pub fn open(file: Arc<dyn HostFile>) -> Result<Self> {
        let path = file.path().to_path_buf();
        let (first_header, header) = read_header(&*file)?;
        let len = file.len().map_err(io(&path))?;
        let compressed = header.compress == 1 || header.flags & FLAG_COMPRESS != 0;
        if compressed && header.flags & FLAG_MARKER == 0 {
            return Err(StorageError::Unsupported {
                path,
                detail: "compressed VMDK grains without markers".into(),
            });
        }
        let n = header.gt_count() as usize;
        let gt_bytes = (header.num_gtes as u64 * 4).next_multiple_of(SECTOR);
        let gd = read_u32s(&*file, header.gd_offset * SECTOR, n)?;
        let rgd = if header.flags & FLAG_RGD != 0 && n > 0 {
            Some(read_u32s(&*file, header.rgd_offset * SECTOR, n)?)
        } else {
            None
        };
        for (which, dir) in [
            ("grain directory", Some(&gd)),
            ("redundant grain directory", rgd.as_ref()),
        ] {
            for (i, &e) in dir.into_iter().flatten().enumerate() {
                if e != 0
                    && (e as u64 * SECTOR + gt_bytes > len.next_multiple_of(SECTOR)
                        || (e as u64) < 1)
                {
                    return Err(StorageError::corrupt(
                        &path,
                        format!("{which} entry {i} points to a grain table at sector {e}, past the end of the file"),
                    ));
                }
            }
        }
        let tail_meta = first_header.gd_offset == GD_AT_END;
        let end = len.next_multiple_of(SECTOR).max(header.overhead * SECTOR);
        Ok(Self {
            file,
            path,
            grain: header.grain_size * SECTOR,
            gt_bytes,
            gd,
            rgd,
            gts: HashMap::new(),
            cached: 0,
            end,
            file_len: len,
            compressed,
            tail_meta,
            tail_dirty: false,
            keep_all: false,
            last: None,
            pending: None,
            differencing: true,
            header,
            first_header,
        })
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.header.capacity * SECTOR
    }

    pub fn grain_bytes(&self) -> u64 {
        self.grain
    }

    pub fn is_compressed(&self) -> bool {
        self.compressed
    }

    fn gt(&mut self, idx: usize) -> Result<Option<&mut Vec<u32>>> {
        let Some(&sec) = self.gd.get(idx) else {
            return Ok(None);
        };
        if sec == 0 && !self.gts.contains_key(&idx) {
            return Ok(None);
        }
        if !self.gts.contains_key(&idx) {
            if self.cached > GT_CACHE_LIMIT && !self.keep_all {
                self.gts.clear();
                self.cached = 0;
            }
            let t = read_u32s(
                &*self.file,
                sec as u64 * SECTOR,
                self.header.num_gtes as usize,
            )?;
            self.cached += t.len() * 4;
            self.gts.insert(idx, t);
        }
        Ok(self.gts.get_mut(&idx))
    }

    /// The grain table entry for grain number `g` (0 = unallocated, 1 = zeroed).
    fn entry(&mut self, g: u64) -> Result<u32> {
        let per = self.header.num_gtes as u64;
        let idx = (g / per) as usize;
        let e = match self.gt(idx)? {
            Some(t) => t[(g % per) as usize],
            None => 0,
        };
        if e > 1 {
            let len = self.file_len;
            let off = e as u64 * SECTOR;
            let meta_end = if self.compressed {
                (self.header.desc_offset + self.header.desc_size).max(1)
            } else {
                self.header.overhead.max(1)
            };
            if off >= len {
                return Err(StorageError::corrupt(
                    &self.path,
                    format!("grain {g} points to sector {e}, past the end of the file"),
                ));
            }
            if (e as u64) < meta_end {
                return Err(StorageError::corrupt(
                    &self.path,
                    format!("grain {g} points to sector {e}, inside the header or descriptor"),
                ));
            }
        }
        Ok(e)
    }

    /// State and length of the run at `off` (bytes within the extent), at most `len`.
    pub fn status(&mut self, off: u64, len: u64) -> Result<(Allocation, u64)> {
        let classify = |e: u32| match e {
            0 => Allocation::Unallocated,
            1 => Allocation::Zero,
            _ => Allocation::Data,
        };
        let pending = self.pending.as_ref().map(|(g, _)| *g);
        let state = |s: &mut Self, g: u64| -> Result<Allocation> {
            if pending == Some(g) {
                return Ok(Allocation::Data);
            }
            Ok(classify(s.entry(g)?))
        };
        let per = self.header.num_gtes as u64;
        // A grain table that does not exist: its whole span is unallocated.
        let no_table = |s: &Self, g: u64| {
            let idx = (g / per) as usize;
            s.gd.get(idx).is_none_or(|&t| t == 0)
                && !s.gts.contains_key(&idx)
                && pending.is_none_or(|p| p / per != g / per)
        };
        let g0 = off / self.grain;
        let first = state(self, g0)?;
        let mut end = (g0 + 1) * self.grain;
        while end < off + len {
            let g = end / self.grain;
            if first == Allocation::Unallocated && no_table(self, g) {
                end = (g / per + 1) * per * self.grain;
                continue;
            }
            if state(self, g)? != first {
                break;
            }
            end += self.grain;
        }
        Ok((first, (end - off).min(len)))
    }

    fn read_compressed(&mut self, g: u64, sec: u32) -> Result<&[u8]> {
        if self.last.as_ref().is_none_or(|(i, _)| *i != g) {
            let off = sec as u64 * SECTOR;
            let mut m = [0u8; 12];
            self.file.read_at(&mut m, off).map_err(io(&self.path))?;
            let lba = le64(&m, 0);
            let size = le32(&m, 8) as u64;
            let len = self.file_len;
            if size == 0 || size > self.grain * 2 + 4096 || off + 12 + size > len {
                return Err(StorageError::corrupt(
                    &self.path,
                    format!("compressed grain {g} at sector {sec} has a bad size {size}"),
                ));
            }
            if lba != g * self.header.grain_size {
                return Err(StorageError::corrupt(
                    &self.path,
                    format!("compressed grain at sector {sec} says it holds sector {lba}, but the grain table has it for grain {g}"),
                ));
            }
            let mut comp = vec![0u8; size as usize];
            self.file
                .read_at(&mut comp, off + 12)
                .map_err(io(&self.path))?;
            let mut out = Vec::with_capacity(self.grain as usize);
            flate2::read::ZlibDecoder::new(&comp[..])
                .take(self.grain)
                .read_to_end(&mut out)
                .map_err(|e| {
                    StorageError::corrupt(
                        &self.path,
                        format!("compressed grain {g} does not inflate: {e}"),
                    )
                })?;
            out.resize(self.grain as usize, 0);
            self.last = Some((g, out));
        }
        Ok(self.last.as_ref().map(|(_, d)| d.as_slice()).unwrap_or(&[]))
    }

    /// Reads `buf` at byte `off` of the extent; unallocated and zeroed grains read as zeros.
    pub fn read(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let g = pos / self.grain;
            let in_g = pos % self.grain;
            let n = ((self.grain - in_g) as usize).min(buf.len() - done);
            let part = &mut buf[done..done + n];
            if let Some((_, data)) = self.pending.as_ref().filter(|(p, _)| *p == g) {
                part.copy_from_slice(&data[in_g as usize..in_g as usize + n]);
                done += n;
                continue;
            }
            let e = self.entry(g)?;
            if e <= 1 {
                part.fill(0);
            } else if self.compressed {
                let data = self.read_compressed(g, e)?;
                part.copy_from_slice(&data[in_g as usize..in_g as usize + n]);
            } else {
                self.file
                    .read_at(part, e as u64 * SECTOR + in_g)
                    .map_err(io(&self.path))?;
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at byte `off` of the extent; `base` is the extent's start on the disk
    /// (for reads from `lower`).
    pub fn write(
        &mut self,
        buf: &[u8],
        off: u64,
        base: u64,
        lower: &dyn LowerLayers,
    ) -> Result<()> {
        if !self.compressed && !self.tail_meta {
            return self.write_plain(buf, off, base, lower);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let g = pos / self.grain;
            let in_g = pos % self.grain;
            let n = ((self.grain - in_g) as usize).min(buf.len() - done);
            let part = &buf[done..done + n];
            if let Some((_, data)) = self.pending.as_mut().filter(|(p, _)| *p == g) {
                data[in_g as usize..in_g as usize + n].copy_from_slice(part);
                done += n;
                continue;
            }
            let e = self.entry(g)?;
            if e > 1 && !self.compressed {
                self.file
                    .write_at(part, e as u64 * SECTOR + in_g)
                    .map_err(io(&self.path))?;
            } else {
                if self.compressed && self.pending.is_some() {
                    // The grain being filled is done: append it before reading this one.
                    self.commit()?;
                }
                let mut full = if e > 1 {
                    self.read_compressed(g, e)?.to_vec()
                } else {
                    vec![0u8; self.grain as usize]
                };
                if e == 0 && n as u64 != self.grain {
                    // Copy-on-write: the rest of the grain comes from the layers below, up to
                    // the end of the extent.
                    let valid = self
                        .capacity_bytes()
                        .saturating_sub(g * self.grain)
                        .min(self.grain) as usize;
                    lower.read_at(&mut full[..valid], base + g * self.grain)?;
                }
                full[in_g as usize..in_g as usize + n].copy_from_slice(part);
                if self.compressed {
                    self.commit()?;
                    self.pending = Some((g, full));
                } else {
                    self.allocate(g, &full)?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// An uncompressed extent's write: runs of grains that are allocated contiguously on the
    /// host are written in one piece; runs of new grains are allocated together
    /// ([`Self::allocate_run`]).
    fn write_plain(
        &mut self,
        buf: &[u8],
        off: u64,
        base: u64,
        lower: &dyn LowerLayers,
    ) -> Result<()> {
        let end = off + buf.len() as u64;
        let gsec = self.header.grain_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let g = pos / self.grain;
            let in_g = pos % self.grain;
            let e = self.entry(g)?;
            let mut next = g + 1;
            let mut olds = vec![e];
            while next * self.grain < end {
                let e2 = self.entry(next)?;
                let same = if e > 1 {
                    e2 as u64 == e as u64 + (next - g) * gsec
                } else {
                    e2 <= 1
                };
                if !same {
                    break;
                }
                olds.push(e2);
                next += 1;
            }
            let n = ((next * self.grain).min(end) - pos) as usize;
            let part = &buf[done..done + n];
            if e > 1 {
                self.file
                    .write_at(part, e as u64 * SECTOR + in_g)
                    .map_err(io(&self.path))?;
            } else {
                self.allocate_run(g, &olds, in_g, part, base, lower)?;
            }
            done += n;
        }
        Ok(())
    }

    /// Stores the new grains `g0..g0 + olds.len()` (their old entries, 0 or 1, in `olds`)
    /// together at the end of the file, `data` landing at byte `in_g` of the first: the data
    /// first, then the entries of each grain table touched in one write per copy, then the
    /// directory only for new tables. Without a parent the bytes around `data` are a hole (the
    /// file is extended over them); in a child they come from `lower` (unallocated grains) or
    /// are zeros (zeroed grains).
    fn allocate_run(
        &mut self,
        g0: u64,
        olds: &[u32],
        in_g: u64,
        data: &[u8],
        base: u64,
        lower: &dyn LowerLayers,
    ) -> Result<()> {
        let count = olds.len() as u64;
        let per = self.header.num_gtes as u64;
        if g0 + count > self.gd.len() as u64 * per {
            return Err(StorageError::corrupt(
                &self.path,
                format!("grain {} is beyond the grain directory", g0 + count - 1),
            ));
        }
        let at = self.end;
        let run = count * self.grain;
        if (at + run - self.grain) / SECTOR > u32::MAX as u64 {
            return Err(StorageError::Unsupported {
                path: self.path.clone(),
                detail: "the extent file would grow past 2 TiB".into(),
            });
        }
        let partial = in_g != 0 || (data.len() as u64) < run;
        if !partial {
            self.file.write_at(data, at).map_err(io(&self.path))?;
        } else if !self.differencing && at >= self.file_len {
            // Past the end of the file: extend it over the run (a hole, read as zeros) unless
            // the data reaches the end anyway, then write only the guest's bytes.
            if in_g + data.len() as u64 != run {
                self.file.set_len(at + run).map_err(io(&self.path))?;
                self.file_len = at + run;
            }
            self.file
                .write_at(data, at + in_g)
                .map_err(io(&self.path))?;
        } else {
            let mut full = vec![0u8; run as usize];
            let last = count - 1;
            let wend = in_g + data.len() as u64;
            for (k, &old) in olds.iter().enumerate() {
                let k = k as u64;
                let (gs, ge) = (k * self.grain, (k + 1) * self.grain);
                let covered = in_g <= gs && wend >= ge;
                if old != 0 || covered || !self.differencing || (k != 0 && k != last) {
                    continue;
                }
                // Copy-on-write: the rest of the grain comes from the layers below, up to the
                // end of the extent.
                let g = g0 + k;
                let valid = self
                    .capacity_bytes()
                    .saturating_sub(g * self.grain)
                    .min(self.grain) as usize;
                lower.read_at(
                    &mut full[gs as usize..gs as usize + valid],
                    base + g * self.grain,
                )?;
            }
            full[in_g as usize..wend as usize].copy_from_slice(data);
            self.file.write_at(&full, at).map_err(io(&self.path))?;
        }
        self.end = at + run;
        self.file_len = self.file_len.max(self.end);
        let first_sec = at / SECTOR;
        let gsec = self.header.grain_size;
        let mut g = g0;
        while g < g0 + count {
            let idx = (g / per) as usize;
            let i0 = (g % per) as usize;
            let stop = ((idx as u64 + 1) * per).min(g0 + count);
            let secs: Vec<u32> = (g..stop)
                .map(|x| (first_sec + (x - g0) * gsec) as u32)
                .collect();
            self.publish(idx, i0, &secs)?;
            g = stop;
        }
        Ok(())
    }

    /// Points entries `i0..` of grain table `idx` at `secs`: one write per copy of an existing
    /// table; a new table (and its redundant copy) goes at the end, then the directories.
    fn publish(&mut self, idx: usize, i0: usize, secs: &[u32]) -> Result<()> {
        let per = self.header.num_gtes as usize;
        let i1 = i0 + secs.len();
        if self.gd[idx] != 0 {
            if let Some(t) = self.gt(idx)? {
                t[i0..i1].copy_from_slice(secs);
            }
            let bytes = u32s_bytes(secs, 0);
            let rel = i0 as u64 * 4;
            self.file
                .write_at(&bytes, self.gd[idx] as u64 * SECTOR + rel)
                .map_err(io(&self.path))?;
            if let Some(r) = &self.rgd {
                if r[idx] != 0 {
                    self.file
                        .write_at(&bytes, r[idx] as u64 * SECTOR + rel)
                        .map_err(io(&self.path))?;
                }
            }
            return Ok(());
        }
        let mut t = vec![0u32; per];
        t[i0..i1].copy_from_slice(secs);
        self.new_table(idx, t)
    }

    /// Appends grain table `idx` (and its redundant copy) with content `t`, then points the
    /// directories at them.
    fn new_table(&mut self, idx: usize, t: Vec<u32>) -> Result<()> {
        let tb = u32s_bytes(&t, self.gt_bytes);
        let gt_at = self.end;
        let copies = if self.rgd.is_some() { 2 } else { 1 };
        if (gt_at + (copies - 1) * self.gt_bytes) / SECTOR > u32::MAX as u64 {
            return Err(StorageError::Unsupported {
                path: self.path.clone(),
                detail: "the extent file would grow past 2 TiB".into(),
            });
        }
        self.file.write_at(&tb, gt_at).map_err(io(&self.path))?;
        self.end += self.gt_bytes;
        self.file_len = self.file_len.max(self.end);
        let rgt_at = if self.rgd.is_some() {
            let a = self.end;
            self.file.write_at(&tb, a).map_err(io(&self.path))?;
            self.end += self.gt_bytes;
            self.file_len = self.file_len.max(self.end);
            Some(a)
        } else {
            None
        };
        let gsec = (gt_at / SECTOR) as u32;
        self.file
            .write_at(
                &gsec.to_le_bytes(),
                self.header.gd_offset * SECTOR + idx as u64 * 4,
            )
            .map_err(io(&self.path))?;
        self.gd[idx] = gsec;
        if let (Some(r), Some(a)) = (self.rgd.as_mut(), rgt_at) {
            let rsec = (a / SECTOR) as u32;
            self.file
                .write_at(
                    &rsec.to_le_bytes(),
                    self.header.rgd_offset * SECTOR + idx as u64 * 4,
                )
                .map_err(io(&self.path))?;
            r[idx] = rsec;
        }
        self.cached += t.len() * 4;
        self.gts.insert(idx, t);
        Ok(())
    }

    /// Appends the pending compressed grain, if any.
    pub fn commit(&mut self) -> Result<()> {
        if let Some((g, data)) = self.pending.take() {
            self.allocate(g, &data)?;
        }
        Ok(())
    }

    /// Stores a whole new grain: data first, then the grain table entry (both copies), then
    /// the directory only when a new table was needed.
    fn allocate(&mut self, g: u64, data: &[u8]) -> Result<()> {
        let at = self.end;
        let sec = at / SECTOR;
        if sec > u32::MAX as u64 {
            return Err(StorageError::Unsupported {
                path: self.path.clone(),
                detail: "the extent file would grow past 2 TiB".into(),
            });
        }
        let bytes = if self.compressed {
            let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(data).map_err(io(&self.path))?;
            let comp = enc.finish().map_err(io(&self.path))?;
            let mut out = Vec::with_capacity(comp.len() + 12);
            out.extend_from_slice(&(g * self.header.grain_size).to_le_bytes());
            out.extend_from_slice(&(comp.len() as u32).to_le_bytes());
            out.extend_from_slice(&comp);
            out.resize(out.len().next_multiple_of(SECTOR as usize), 0);
            out
        } else {
            data.to_vec()
        };
        self.file.write_at(&bytes, at).map_err(io(&self.path))?;
        self.end = at + bytes.len() as u64;
        self.file_len = self.file_len.max(self.end);
        if self.compressed {
            self.last = None;
        }
        let per = self.header.num_gtes as u64;
        let idx = (g / per) as usize;
        let i = (g % per) as usize;
        if idx >= self.gd.len() {
            return Err(StorageError::corrupt(
                &self.path,
                format!("grain {g} is beyond the grain directory"),
            ));
        }
        if self.tail_meta {
            let n = self.header.num_gtes as usize;
            let t = self.gts.entry(idx).or_insert_with(|| vec![0; n]);
            t[i] = sec as u32;
            self.tail_dirty = true;
            return Ok(());
        }
        self.publish(idx, i, &[sec as u32])
    }

    /// Loads every grain table (a stream whose metadata is rewritten at the end needs them all).
    pub fn load_all(&mut self) -> Result<()> {
        self.keep_all = true;
        for idx in 0..self.gd.len() {
            self.gt(idx)?;
        }
        Ok(())
    }

    /// For a stream with its directory at the end: writes tables, directory, footer and
    /// end-of-stream marker after the last grain.
    pub fn write_tail(&mut self, force: bool) -> Result<()> {
        if !self.tail_meta || !(self.tail_dirty || force) {
            return Ok(());
        }
        let p = self.path.clone();
        let gt_secs = self.gt_bytes / SECTOR;
        let mut at = self.end;
        let mut out = Vec::new();
        let mut gd = vec![0u32; self.gd.len()];
        let mut idxs: Vec<usize> = self
            .gts
            .iter()
            .filter(|(_, t)| t.iter().any(|&e| e != 0))
            .map(|(i, _)| *i)
            .collect();
        idxs.sort_unstable();
        for idx in idxs {
            out.extend_from_slice(&marker(gt_secs, MARKER_GT));
            gd[idx] = ((at + out.len() as u64) / SECTOR) as u32;
            out.extend_from_slice(&u32s_bytes(&self.gts[&idx], self.gt_bytes));
        }
        let gd_bytes = (gd.len() as u64 * 4).next_multiple_of(SECTOR);
        out.extend_from_slice(&marker(gd_bytes / SECTOR, MARKER_GD));
        let gd_sec = (at + out.len() as u64) / SECTOR;
        out.extend_from_slice(&u32s_bytes(&gd, gd_bytes));
        out.extend_from_slice(&marker(1, MARKER_FOOTER));
        let mut footer = self.first_header;
        footer.gd_offset = gd_sec;
        out.extend_from_slice(&footer.to_bytes());
        out.extend_from_slice(&marker(0, MARKER_EOS));
        self.file.write_at(&out, at).map_err(io(&p))?;
        at += out.len() as u64;
        self.file.set_len(at).map_err(io(&p))?;
        self.file_len = at;
        // Grains appended later overwrite this metadata; the next flush writes it again.
        for (i, &s) in gd.iter().enumerate() {
            self.gd[i] = s;
        }
        self.header.gd_offset = gd_sec;
        self.tail_dirty = false;
        Ok(())
    }

    /// Where the next grain goes (after this, stream metadata is rewritten).
    pub fn set_end(&mut self, end: u64) {
        self.end = end;
    }

    pub fn end(&self) -> u64 {
        self.end
    }

    pub fn tail_meta(&self) -> bool {
        self.tail_meta
    }

    /// The end of the last grain, from the markers (a stream opened for writing appends
    /// after it, overwriting the old tables and footer).
    pub fn grains_end(&mut self) -> Result<u64> {
        let mut end = (self.header.desc_offset + self.header.desc_size)
            .max(self.header.overhead)
            .max(1)
            * SECTOR;
        let per = self.header.num_gtes as u64;
        for idx in 0..self.gd.len() {
            let Some(t) = self.gt(idx)? else { continue };
            let t = t.clone();
            for (i, &e) in t.iter().enumerate() {
                if e > 1 {
                    let g = idx as u64 * per + i as u64;
                    let _ = self.entry(g)?;
                    let mut m = [0u8; 12];
                    self.file
                        .read_at(&mut m, e as u64 * SECTOR)
                        .map_err(io(&self.path))?;
                    let e_end = e as u64 * SECTOR + 12 + le32(&m, 8) as u64;
                    end = end.max(e_end.next_multiple_of(SECTOR));
                }
            }
        }
        Ok(end)
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync().map_err(io(&self.path))
    }
}

/// Layout of a new hosted sparse extent (QEMU's: descriptor at sector 1, redundant directory
/// and tables, directory and tables, grains from a 64 KiB boundary): the writes that make it
/// and the file's length (the tables are holes, read as zeros).
pub fn new_sparse(capacity: u64, desc: Option<&[u8]>, stream: bool) -> (Vec<(u64, Vec<u8>)>, u64) {
    let grain = 128u64;
    let num_gtes = 512u32;
    let mut h = Header {
        version: if stream { 3 } else { 1 },
        flags: FLAG_NL_DETECT
            | if stream {
                FLAG_COMPRESS | FLAG_MARKER
            } else {
                FLAG_RGD
            },
        capacity,
        grain_size: grain,
        num_gtes,
        compress: if stream { 1 } else { 0 },
        ..Default::default()
    };
    let desc_secs = if desc.is_some() { 20 } else { 0 };
    h.desc_offset = if desc.is_some() { 1 } else { 0 };
    h.desc_size = desc_secs;
    let gt_count = h.gt_count();
    let gt_secs = (num_gtes as u64 * 4).div_ceil(SECTOR);
    let gd_secs = (gt_count * 4).div_ceil(SECTOR);
    if stream {
        h.gd_offset = GD_AT_END;
        h.overhead = (1 + desc_secs).next_multiple_of(grain);
    } else {
        h.rgd_offset = 1 + desc_secs;
        h.gd_offset = h.rgd_offset + gd_secs + gt_secs * gt_count;
        h.overhead = (h.gd_offset + gd_secs + gt_secs * gt_count).next_multiple_of(grain);
    }
    let mut first = vec![0u8; ((1 + desc_secs) * SECTOR) as usize];
    first[..512].copy_from_slice(&h.to_bytes());
    if let Some(d) = desc {
        let n = d.len().min((desc_secs * SECTOR) as usize);
        first[512..512 + n].copy_from_slice(&d[..n]);
    }
    let mut writes = vec![(0, first)];
    if stream {
        // An empty stream: directory (all unallocated), footer and end-of-stream marker.
        let at = h.overhead * SECTOR;
        let mut tail = marker(gd_secs, MARKER_GD).to_vec();
        tail.resize(tail.len() + (gd_secs * SECTOR) as usize, 0);
        tail.extend_from_slice(&marker(1, MARKER_FOOTER));
        let mut footer = h;
        footer.gd_offset = h.overhead + 1;
        tail.extend_from_slice(&footer.to_bytes());
        tail.extend_from_slice(&marker(0, MARKER_EOS));
        let end = at + tail.len() as u64;
        writes.push((at, tail));
        return (writes, end);
    }
    {
        for (dir, first_gt) in [
            (h.rgd_offset, h.rgd_offset + gd_secs),
            (h.gd_offset, h.gd_offset + gd_secs),
        ] {
            let d: Vec<u32> = (0..gt_count)
                .map(|i| (first_gt + i * gt_secs) as u32)
                .collect();
            writes.push((dir * SECTOR, u32s_bytes(&d, gd_secs * SECTOR)));
        }
    }
    (writes, h.overhead * SECTOR)
}
