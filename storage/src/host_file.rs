//! The host files under an image, behind a small trait so tests can inject failures.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

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
}

impl LocalFile {
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Creates a new file; an existing one is an error, never overwritten.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }
}

impl HostFile for LocalFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn read_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.file.read_at(buf, offset) {
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

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        if !durable() {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(io::Error::from)
    }
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
}
