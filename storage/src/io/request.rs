//! What a device asks of the I/O engine and what it gets back.

use std::io;

use vm_memory::GuestAddress;

/// The unit of every offset and length a device submits: the engine never performs a partial
/// sector, so a request that is not whole sectors is a device bug or a hostile guest.
pub const SECTOR: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Disk to guest memory.
    Read,
    /// Guest memory to disk.
    Write,
    /// Makes every write completed before it durable on the host.
    Flush,
    /// Drops a range (only where the attachment has `discard=on`).
    Discard,
}

/// One request: `sg` is the guest's scatter-gather list (guest physical address, length); a
/// flush and a discard have none. `user_data` comes back unchanged in the completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: IoOp,
    /// Byte offset on the virtual disk (read, write, discard).
    pub offset: u64,
    /// Bytes to transfer or discard; for reads and writes the sum of `sg`.
    pub len: u64,
    pub sg: Vec<(GuestAddress, usize)>,
    pub user_data: u64,
}

impl Request {
    pub fn read(offset: u64, sg: Vec<(GuestAddress, usize)>, user_data: u64) -> Self {
        Self::transfer(IoOp::Read, offset, sg, user_data)
    }

    pub fn write(offset: u64, sg: Vec<(GuestAddress, usize)>, user_data: u64) -> Self {
        Self::transfer(IoOp::Write, offset, sg, user_data)
    }

    pub fn flush(user_data: u64) -> Self {
        Self {
            op: IoOp::Flush,
            offset: 0,
            len: 0,
            sg: Vec::new(),
            user_data,
        }
    }

    pub fn discard(offset: u64, len: u64, user_data: u64) -> Self {
        Self {
            op: IoOp::Discard,
            offset,
            len,
            sg: Vec::new(),
            user_data,
        }
    }

    fn transfer(op: IoOp, offset: u64, sg: Vec<(GuestAddress, usize)>, user_data: u64) -> Self {
        let len = sg
            .iter()
            .fold(0u64, |a, &(_, l)| a.saturating_add(l as u64));
        Self {
            op,
            offset,
            len,
            sg,
            user_data,
        }
    }
}

/// A finished request: the bytes moved (discarded, for a discard; 0 for a flush) or why not.
#[derive(Debug)]
pub struct Completion {
    pub user_data: u64,
    pub result: Result<u64, IoError>,
}

/// Why a request failed. The first group is the device's (or guest's) fault and is found
/// before anything is performed; `Host` is the host's.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("access at {offset:#x}+{len:#x} is past the end of the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("a {op:?} request of zero bytes")]
    ZeroLength { op: IoOp },
    #[error("{op:?} at {offset:#x}+{len:#x} is not in whole {SECTOR}-byte sectors")]
    Misaligned { op: IoOp, offset: u64, len: u64 },
    #[error(
        "the request's length {len:#x} is not the sum of its scatter-gather list ({sg_len:#x})"
    )]
    LengthMismatch { len: u64, sg_len: u64 },
    #[error("a transfer of {len:#x} bytes is more than the engine takes at once ({max:#x})")]
    TooLarge { len: u64, max: u64 },
    #[error("scatter-gather entry {addr:#x}+{len:#x} is outside guest memory")]
    BadGuestMemory { addr: u64, len: usize },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("discard is not enabled for this attachment (discard=on)")]
    DiscardDisabled,
    #[error("host I/O error: {0}")]
    Host(#[source] io::Error),
    /// Taken back before it reached the host ([`IoEngine::cancel_waiting`]).
    #[error("cancelled before it started")]
    Cancelled,
    /// The image layer failed (dynamic formats, chains).
    #[error("{0}")]
    Image(#[source] crate::StorageError),
}

impl IoError {
    /// Whether the host file system is full (the guest sees a write error; the user must free
    /// space on the host).
    pub fn is_no_space(&self) -> bool {
        let raw = match self {
            Self::Host(e) => e.raw_os_error(),
            Self::Image(crate::StorageError::Io { source, .. }) => source.raw_os_error(),
            _ => None,
        };
        matches!(raw, Some(libc::ENOSPC) | Some(libc::EDQUOT))
    }
}
