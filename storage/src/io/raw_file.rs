//! A raw image's file, opened by the engine itself for the fast path: buffered, and with
//! O_DIRECT when the host cache is off.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::engine::EngineError;
use crate::host_file::DirectAlign;

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
    let al = direct.as_ref().map_or(
        DirectAlign {
            mem: 4096,
            offset: 4096,
        },
        |f| DirectAlign::of(f.as_fd()),
    );
    Ok(RawFiles {
        buffered,
        direct,
        mem_align: al.mem,
        off_align: al.offset,
    })
}
