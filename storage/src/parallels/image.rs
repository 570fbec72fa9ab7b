//! One Parallels expandable image file (`.hds`, or a loose `.hdd`/`.img`): a 64-byte header,
//! the BAT (one little-endian u32 per cluster), then the data area.
//!
//! Write order for a new cluster: the cluster's data at the end of the data area (the file is
//! extended over the rest of the cluster, a hole, rather than zero-filled); its BAT entry
//! is kept in memory until `flush`, which syncs the data, writes the new BAT entries and
//! syncs again, so the BAT on disk never points at data that may not be durable. A crash
//! before a flush loses the unflushed allocations (their clusters are leaks, cut off by the
//! repair on the next writable open). The header carries nothing per allocation except the `in_use` mark, which is
//! set (and synced) before the first change after open or after a flush, and cleared by
//! `flush` once data and BAT are durable, as QEMU does on open/close.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

use crate::error::{Result, StorageError};
use crate::host_file::HostFile;
use crate::layer::*;

pub const MAGIC_V1: &[u8; 16] = b"WithoutFreeSpace";
pub const MAGIC_EXT: &[u8; 16] = b"WithouFreSpacExt";
const VERSION: u32 = 2;
const HEADER_SIZE: u64 = 64;
const SECTOR: u64 = 512;
/// `in_use` while a writer has the image open ("Ynot").
pub const INUSE_OPEN: u32 = 0x746F_6E59;
/// The format-extension cluster's magic.
const EXT_MAGIC: u64 = 0xAB23_4CEF_23DC_EA87;
/// Feature flag: the image must not be changed by software that does not know the feature.
const EXT_NECESSARY: u64 = 1;
const DIRTY_BITMAP_MAGIC: u64 = 0x2038_5FAE_252C_B34A;
/// Default cluster: 1 MiB (2048 sectors), what QEMU and Parallels Desktop use.
pub const DEFAULT_CLUSTER: u64 = 1 << 20;
/// QEMU's cap on tracks (cluster size in sectors).
const MAX_TRACKS: u64 = (i32::MAX / 513) as u64;
/// Writing allocates one cluster of memory; images with larger clusters open read-only.
const MAX_WRITE_CLUSTER: u64 = 64 << 20;

/// Whether `head` starts with a Parallels image header.
pub fn is_parallels_header(head: &[u8]) -> bool {
    head.len() >= HEADER_SIZE as usize
        && (&head[..16] == MAGIC_V1 || &head[..16] == MAGIC_EXT)
        && u32::from_le_bytes([head[16], head[17], head[18], head[19]]) == VERSION
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

struct State {
    bat: Vec<u32>,
    /// Where the next cluster goes, in sectors.
    next_alloc: u64,
    /// Whether `in_use` is set on disk.
    marked: bool,
    /// Clusters allocated since the last flush whose BAT entries are only in memory: they
    /// reach the file in `flush`, after the clusters' data is durable.
    pending: Vec<u32>,
    /// A write failed part-way: refuse further writes (the file is left for repair on reopen).
    broken: bool,
}

pub struct ParallelsImage {
    file: Arc<dyn HostFile>,
    path: PathBuf,
    writable: bool,
    /// "WithouFreSpacExt": BAT entries count clusters, not sectors.
    ext_magic: bool,
    tracks: u64,
    cluster: u64,
    size: u64,
    header: [u8; 64],
    state: Mutex<State>,
}

impl ParallelsImage {
    /// Opens an image file. A writable open of an image left `in_use` by a crash repairs it:
    /// the BAT has been validated, so the mark is cleared and leaked clusters at the end cut off.
    pub fn open(file: Arc<dyn HostFile>, writable: bool) -> Result<Self> {
        let path = file.path().to_path_buf();
        let bad = |d: String| StorageError::corrupt(&path, d);
        let io = |e| StorageError::io(&path, e);
        let flen = file.len().map_err(io)?;
        if flen < HEADER_SIZE {
            return Err(bad(format!(
                "file is {flen} bytes, too short for a Parallels header (64 bytes)"
            )));
        }
        let mut header = [0u8; 64];
        file.read_at(&mut header, 0).map_err(io)?;
        let ext_magic = if &header[..16] == MAGIC_V1 {
            false
        } else if &header[..16] == MAGIC_EXT {
            true
        } else {
            return Err(bad("not a Parallels image (bad magic)".into()));
        };
        let version = le32(&header, 16);
        if version != VERSION {
            return Err(bad(format!(
                "Parallels header version {version}, expected 2"
            )));
        }
        let tracks = le32(&header, 28) as u64;
        if tracks == 0 {
            return Err(bad("cluster size (tracks) is 0".into()));
        }
        if tracks > MAX_TRACKS {
            return Err(bad(format!(
                "cluster size of {tracks} sectors is too large"
            )));
        }
        let cluster = tracks * SECTOR;
        if writable && cluster > MAX_WRITE_CLUSTER {
            return Err(StorageError::Unsupported {
                path,
                detail: format!("{cluster}-byte clusters are too large to write; open read-only"),
            });
        }
        let bat_entries = le32(&header, 32) as u64;
        let bat_end = HEADER_SIZE + 4 * bat_entries;
        if bat_end > flen {
            return Err(bad(format!(
                "BAT of {bat_entries} entries ends at {bat_end}, past the end of the file ({flen} bytes)"
            )));
        }
        let mut nb_sectors = le64(&header, 36);
        if !ext_magic {
            nb_sectors &= 0xffff_ffff;
        }
        let size = nb_sectors
            .checked_mul(SECTOR)
            .filter(|s| *s <= (1u64 << 32) * cluster)
            .ok_or_else(|| bad(format!("disk size of {nb_sectors} sectors is absurd")))?;
        let mut data_off = le32(&header, 48) as u64;
        if data_off == 0 {
            data_off = bat_end.div_ceil(SECTOR);
        }
        if data_off * SECTOR < bat_end {
            return Err(bad(format!(
                "data area at sector {data_off} overlaps the BAT (which ends at byte {bat_end})"
            )));
        }
        if ext_magic && !data_off.is_multiple_of(tracks) {
            return Err(bad(format!(
                "data offset {data_off} is not a multiple of the cluster size ({tracks} sectors)"
            )));
        }
        let mut raw = vec![0u8; (4 * bat_entries) as usize];
        file.read_at(&mut raw, HEADER_SIZE).map_err(io)?;
        let bat: Vec<u32> = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        drop(raw);
        let mult = if ext_magic { tracks } else { 1 };
        let mut data_end = data_off;
        let mut used: Vec<(u64, usize)> = Vec::new();
        for (i, &e) in bat.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let sect = e as u64 * mult;
            if sect < data_off {
                return Err(bad(format!(
                    "BAT entry {i} points at sector {sect}, inside the header/BAT (data starts at {data_off})"
                )));
            }
            if sect * SECTOR >= flen {
                return Err(bad(format!(
                    "BAT entry {i} points at byte {}, past the end of the file ({flen} bytes)",
                    sect * SECTOR
                )));
            }
            data_end = data_end.max(sect + tracks);
            used.push((sect, i));
        }
        used.sort_unstable();
        for w in used.windows(2) {
            if w[1].0 < w[0].0 + tracks {
                return Err(bad(format!(
                    "BAT entries {} and {} overlap (host sectors {} and {})",
                    w[0].1, w[1].1, w[0].0, w[1].0
                )));
            }
        }
        let ext_off = le64(&header, 56);
        if ext_off != 0 {
            if ext_off < data_off || ext_off.saturating_mul(SECTOR) >= flen {
                return Err(bad(format!(
                    "format extension at sector {ext_off} is outside the data area"
                )));
            }
            data_end = data_end.max(ext_off + tracks);
            let necessary = read_extension(&*file, ext_off * SECTOR, cluster, &path)?;
            if writable && necessary {
                return Err(StorageError::Unsupported {
                    path,
                    detail: "the image has a format extension marked necessary that ferry does not know; it can be opened read-only".into(),
                });
            }
        }
        let inuse = le32(&header, 44);
        let unclean = inuse == INUSE_OPEN;
        if unclean {
            tracing::warn!(
                "{}: Parallels image was not closed cleanly{}",
                path.display(),
                if writable { "; repairing" } else { "" }
            );
        }
        // New clusters go past everything in the file (extension clusters, bitmaps, leaks).
        let tail = flen.div_ceil(SECTOR);
        let next_alloc = if unclean && writable && ext_off == 0 {
            data_end
        } else {
            let past = tail.max(data_end);
            data_off + (past - data_off).div_ceil(tracks) * tracks
        };
        let img = Self {
            file,
            path: path.clone(),
            writable,
            ext_magic,
            tracks,
            cluster,
            size,
            header,
            state: Mutex::new(State {
                bat,
                next_alloc,
                marked: unclean,
                pending: Vec::new(),
                broken: false,
            }),
        };
        if writable && unclean {
            if ext_off == 0 && flen > data_end * SECTOR {
                img.file.set_len(data_end * SECTOR).map_err(io)?;
            }
            img.flush()?;
        }
        if writable {
            // As QEMU: the image is marked in use for as long as a writer has it open.
            img.write_header(INUSE_OPEN)?;
            img.lock().marked = true;
        }
        Ok(img)
    }

    /// Creates an image in an empty file: "WithoutFreeSpace" (read by VirtualBox and QEMU)
    /// unless the disk needs more than 2^32 sectors, then "WithouFreSpacExt". `Fixed`
    /// allocates and zero-fills every cluster.
    pub fn create(file: Arc<dyn HostFile>, size: u64, variant: Variant) -> Result<Self> {
        Self::create_with_cluster(file, size, variant, DEFAULT_CLUSTER)
    }

    /// As [`create`](Self::create), with `cluster` bytes per cluster (a bundle's snapshot
    /// takes its storage's `Blocksize`).
    pub fn create_with_cluster(
        file: Arc<dyn HostFile>,
        size: u64,
        variant: Variant,
        cluster: u64,
    ) -> Result<Self> {
        let path = file.path().to_path_buf();
        let inval = |d: &str| StorageError::Unsupported {
            path: path.clone(),
            detail: d.into(),
        };
        match variant {
            Variant::Fixed | Variant::Dynamic => {}
            _ => return Err(inval("Parallels images are dynamic or fixed only")),
        }
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return Err(inval("size must be a non-zero multiple of 512 bytes"));
        }
        if cluster == 0 || !cluster.is_multiple_of(SECTOR) || cluster > MAX_WRITE_CLUSTER {
            return Err(inval(
                "cluster size must be a multiple of 512 bytes up to 64 MiB",
            ));
        }
        let tracks = cluster / SECTOR;
        let nb_sectors = size / SECTOR;
        let ext_magic = nb_sectors > u32::MAX as u64;
        let bat_entries = size.div_ceil(cluster);
        if bat_entries > u32::MAX as u64 {
            return Err(inval("size too large for a Parallels image"));
        }
        let bat_bytes = HEADER_SIZE + 4 * bat_entries;
        let data_off = bat_bytes.div_ceil(cluster) * tracks;
        if !ext_magic
            && (data_off + bat_entries * tracks) > u32::MAX as u64
            && variant == Variant::Fixed
        {
            return Err(inval("size too large for a fixed WithoutFreeSpace image"));
        }
        let mut h = [0u8; 64];
        h[..16].copy_from_slice(if ext_magic { MAGIC_EXT } else { MAGIC_V1 });
        h[16..20].copy_from_slice(&VERSION.to_le_bytes());
        h[20..24].copy_from_slice(&16u32.to_le_bytes());
        let cyl = (nb_sectors / 16 / 32).min(u32::MAX as u64) as u32;
        h[24..28].copy_from_slice(&cyl.to_le_bytes());
        h[28..32].copy_from_slice(&(tracks as u32).to_le_bytes());
        h[32..36].copy_from_slice(&(bat_entries as u32).to_le_bytes());
        h[36..44].copy_from_slice(&nb_sectors.to_le_bytes());
        h[48..52].copy_from_slice(&(data_off as u32).to_le_bytes());
        let io = |e| StorageError::io(&path, e);
        file.set_len(data_off * SECTOR).map_err(io)?;
        if variant == Variant::Fixed {
            let zeros = vec![0u8; cluster as usize];
            for i in 0..bat_entries {
                file.write_at(&zeros, (data_off + i * tracks) * SECTOR)
                    .map_err(io)?;
            }
            file.sync().map_err(io)?;
            let mult = if ext_magic { tracks } else { 1 };
            let mut bat = Vec::with_capacity((bat_entries * 4) as usize);
            for i in 0..bat_entries {
                bat.extend_from_slice(&(((data_off + i * tracks) / mult) as u32).to_le_bytes());
            }
            file.write_at(&bat, HEADER_SIZE).map_err(io)?;
        }
        file.write_at(&h, 0).map_err(io)?;
        file.sync().map_err(io)?;
        Self::open(file, true)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io(&self, e: std::io::Error) -> StorageError {
        StorageError::io(&self.path, e)
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        crate::error::check_range(&self.path, offset, len, self.size)
    }

    /// Host byte offset of cluster `idx`, if allocated.
    fn host(&self, st: &State, idx: u64) -> Option<u64> {
        let e = *st.bat.get(usize::try_from(idx).ok()?)?;
        (e != 0).then(|| e as u64 * if self.ext_magic { self.tracks } else { 1 } * SECTOR)
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// Whether the header says a writer still has the image open.
    pub fn header_in_use(&self) -> bool {
        le32(&self.header, 44) == INUSE_OPEN
    }

    fn write_header(&self, inuse: u32) -> Result<()> {
        let mut h = self.header;
        h[44..48].copy_from_slice(&inuse.to_le_bytes());
        self.file.write_at(&h, 0).map_err(|e| self.io(e))?;
        self.file.sync().map_err(|e| self.io(e))
    }

    /// Writes the BAT entries of clusters allocated since the last flush (their data must
    /// already be durable), in runs of nearby entries.
    fn write_pending_bat(&self, st: &mut State) -> Result<()> {
        /// Entries between two pending ones that may be rewritten (unchanged) to join runs.
        const JOIN: usize = 1024;
        st.pending.sort_unstable();
        st.pending.dedup();
        let mut i = 0;
        while i < st.pending.len() {
            let first = st.pending[i] as usize;
            let mut last = first;
            i += 1;
            while i < st.pending.len() && (st.pending[i] as usize) - last <= JOIN {
                last = st.pending[i] as usize;
                i += 1;
            }
            let mut raw = Vec::with_capacity(4 * (last - first + 1));
            for e in &st.bat[first..=last] {
                raw.extend_from_slice(&e.to_le_bytes());
            }
            self.file
                .write_at(&raw, HEADER_SIZE + 4 * first as u64)
                .map_err(|e| self.io(e))?;
        }
        st.pending.clear();
        Ok(())
    }

    /// Writes into one cluster (`at` within it, not crossing its end).
    fn write_cluster(
        &self,
        st: &mut State,
        idx: u64,
        at: u64,
        buf: &[u8],
        lower: &dyn LowerLayers,
    ) -> Result<()> {
        if let Some(h) = self.host(st, idx) {
            return self.file.write_at(buf, h + at).map_err(|e| self.io(e));
        }
        if idx as usize >= st.bat.len() {
            return Err(StorageError::corrupt(
                &self.path,
                format!(
                    "cluster {idx} is beyond the BAT ({} entries); cannot write it",
                    st.bat.len()
                ),
            ));
        }
        let sect = st.next_alloc;
        let entry = if self.ext_magic {
            sect / self.tracks
        } else {
            sect
        };
        if entry > u32::MAX as u64 {
            return Err(StorageError::Unsupported {
                path: self.path.clone(),
                detail: "the image file has reached the largest offset its BAT can address".into(),
            });
        }
        let start = idx * self.cluster;
        let host = sect * SECTOR;
        let partial = buf.len() as u64 != self.cluster;
        let fresh = self.file.len().map_err(|e| self.io(e))? <= host;
        if fresh {
            // The cluster lies past the end of the file: extend the file over it (a hole that
            // reads as zeros) and write only what is not zero, never a cluster of zeros.
            if partial {
                self.file
                    .set_len(host + self.cluster)
                    .map_err(|e| self.io(e))?;
                let inside = (self.size.saturating_sub(start)).min(self.cluster);
                let end = at + buf.len() as u64;
                let (f, p) = (&*self.file, &*self.path);
                copy_nonzero_lower(f, p, host, start, 0..at.min(inside), lower)?;
                copy_nonzero_lower(f, p, host, start, end.min(inside)..inside, lower)?;
            }
            self.file.write_at(buf, host + at).map_err(|e| self.io(e))?;
        } else {
            let mut data = vec![0u8; self.cluster as usize];
            if partial {
                let inside = (self.size.saturating_sub(start)).min(self.cluster) as usize;
                lower.read_at(&mut data[..inside], start)?;
            }
            data[at as usize..at as usize + buf.len()].copy_from_slice(buf);
            self.file.write_at(&data, host).map_err(|e| self.io(e))?;
        }
        // The BAT entry stays in memory until `flush` has made the data durable.
        st.pending.push(idx as u32);
        st.bat[idx as usize] = entry as u32;
        st.next_alloc = sect + self.tracks;
        Ok(())
    }
}

/// Reads the format-extension cluster; returns whether an unknown feature is marked
/// NECESSARY. Unknown optional features are ignored; a damaged cluster is only warned about
/// (QEMU drops such extensions).
fn read_extension(file: &dyn HostFile, off: u64, cluster: u64, path: &Path) -> Result<bool> {
    let len = cluster.min(1 << 20) as usize;
    let mut c = vec![0u8; len];
    file.read_at(&mut c, off)
        .map_err(|e| StorageError::io(path, e))?;
    if len < 24 || le64(&c, 0) != EXT_MAGIC {
        tracing::warn!(
            "{}: format extension cluster has a bad magic; ignored",
            path.display()
        );
        return Ok(false);
    }
    let mut pos = 24usize;
    let mut necessary = false;
    while pos + 24 <= len {
        let magic = le64(&c, pos);
        let flags = le64(&c, pos + 8);
        let size = le32(&c, pos + 16) as usize;
        if magic == 0 {
            return Ok(necessary);
        }
        if magic != DIRTY_BITMAP_MAGIC && flags & EXT_NECESSARY != 0 {
            necessary = true;
        }
        pos = match (pos + 24).checked_add(size.div_ceil(8) * 8) {
            Some(p) => p,
            None => break,
        };
    }
    tracing::warn!(
        "{}: format extension has no end marker; ignored",
        path.display()
    );
    Ok(necessary)
}

impl Drop for ParallelsImage {
    fn drop(&mut self) {
        if self.writable {
            if let Err(e) = self.flush() {
                tracing::warn!("{}: closing: {e}", self.path.display());
            }
        }
    }
}

impl Layer for ParallelsImage {
    fn format(&self) -> FormatKind {
        FormatKind::Parallels
    }
    fn variant(&self) -> Variant {
        if self.lock().bat.iter().all(|&e| e != 0) {
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
        None
    }
    fn parent(&self) -> Option<ParentRef> {
        None
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok((Allocation::Unallocated, 0));
        }
        let st = self.lock();
        let first = offset / self.cluster;
        let alloc = self.host(&st, first).is_some();
        let mut end = (first + 1) * self.cluster;
        while end < offset + len && self.host(&st, end / self.cluster).is_some() == alloc {
            end += self.cluster;
        }
        let state = if alloc {
            Allocation::Data
        } else {
            Allocation::Unallocated
        };
        Ok((state, end.min(offset + len) - offset))
    }
    fn mapped_file(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }
    fn host_run(&self, offset: u64, len: u64) -> Result<Option<(u64, u64)>> {
        self.check(offset, len)?;
        let st = self.lock();
        Ok(crate::layer::block_host_run(
            offset,
            len,
            self.cluster,
            |i| self.host(&st, i),
        ))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let idx = off / self.cluster;
            let at = off % self.cluster;
            let n = ((self.cluster - at) as usize).min(buf.len() - done);
            let host = self.host(&self.lock(), idx);
            let part = &mut buf[done..done + n];
            match host {
                Some(h) => self.file.read_at(part, h + at).map_err(|e| self.io(e))?,
                None => part.fill(0),
            }
            done += n;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, lower: &dyn LowerLayers) -> Result<()> {
        if !self.writable {
            return Err(StorageError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.check(offset, buf.len() as u64)?;
        let mut st = self.lock();
        if st.broken {
            return Err(StorageError::corrupt(
                &self.path,
                "an earlier write failed; reopen the image to repair it",
            ));
        }
        if !st.marked {
            // Written again after a flush cleared the mark.
            if let Err(e) = self.write_header(INUSE_OPEN) {
                st.broken = true;
                return Err(e);
            }
            st.marked = true;
        }
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let idx = off / self.cluster;
            let at = off % self.cluster;
            let n = ((self.cluster - at) as usize).min(buf.len() - done);
            if let Err(e) = self.write_cluster(&mut st, idx, at, &buf[done..done + n], lower) {
                st.broken = true;
                return Err(e);
            }
            done += n;
        }
        Ok(())
    }
    fn reserve(&self, offset: u64, len: u64) {
        if !self.writable || len == 0 || self.check(offset, len).is_err() {
            return;
        }
        let st = self.lock();
        // New clusters go one after the other from `next_alloc`, in the order written.
        let first = offset / self.cluster;
        let last = (offset + len - 1) / self.cluster;
        let new = (first..=last)
            .filter(|&i| self.host(&st, i).is_none())
            .count() as u64;
        if new > 0 {
            self.file
                .reserve(st.next_alloc * SECTOR, new * self.cluster);
        }
    }
    fn block_table(&self) -> Result<Option<crate::layer::BlockTable>> {
        let st = self.lock();
        let mult = if self.ext_magic { self.tracks } else { 1 };
        let mut blocks: Vec<(u64, u64)> = st
            .bat
            .iter()
            .enumerate()
            .filter(|(_, &e)| e != 0)
            .map(|(i, &e)| (i as u64, u64::from(e) * mult * SECTOR))
            .collect();
        let ext_off = le64(&self.header, 56);
        if ext_off != 0 {
            // The format extension cluster is in use, though no BAT entry names it.
            blocks.push((u64::MAX, ext_off * SECTOR));
        }
        let mut data_off = u64::from(le32(&self.header, 48));
        if data_off == 0 {
            data_off = (HEADER_SIZE + 4 * st.bat.len() as u64).div_ceil(SECTOR);
        }
        Ok(Some(crate::layer::BlockTable {
            file: self.path.clone(),
            blocks,
            block_bytes: self.cluster,
            data_start: data_off * SECTOR,
            data_end: self
                .file
                .len()
                .map_err(|e| StorageError::io(&self.path, e))?,
            slack: 0,
        }))
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock();
        if st.broken {
            return Err(StorageError::corrupt(
                &self.path,
                "an earlier write failed; reopen the image to repair it",
            ));
        }
        self.file.sync().map_err(|e| self.io(e))?;
        if !st.pending.is_empty() {
            self.write_pending_bat(&mut st)?;
            self.file.sync().map_err(|e| self.io(e))?;
        }
        if st.marked {
            // QEMU writes 0 on close; a value another writer left ("v2.1", "pd17") is kept.
            let clean = if self.header_in_use() {
                0
            } else {
                le32(&self.header, 44)
            };
            self.write_header(clean)?;
            st.marked = false;
        }
        Ok(())
    }
}
