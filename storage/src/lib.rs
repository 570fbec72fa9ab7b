//! ferry-storage: the image layer (VDI, VMDK, VHD, Parallels, raw), chains, media and the
//! I/O engine. The formats arrive with their own issue; this crate holds the shared error type
//! so the seam between devices and storage exists from the start.
#![forbid(unsafe_code)]

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}
