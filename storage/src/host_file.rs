//! The host files under an image, behind a small trait so tests can inject failures.
//!
//! This is the one place where every format's files are read and written, so it is also
//! where the host cache is turned off (`hostiocache=off`): [`HostFile::bypass_host_cache`]
//! sets O_DIRECT on the open file, and from then on every read and write of that file,
//! data and metadata alike, goes through O_DIRECT on the same descriptor (through aligned
//! bounce buffers where the caller's range or buffer is not aligned). One descriptor means
//! no page cache that could serve stale metadata after a direct write.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::io::AlignedBuf;

/// Positional I/O on one host file.
pub trait HostFile: Send + Sync {
    fn path(&self) -> &Path;
    /// Reads exactly `buf.len()` bytes; bytes past the end of the file read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes written data durable.
    fn sync(&self) -> io::Result<()>;
    /// Frees the range on the host (reads return zeros afterwards).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Allocates the range's blocks ahead of a write that will fill it whole (the size is
    /// kept). One extent allocation then replaces the file system's block-by-block
    /// reservation under each buffered write (ext4 delayed allocation), which is a third of a
    /// large copy's kernel time. Best effort: where the file system cannot, nothing happens.
    fn reserve(&self, _offset: u64, _len: u64) {}
    /// Turns the host page cache off for this file (O_DIRECT), for `hostiocache=off`.
    /// `None` where the file system has no O_DIRECT (the file stays buffered) or the file
    /// is not a host file.
    fn bypass_host_cache(&self) -> io::Result<Option<DirectAlign>> {
        Ok(None)
    }
}

/// What O_DIRECT needs of one file: memory aligned to `mem`, file offsets and lengths to
/// `offset` (both powers of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectAlign {
    pub mem: usize,
    pub offset: u64,
}

impl DirectAlign {
    /// The file's alignment as its file system reports it (statx STATX_DIOALIGN); without
    /// that (Linux < 6.1) 4 KiB, which every block device accepts.
    pub(crate) fn of(fd: BorrowedFd<'_>) -> Self {
        use rustix::fs::{statx, AtFlags, StatxFlags};
        let mut al = Self {
            mem: 4096,
            offset: 4096,
        };
        if let Ok(st) = statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
            if st.stx_mask & StatxFlags::DIOALIGN.bits() != 0
                && st.stx_dio_mem_align.is_power_of_two()
                && st.stx_dio_offset_align.is_power_of_two()
            {
                al.mem = st.stx_dio_mem_align as usize;
                al.offset = u64::from(st.stx_dio_offset_align);
            }
        }
        al
    }

    fn down(self, x: u64) -> u64 {
        x - x % self.offset
    }

    fn up(self, x: u64) -> io::Result<u64> {
        x.checked_next_multiple_of(self.offset)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))
    }

    /// Whether O_DIRECT takes the range as it is (a whole number of blocks).
    fn whole(self, offset: u64, len: usize) -> bool {
        offset.is_multiple_of(self.offset) && (len as u64).is_multiple_of(self.offset)
    }

    fn fits(self, buf: &[u8], offset: u64) -> bool {
        self.whole(offset, buf.len()) && (buf.as_ptr() as usize).is_multiple_of(self.mem)
    }

    /// Bytes of bounce buffer per system call: 1 MiB, in whole blocks.
    fn chunk(self) -> u64 {
        (1u64 << 20).max(self.offset)
    }
}

/// Whether `LocalFile::sync` reaches the disk (see [`set_durable`]).
static DURABLE: AtomicBool = AtomicBool::new(true);

/// Turns every host file sync in this process into a no-op (`false`), as qemu-img convert's
/// default cache mode does: for a tool writing a new image it can simply write again, never
/// for a running VM. Data then reaches the disk when the kernel writes it back.
pub fn set_durable(on: bool) {
    DURABLE.store(on, Ordering::SeqCst);
}

pub fn durable() -> bool {
    DURABLE.load(Ordering::SeqCst)
}

/// A plain file on the host.
pub struct LocalFile {
    file: File,
    path: PathBuf,
    /// `Some` once the host cache is off (O_DIRECT on `file`). Every operation holds it
    /// shared, except a write that must read-modify-write a partial block: that one holds
    /// it exclusively, so no other write lands in the block between its read and its write.
    direct: RwLock<Option<DirectAlign>>,
}

impl LocalFile {
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(Self::new(file, path))
    }

    fn new(file: File, path: &Path) -> Self {
        Self {
            file,
            path: path.to_path_buf(),
            direct: RwLock::new(None),
        }
    }

    /// Test hook: a coarser alignment than the file system's (any multiple of it is valid for
    /// O_DIRECT), so the partial-block paths run on any disk.
    #[cfg(test)]
    pub(crate) fn bypass_host_cache_aligned(&self, offset: u64) -> io::Result<Option<DirectAlign>> {
        let al = self.bypass_host_cache()?;
        let mut mode = self.direct.write().unwrap_or_else(|e| e.into_inner());
        if let (Some(al), Some(m)) = (al, mode.as_mut()) {
            m.offset = al.offset.max(offset).next_power_of_two();
        }
        Ok(*mode)
    }

    /// The alignment O_DIRECT needs of this file, once the host cache is off.
    pub fn direct(&self) -> Option<DirectAlign> {
        *self.direct.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a new file; an existing one is an error, never overwritten.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Self::new(file, path))
    }
}

impl HostFile for LocalFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mode = self.direct.read().unwrap_or_else(|e| e.into_inner());
        match *mode {
            Some(al) => read_direct(&self.file, al, buf, offset),
            None => read_buffered(&self.file, buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mode = self.direct.read().unwrap_or_else(|e| e.into_inner());
        match *mode {
            None => self.file.write_all_at(buf, offset),
            Some(al) if al.whole(offset, buf.len()) => write_direct(&self.file, al, buf, offset),
            Some(_) => {
                drop(mode);
                let mode = self.direct.write().unwrap_or_else(|e| e.into_inner());
                match *mode {
                    Some(al) => write_direct(&self.file, al, buf, offset),
                    None => self.file.write_all_at(buf, offset),
                }
            }
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let _shared = self.direct.read().unwrap_or_else(|e| e.into_inner());
        self.file.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        if !durable() {
            return Ok(());
        }
        // With O_DIRECT too: the data may sit in the disk's write cache, and the file
        // system's record of newly allocated blocks is not written until this.
        self.file.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        let _shared = self.direct.read().unwrap_or_else(|e| e.into_inner());
        fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(io::Error::from)
    }

    fn reserve(&self, offset: u64, len: u64) {
        use rustix::fs::{fallocate, FallocateFlags};
        let _shared = self.direct.read().unwrap_or_else(|e| e.into_inner());
        // Errors (no fallocate on this file system, a full disk) surface at the write itself.
        let _ = fallocate(&self.file, FallocateFlags::KEEP_SIZE, offset, len);
    }

    fn bypass_host_cache(&self) -> io::Result<Option<DirectAlign>> {
        use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
        let mut mode = self.direct.write().unwrap_or_else(|e| e.into_inner());
        if mode.is_some() {
            return Ok(*mode);
        }
        // F_SETFL on the descriptor already open (Linux lets O_DIRECT change there): every
        // format opens its files through this type, so no format needs to know.
        let flags = fcntl_getfl(&self.file)?;
        match fcntl_setfl(&self.file, flags | OFlags::DIRECT) {
            Ok(()) => {}
            Err(rustix::io::Errno::INVAL) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        *mode = Some(DirectAlign::of(self.file.as_fd()));
        Ok(*mode)
    }
}

fn read_buffered(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// O_DIRECT read of whole blocks into an aligned buffer; past the end of the file, zeros.
fn read_blocks(file: &File, al: DirectAlign, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset + done as u64;
        match file.read_at(&mut buf[done..], at) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                // A short read that leaves the rest unaligned ends at the end of the file
                // (the file's last block is partial).
                if done < buf.len() && !al.fits(&buf[done..], offset + done as u64) {
                    if file.metadata()?.len() > offset + done as u64 {
                        return Err(io::Error::other("short O_DIRECT read inside the file"));
                    }
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

fn read_direct(file: &File, al: DirectAlign, buf: &mut [u8], offset: u64) -> io::Result<()> {
    if al.fits(buf, offset) {
        return read_blocks(file, al, buf, offset);
    }
    // Through a bounce buffer, a chunk at a time: the whole blocks around each piece.
    let end = offset
        .checked_add(buf.len() as u64)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let span_end = al.up(end)?;
    let mut bounce = AlignedBuf::new(
        (span_end - al.down(offset)).min(al.chunk()) as usize,
        al.mem,
    );
    let mut pos = offset;
    while pos < end {
        let a = al.down(pos);
        let b = span_end.min(a + al.chunk());
        let c = &mut bounce.as_mut_slice()[..(b - a) as usize];
        read_blocks(file, al, c, a)?;
        let take = (b.min(end) - pos) as usize;
        let from = (pos - a) as usize;
        buf[(pos - offset) as usize..][..take].copy_from_slice(&c[from..from + take]);
        pos += take as u64;
    }
    Ok(())
}

/// O_DIRECT write. A range that is not whole blocks reads the partial blocks at its ends
/// and writes them back around the new bytes: the caller holds the file exclusively then.
fn write_direct(file: &File, al: DirectAlign, buf: &[u8], offset: u64) -> io::Result<()> {
    if al.fits(buf, offset) {
        return file.write_all_at(buf, offset);
    }
    let end = offset
        .checked_add(buf.len() as u64)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let span_end = al.up(end)?;
    // Writing the last partial block whole may lengthen the file past `end`: note the
    // length to cut it back to (a format's trailer must stay the file's last bytes).
    let old_len = match span_end > end {
        true => Some(file.metadata()?.len()),
        false => None,
    };
    let mut bounce = AlignedBuf::new(
        (span_end - al.down(offset)).min(al.chunk()) as usize,
        al.mem,
    );
    let block = al.offset as usize;
    let mut pos = offset;
    while pos < end {
        let a = al.down(pos);
        let b = span_end.min(a + al.chunk());
        let c = &mut bounce.as_mut_slice()[..(b - a) as usize];
        let from = (pos - a) as usize;
        let take = (b.min(end) - pos) as usize;
        if from > 0 {
            read_blocks(file, al, &mut c[..block], a)?;
        }
        if from + take < c.len() {
            let last = c.len() - block;
            read_blocks(file, al, &mut c[last..], b - block as u64)?;
        }
        c[from..from + take].copy_from_slice(&buf[(pos - offset) as usize..][..take]);
        file.write_all_at(c, a)?;
        pos += take as u64;
    }
    if let Some(old) = old_len {
        let want = old.max(end);
        if span_end > want {
            file.set_len(want)?;
        }
    }
    Ok(())
}

/// Test wrapper: the k-th write (counting from 0) and every later one fail, as a crash
/// at that point would leave the file.
pub struct FailingFile {
    inner: Arc<dyn HostFile>,
    writes_left: AtomicUsize,
}

impl FailingFile {
    pub fn new(inner: Arc<dyn HostFile>, writes_allowed: usize) -> Self {
        Self {
            inner,
            writes_left: AtomicUsize::new(writes_allowed),
        }
    }

    fn take(&self) -> io::Result<()> {
        self.writes_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .map(|_| ())
            .map_err(|_| io::Error::other("injected failure: the host crashed here"))
    }
}

impl HostFile for FailingFile {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.take()?;
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.take()?;
        self.inner.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.take()?;
        self.inner.punch_hole(offset, len)
    }
    fn reserve(&self, offset: u64, len: u64) {
        self.inner.reserve(offset, len)
    }
    fn bypass_host_cache(&self) -> io::Result<Option<DirectAlign>> {
        self.inner.bypass_host_cache()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-host-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }

    fn bytes(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13) ^ seed)
            .collect()
    }

    /// `reserve` allocates host blocks without changing the length; the range still reads
    /// as zeros, and a write into it keeps its data.
    #[test]
    fn reserve_allocates_blocks_and_keeps_the_length() {
        use std::os::unix::fs::MetadataExt;
        let p = scratch("reserve");
        let f = LocalFile::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        let before = std::fs::metadata(&p).unwrap().blocks();
        f.reserve(256 << 10, 512 << 10);
        let after = std::fs::metadata(&p).unwrap().blocks();
        if after == before {
            eprintln!("the temp folder's file system has no fallocate; nothing to test");
            return;
        }
        assert!(
            after - before >= (512 << 10) / 512,
            "{before} -> {after} sectors"
        );
        assert_eq!(f.len().unwrap(), 1 << 20);
        let mut back = vec![1u8; 4096];
        f.read_at(&mut back, 256 << 10).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        let d = bytes(7, 512 << 10);
        f.write_at(&d, 256 << 10).unwrap();
        let mut back = vec![0u8; d.len()];
        f.read_at(&mut back, 256 << 10).unwrap();
        assert_eq!(back, d);
        // Past the end too (a growing image file's next blocks): the length stays.
        f.reserve(1 << 20, 1 << 20);
        assert_eq!(f.len().unwrap(), 1 << 20);
    }

    /// With O_DIRECT and 4 KiB blocks, pieces of blocks (a 4-byte table entry, a 512-byte
    /// sector, a trailer that ends mid-block) keep the bytes around them, and the file ends
    /// where the last write ended, not at the block's end.
    #[test]
    fn partial_blocks_with_host_cache_off() {
        let p = scratch("partial");
        let f = LocalFile::create(&p).unwrap();
        let Some(al) = f.bypass_host_cache_aligned(4096).unwrap() else {
            eprintln!("the temp folder's file system has no O_DIRECT; nothing to test");
            return;
        };
        assert_eq!(al.offset, 4096);
        let mut shadow = vec![0u8; 3 * 4096 + 1000];
        let writes: [(u64, usize); 6] = [
            (0, 8192),
            (1000, 4),
            (4096 + 512, 512),
            (4000, 200),
            (3 * 4096, 1000),
            (100, 3 * 4096),
        ];
        for (i, &(off, len)) in writes.iter().enumerate() {
            let d = bytes(i as u8 + 1, len);
            // Unaligned memory too: a slice one byte into a vector.
            let mut v = vec![0u8; len + 1];
            v[1..].copy_from_slice(&d);
            f.write_at(&v[1..], off).unwrap();
            shadow[off as usize..][..len].copy_from_slice(&d);
            let end = shadow.len().min(
                writes[..=i]
                    .iter()
                    .map(|&(o, l)| o as usize + l)
                    .max()
                    .unwrap(),
            );
            assert_eq!(f.len().unwrap(), end as u64, "after write {i}");
        }
        assert_eq!(std::fs::read(&p).unwrap(), shadow);
        for (off, len) in [(0u64, 13usize), (4090, 20), (4096, 4096), (5000, 9000)] {
            let mut b = vec![0xffu8; len];
            f.read_at(&mut b, off).unwrap();
            let have = shadow.len().saturating_sub(off as usize).min(len);
            assert_eq!(
                &b[..have],
                &shadow[off as usize..][..have],
                "read {off}+{len}"
            );
            assert!(
                b[have..].iter().all(|&x| x == 0),
                "past the end reads zeros"
            );
        }
        let _ = std::fs::remove_file(&p);
    }

    /// Sectors of the same 4 KiB blocks written from several threads at once: each
    /// read-modify-write keeps the others' sectors.
    #[test]
    fn concurrent_sectors_in_one_block() {
        let p = scratch("concurrent");
        let f = Arc::new(LocalFile::create(&p).unwrap());
        if f.bypass_host_cache_aligned(4096).unwrap().is_none() {
            return;
        }
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let f = f.clone();
                std::thread::spawn(move || {
                    for round in 0..50u64 {
                        for s in 0..2u64 {
                            let sector = u64::from(t) * 2 + s;
                            let off = (round % 4) * 4096 + sector * 512;
                            f.write_at(&[t + 1; 512], off).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let back = std::fs::read(&p).unwrap();
        for (i, s) in back.chunks(512).enumerate() {
            let want = (i % 8 / 2) as u8 + 1;
            assert!(s.iter().all(|&b| b == want), "sector {i}");
        }
        let _ = std::fs::remove_file(&p);
    }
}
