//! A raw image's file, opened by the engine itself for the fast path: buffered, and with
//! O_DIRECT when the host cache is off.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::engine::EngineError;

/// A raw image's file, opened by the engine itself for the fast path.
pub(crate) struct RawFiles {
    pub(crate) buffered: File,
    /// O_DIRECT (host cache off), where the file system supports it.
    pub(crate) direct: Option<File>,
    /// O_DIRECT's alignment of memory, and of file offsets and lengths.
    pub(crate) mem_align: usize,
    pub(crate) off_align: u64,
}

pub(crate) fn open_raw(
    path: &Path,
    writable: bool,
    host_cache: bool,
) -> Result<RawFiles, EngineError> {
    let open = |flags: i32| {
        OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(flags)
            .open(path)
            .map_err(|source| EngineError::Open {
                path: path.into(),
                source,
            })
    };
    let buffered = open(0)?;
    let mut direct = None;
    if !host_cache {
        match open(libc::O_DIRECT) {
            Ok(f) => direct = Some(f),
            Err(EngineError::Open { source, .. })
                if source.raw_os_error() == Some(libc::EINVAL) =>
            {
                tracing::warn!(
                    "{}: the host file system does not support O_DIRECT; hostiocache=off uses the page cache",
                    path.display()
                );
            }
            Err(e) => return Err(e),
        }
    }
    // Without STATX_DIOALIGN (Linux < 6.1) assume 4 KiB, which every block device accepts.
    let (mut mem_align, mut off_align) = (4096usize, 4096u64);
    if let Some(f) = &direct {
        use rustix::fs::{statx, AtFlags, StatxFlags};
        if let Ok(st) = statx(f.as_fd(), "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
            if st.stx_mask & StatxFlags::DIOALIGN.bits() != 0
                && st.stx_dio_mem_align > 0
                && st.stx_dio_offset_align > 0
            {
                mem_align = st.stx_dio_mem_align as usize;
                off_align = u64::from(st.stx_dio_offset_align);
            }
        }
    }
    Ok(RawFiles {
        buffered,
        direct,
        mem_align,
        off_align,
    })
}
