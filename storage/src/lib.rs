//! ferry-storage: disk images (raw, VDI, VMDK, VHD, Parallels, ISO), differencing chains and
//! probing. Every format reads and writes its host files through [`HostFile`], so crash-safety
//! tests can fail any write; nothing here knows about devices or KVM.
#![forbid(unsafe_code)]

pub mod disk;
pub mod error;
pub mod host_file;
pub mod iso;
pub mod layer;
pub mod medium;
pub mod parallels;
pub mod probe;
pub mod raw;
pub mod vdi;
pub mod vhd;
pub mod vmdk;

pub use disk::Disk;
pub use error::{Result, StorageError};
pub use host_file::{HostFile, LocalFile};
pub use layer::{
    Allocation, BlockTable, CreateOptions, CreateParent, FormatKind, ImageFormat, Layer,
    LowerLayers, NoLowerLayers, ParentRef, Variant,
};
pub use probe::{create_image, open_image, FORMATS};
pub use uuid::Uuid;
