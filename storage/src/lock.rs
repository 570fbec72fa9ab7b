//! Host file locks on image files, so two VMs (or ferry and QEMU) never write one image at once.
//!
//! ferry speaks QEMU's protocol (block/file-posix.c): open-file-description (OFD) fcntl locks
//! on single bytes. Holding permission bit `i` is a shared lock on byte `100 + i`; refusing
//! to share bit `i` with others is a shared lock on byte `200 + i`. Before using a permission
//! a process checks that nobody holds `200 + i`, and before refusing to share one that nobody
//! holds `100 + i`. Every lock taken is a read lock, so takers never block each other; the
//! conflict shows only in the check. Because both tools use the same bytes, a QEMU running an
//! image and a ferry running it refuse each other.
//!
//! OFD locks belong to the open file, not the process: closing some other descriptor of the
//! same file (probing reopens images) does not drop them, as it would classic POSIX locks.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Result, StorageError};

/// QEMU's permission bits, in bit order (BLK_PERM_*).
const CONSISTENT_READ: u8 = 1 << 0;
const WRITE: u8 = 1 << 1;
const WRITE_UNCHANGED: u8 = 1 << 2;
const RESIZE: u8 = 1 << 3;
const ALL: u8 = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
/// QEMU's RAW_LOCK_PERM_BASE and RAW_LOCK_SHARED_BASE.
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// How a VM uses one image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Writes it; nobody else may write or resize it (a normal medium's top layer).
    Exclusive,
    /// Reads it; nobody may write or resize it meanwhile (a base layer, a read-only medium).
    Shared,
    /// Writes it together with others who do the same (a shareable medium).
    SharedWrite,
}

impl LockMode {
    /// (permissions held, permissions shared with others).
    fn perms(self) -> (u8, u8) {
        match self {
            // What a QEMU VM takes for a writable disk.
            Self::Exclusive => (
                CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE,
                CONSISTENT_READ | WRITE_UNCHANGED,
            ),
            Self::Shared => (CONSISTENT_READ, CONSISTENT_READ | WRITE_UNCHANGED),
            // QEMU's share-rw=on.
            Self::SharedWrite => (CONSISTENT_READ | WRITE | WRITE_UNCHANGED, ALL),
        }
    }
}

/// A lock held on one file; dropping it releases the lock.
#[derive(Debug)]
pub struct ImageLock {
    // The locks live on this open file description and end when it closes.
    _file: File,
    path: PathBuf,
    mode: LockMode,
}

impl ImageLock {
    /// Takes the lock `mode` needs on `path`, or says who holds a conflicting one.
    pub fn acquire(path: &Path, mode: LockMode) -> Result<Self> {
        let file = File::open(path).map_err(|e| StorageError::io(path, e))?;
        let (perm, shared) = mode.perms();
        let io = |e: std::io::Error| StorageError::io(path, e);
        for bit in 0..4u8 {
            if perm & (1 << bit) != 0 {
                sys::lock_byte(&file, PERM_BASE + i64::from(bit)).map_err(io)?;
            }
            if shared & (1 << bit) == 0 {
                sys::lock_byte(&file, SHARED_BASE + i64::from(bit)).map_err(io)?;
            }
        }
        // Check after taking: two takers racing both see each other and both back off, rather
        // than both going ahead.
        for bit in 0..4u8 {
            let held_by_other = |byte| sys::held_by_other(&file, byte).map_err(io);
            let b = i64::from(bit);
            // Using a permission someone refuses to share, or refusing one someone uses.
            let conflict = (perm & (1 << bit) != 0 && held_by_other(SHARED_BASE + b)?)
                || (shared & (1 << bit) == 0 && held_by_other(PERM_BASE + b)?);
            if conflict {
                let holder = holders(path);
                return Err(StorageError::Locked {
                    path: path.to_path_buf(),
                    what: PERM_NAMES[bit as usize],
                    holder,
                });
            }
        }
        tracing::debug!("{}: locked ({mode:?})", path.display());
        Ok(Self {
            _file: file,
            path: path.to_path_buf(),
            mode,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn mode(&self) -> LockMode {
        self.mode
    }
}

/// Which other processes have `path` open, in words ("process 1234 (qemu-io)"); empty where
/// that cannot be known. /proc/locks shows no owner for OFD locks (pid -1), so this looks
/// for the file among the open files of the processes this user may inspect.
fn holders(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(want) = std::fs::metadata(path) else {
        return String::new();
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return String::new();
    };
    let me = std::process::id();
    let mut named = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let has_it = fds.flatten().any(|fd| {
            std::fs::metadata(fd.path())
                .map(|m| m.dev() == want.dev() && m.ino() == want.ino())
                .unwrap_or(false)
        });
        if has_it {
            named.push(match std::fs::read_to_string(p.path().join("comm")) {
                Ok(c) => format!("process {pid} ({})", c.trim()),
                Err(_) => format!("process {pid}"),
            });
        }
    }
    named.join(", ")
}

#[cfg(target_os = "linux")]
mod sys {
    use nix::fcntl::{fcntl, FcntlArg};
    use std::fs::File;

    fn flock(kind: libc::c_short, byte: i64) -> libc::flock {
        libc::flock {
            l_type: kind,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: byte,
            l_len: 1,
            l_pid: 0,
        }
    }

    /// A shared lock on one byte (never blocks: nobody takes exclusive ones).
    pub fn lock_byte(file: &File, byte: i64) -> std::io::Result<()> {
        let fl = flock(libc::F_RDLCK as libc::c_short, byte);
        fcntl(file, FcntlArg::F_OFD_SETLK(&fl)).map_err(std::io::Error::from)?;
        Ok(())
    }

    /// Whether another open file holds a lock on the byte (one that an exclusive lock would
    /// collide with).
    pub fn held_by_other(file: &File, byte: i64) -> std::io::Result<bool> {
        let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
        fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl)).map_err(std::io::Error::from)?;
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    // macOS has no OFD locks; image locking there is not implemented yet.
    use std::fs::File;

    pub fn lock_byte(_file: &File, _byte: i64) -> std::io::Result<()> {
        Ok(())
    }

    pub fn held_by_other(_file: &File, _byte: i64) -> std::io::Result<bool> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-lock-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("img");
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        f
    }

    #[test]
    fn writers_exclude_each_other_and_readers() {
        let f = scratch("excl");
        let a = ImageLock::acquire(&f, LockMode::Exclusive).unwrap();
        let e = ImageLock::acquire(&f, LockMode::Exclusive).unwrap_err();
        assert!(matches!(e, StorageError::Locked { .. }), "{e}");
        assert!(ImageLock::acquire(&f, LockMode::Shared).is_err());
        assert!(ImageLock::acquire(&f, LockMode::SharedWrite).is_err());
        drop(a);
        let _b = ImageLock::acquire(&f, LockMode::Exclusive).unwrap();
    }

    #[test]
    fn readers_share_and_keep_writers_out() {
        let f = scratch("shared");
        let _a = ImageLock::acquire(&f, LockMode::Shared).unwrap();
        let _b = ImageLock::acquire(&f, LockMode::Shared).unwrap();
        assert!(ImageLock::acquire(&f, LockMode::Exclusive).is_err());
        assert!(ImageLock::acquire(&f, LockMode::SharedWrite).is_err());
    }

    #[test]
    fn shareable_writers_share() {
        let f = scratch("sharew");
        let _a = ImageLock::acquire(&f, LockMode::SharedWrite).unwrap();
        let _b = ImageLock::acquire(&f, LockMode::SharedWrite).unwrap();
        assert!(ImageLock::acquire(&f, LockMode::Exclusive).is_err());
        assert!(ImageLock::acquire(&f, LockMode::Shared).is_err());
    }

    #[test]
    fn lock_survives_other_descriptors_closing() {
        let f = scratch("ofd");
        let _a = ImageLock::acquire(&f, LockMode::Exclusive).unwrap();
        // A classic POSIX lock would be dropped here.
        drop(File::open(&f).unwrap());
        assert!(ImageLock::acquire(&f, LockMode::Exclusive).is_err());
    }
}
