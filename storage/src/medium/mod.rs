//! Operations on whole media, behind `ferry medium`: clone (any format to any other, the chain
//! flattened), compact and resize (both rebuild the image beside itself and rename it into
//! place), merge (a child into its parent), check (each format's block table, then every
//! block read), and set-uuid. One copy engine ([`copy`]) moves the data for all of them.

pub mod check;
pub mod clone;
pub mod copy;
#[allow(unsafe_code)]
pub mod mapped;
pub mod merge;
pub mod rebuild;
pub mod staging;

pub use check::{check, CheckReport, Finding};
pub use clone::{clone, CloneOptions};
pub use copy::{CopyStats, Progress, Silent};
pub use merge::merge;
pub use rebuild::{compact, resize, set_uuid, RebuildReport};

use std::path::{Path, PathBuf};

use crate::error::{Result, StorageError};

/// Bytes the files take on the host (allocated blocks, not their apparent length).
pub fn host_bytes(files: &[PathBuf]) -> u64 {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Refuses a path that does not exist, with one sentence.
pub(crate) fn must_exist(path: &Path) -> Result<()> {
    if path.exists() {
        Ok(())
    } else {
        Err(StorageError::io(
            path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ))
    }
}
