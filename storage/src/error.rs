//! Errors of the storage layer: each names the file and says what is wrong with it.

use std::path::PathBuf;

use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file's content breaks its format's rules.
    #[error("{path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: {detail}")]
    Unsupported { path: PathBuf, detail: String },
    #[error("{path} is not a disk image ferry can read (tried {tried})")]
    UnknownFormat { path: PathBuf, tried: String },
    #[error("{path}: its parent disk {uuid} was not found (looked beside it, in the folder above and in the paths given)")]
    ParentNotFound { path: PathBuf, uuid: Uuid },
    #[error("{path}: its parent {parent} has UUID {found}, but the child expects {expected}")]
    ParentMismatch {
        path: PathBuf,
        parent: PathBuf,
        expected: Uuid,
        found: Uuid,
    },
    #[error("{path}: the chain of parent disks loops back to {again}")]
    ParentLoop { path: PathBuf, again: PathBuf },
    #[error("{path}: access at {offset:#x}+{len:#x} is past the end of the disk ({size} bytes)")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{path} is read-only")]
    ReadOnly { path: PathBuf },
    #[error("{0}")]
    Invalid(String),
    /// Another VM or program holds a conflicting host file lock on the image.
    #[error("{path} is in use by {} (it holds the image's \"{what}\" lock); stop that first, or attach the medium as shareable or readonly where that is safe", holder_words(.holder))]
    Locked {
        path: PathBuf,
        what: &'static str,
        /// "process 1234 (qemu-img)", or empty where it cannot be known.
        holder: String,
    },
    /// Two attached images carry one identity: usually a `cp` of an image.
    #[error("{first} and {second} have the same UUID {uuid}, so one is probably a copy of the other; give the copy its own UUID with `ferry medium set-uuid {}`, or make copies with `ferry medium clone`", .second.display())]
    DuplicateUuid {
        first: PathBuf,
        second: PathBuf,
        uuid: Uuid,
    },
}

fn holder_words(holder: &str) -> &str {
    if holder.is_empty() {
        "another VM or program"
    } else {
        holder
    }
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// Checks that `len` bytes at `offset` lie within a disk of `size` bytes.
pub fn check_range(path: &std::path::Path, offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(StorageError::OutOfRange {
            path: path.to_path_buf(),
            offset,
            len,
            size,
        }),
    }
}

impl StorageError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub fn corrupt(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.into(),
            detail: detail.into(),
        }
    }
}
