//! One request made ready for the host: the system call (or image-layer call) to make and
//! the buffers it uses.

use std::os::fd::RawFd;
use std::sync::Arc;

use super::iovec::{preadv_all, pwritev_all, Iovecs};
use super::request::IoError;
use crate::Disk;

pub(crate) enum Work {
    /// Raw image file: straight into guest memory, or a bounce buffer.
    Readv {
        fd: RawFd,
        offset: u64,
        iov: Iovecs,
    },
    Writev {
        fd: RawFd,
        offset: u64,
        iov: Iovecs,
    },
    /// fdatasync.
    Sync {
        fd: RawFd,
    },
    /// Frees the range (it reads as zeros afterwards).
    Punch {
        fd: RawFd,
        offset: u64,
        len: u64,
    },
    /// Dynamic formats and chains: through the image layer, which knows the block map.
    DiskRead {
        disk: Arc<Disk>,
        offset: u64,
        buf: Vec<u8>,
    },
    DiskWrite {
        disk: Arc<Disk>,
        offset: u64,
        buf: Vec<u8>,
    },
    DiskFlush {
        disk: Arc<Disk>,
    },
    DiskDiscard {
        disk: Arc<Disk>,
        offset: u64,
        len: u64,
    },
}

impl Work {
    /// Whether io_uring can carry it (the image layer's calls need a thread).
    pub(crate) fn is_file_op(&self) -> bool {
        matches!(
            self,
            Self::Readv { .. } | Self::Writev { .. } | Self::Sync { .. } | Self::Punch { .. }
        )
    }

    /// Performs it on the calling thread (a pool worker): the bytes moved.
    pub(crate) fn run(&mut self) -> Result<u64, IoError> {
        let host = |r: std::io::Result<usize>| r.map(|n| n as u64).map_err(IoError::Host);
        let image = |r: crate::Result<()>| r.map_err(IoError::Image);
        match self {
            Self::Readv { fd, offset, iov } => host(preadv_all(*fd, iov, *offset)),
            Self::Writev { fd, offset, iov } => host(pwritev_all(*fd, iov, *offset)),
            Self::Sync { fd } => {
                // SAFETY: fd is an open file owned by the engine, which outlives its workers.
                let r = unsafe { libc::fdatasync(*fd) };
                host(if r == 0 {
                    Ok(0)
                } else {
                    Err(std::io::Error::last_os_error())
                })
            }
            Self::Punch { fd, offset, len } => {
                let (Ok(off), Ok(l)) = (i64::try_from(*offset), i64::try_from(*len)) else {
                    return Err(IoError::Host(std::io::Error::from_raw_os_error(
                        libc::EOVERFLOW,
                    )));
                };
                // SAFETY: as above; fallocate only reads its integer arguments.
                let r = unsafe {
                    libc::fallocate(
                        *fd,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off,
                        l,
                    )
                };
                host(if r == 0 {
                    Ok(*len as usize)
                } else {
                    Err(std::io::Error::last_os_error())
                })
            }
            Self::DiskRead { disk, offset, buf } => {
                image(disk.read_at(buf, *offset)).map(|_| buf.len() as u64)
            }
            Self::DiskWrite { disk, offset, buf } => {
                image(disk.write_at(buf, *offset)).map(|_| buf.len() as u64)
            }
            Self::DiskFlush { disk } => image(disk.flush()).map(|_| 0),
            Self::DiskDiscard { disk, offset, len } => {
                image(disk.discard(*offset, *len)).map(|_| *len)
            }
        }
    }
}
