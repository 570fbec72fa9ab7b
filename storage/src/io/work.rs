//! One request made ready for the host: the system call (or image-layer call) to make and
//! the buffers it uses.

use std::os::fd::RawFd;
use std::sync::Arc;

use super::iovec::{preadv_all, pwritev_all, AlignedBuf, Iovecs};
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
    /// The buffers are aligned, so a layer file with O_DIRECT takes block-aligned pieces of
    /// them without another copy.
    DiskRead {
        disk: Arc<Disk>,
        offset: u64,
        buf: AlignedBuf,
    },
    DiskWrite {
        disk: Arc<Disk>,
        offset: u64,
        buf: AlignedBuf,
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
                image(disk.read_at(buf.as_mut_slice(), *offset)).map(|_| buf.len() as u64)
            }
            Self::DiskWrite { disk, offset, buf } => {
                image(disk.write_at(buf.as_slice(), *offset)).map(|_| buf.len() as u64)
            }
            Self::DiskFlush { disk } => image(disk.flush()).map(|_| 0),
            Self::DiskDiscard { disk, offset, len } => {
                discard_image(disk, *offset, *len).map(|_| *len)
            }
        }
    }
}

/// Frees what the format can and zeroes the rest, so a discarded range never shows older
/// data: partial blocks, formats that cannot free (VMDK, Parallels) and, in a differencing
/// chain, ranges whose freeing would bring the parent's older data back.
fn discard_image(disk: &Disk, offset: u64, len: u64) -> Result<(), IoError> {
    const ZERO_CHUNK: u64 = 1 << 20;
    if disk.layers().len() == 1 {
        disk.discard(offset, len).map_err(IoError::Image)?;
    }
    let end = offset + len;
    let mut zeros = Vec::new();
    let mut pos = offset;
    while pos < end {
        let (data, run) = reads_data(disk, 0, pos, end - pos)?;
        let run = run.clamp(1, end - pos);
        if data {
            let mut at = pos;
            while at < pos + run {
                let n = ZERO_CHUNK.min(pos + run - at);
                zeros.resize(n as usize, 0u8);
                disk.write_at(&zeros, at).map_err(IoError::Image)?;
                at += n;
            }
        }
        pos += run;
    }
    Ok(())
}

/// Whether the run at `offset` reads as stored data (not zeros) through the chain from
/// `level` down, and how long the run is.
fn reads_data(disk: &Disk, level: usize, offset: u64, len: u64) -> Result<(bool, u64), IoError> {
    let Some(layer) = disk.layers().get(level) else {
        return Ok((false, len));
    };
    let avail = layer.virtual_size().saturating_sub(offset).min(len);
    if avail == 0 {
        return Ok((false, len));
    }
    let (state, run) = layer.block_status(offset, avail).map_err(IoError::Image)?;
    let run = run.clamp(1, avail);
    match state {
        crate::layer::Allocation::Data => Ok((true, run)),
        crate::layer::Allocation::Zero => Ok((false, run)),
        crate::layer::Allocation::Unallocated => reads_data(disk, level + 1, offset, run),
    }
}

/// Starts writing `file`'s dirty pages back to the disk without waiting for them and without
/// a journal commit or cache flush (sync_file_range WRITE): a long copy overlaps its disk
/// writes with its work, and the final fdatasync finds little left.
pub(crate) fn start_writeback(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the call's duration; the call reads only its
    // integer arguments.
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
