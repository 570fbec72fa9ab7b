//! A source image file mapped read-only, so that a copy reads the host's page cache in place
//! instead of copying every byte into a buffer first (zero detection and the target's write
//! read the mapping directly: one copy per byte instead of two).
//!
//! A mapping turns a file cut shorter while mapped into SIGBUS on access. So a file is only
//! mapped while this process holds QEMU's shared lock on it (`LockMode::Shared`: nobody that
//! honours the lock may write or resize it), and only up to the length it had then.

use std::fs::File;
use std::path::Path;
use std::ptr::NonNull;

use crate::error::{Result, StorageError};
use crate::lock::{ImageLock, LockMode};

pub struct MappedFile {
    ptr: NonNull<u8>,
    len: usize,
    // Kept for as long as the mapping: the lock is what makes reading it safe.
    _lock: ImageLock,
}

// SAFETY: the mapping is read-only and owned by this value; shared reads from any thread are
// plain loads from memory that nobody in this process writes.
unsafe impl Send for MappedFile {}
// SAFETY: as above; `bytes` hands out shared references only.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps `path` whole, or says why not (the caller then reads it with system calls): an
    /// empty file, a conflicting lock (a VM writes it), or no mapping for this file.
    pub fn open(path: &Path) -> Result<Self> {
        use rustix::mm::{madvise, mmap, Advice, MapFlags, ProtFlags};
        let io = |e: std::io::Error| StorageError::io(path, e);
        let lock = ImageLock::acquire(path, LockMode::Shared)?;
        let file = File::open(path).map_err(io)?;
        let len = usize::try_from(file.metadata().map_err(io)?.len())
            .map_err(|_| io(std::io::Error::from_raw_os_error(libc::EFBIG)))?;
        if len == 0 {
            return Err(io(std::io::Error::from_raw_os_error(libc::EINVAL)));
        }
        // SAFETY: a new shared read-only mapping of `len` bytes of an open file, at an address
        // the kernel chooses; nothing else in this process maps or unmaps that range. The file
        // descriptor may close afterwards: the mapping keeps the file.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                &file,
                0,
            )
        }
        .map_err(|e| io(e.into()))?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io(std::io::Error::from_raw_os_error(libc::ENOMEM)))?;
        // SAFETY: the range is the mapping just made; the advice only steers read-ahead.
        let _ = unsafe { madvise(ptr.as_ptr().cast(), len, Advice::Sequential) };
        Ok(Self {
            ptr,
            len,
            _lock: lock,
        })
    }

    /// The file's bytes, as long as it was when mapped.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes until `self` drops, and the shared lock keeps
        // every process that honours it from cutting the file shorter meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `open` made; no reference from `bytes` outlives
        // `self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_a_file_and_refuses_a_written_one() {
        let dir = std::env::temp_dir().join(format!("ferry-mapped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("src.raw");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let m = MappedFile::open(&p).unwrap();
        assert_eq!(m.bytes(), &data[..]);
        drop(m);
        // A VM writing the file holds the exclusive lock: no mapping then.
        let vm = ImageLock::acquire(&p, LockMode::Exclusive).unwrap();
        assert!(MappedFile::open(&p).is_err());
        drop(vm);
        let empty = dir.join("empty.raw");
        std::fs::write(&empty, b"").unwrap();
        assert!(MappedFile::open(&empty).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
