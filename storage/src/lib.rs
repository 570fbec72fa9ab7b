//! ferry-storage: disk images (raw, VDI, VMDK, VHD, Parallels, ISO), differencing chains and
//! probing, and the I/O engine that devices submit requests to. Every format reads and writes
//! its host files through [`HostFile`], so crash-safety tests can fail any write; nothing here
//! knows about devices or KVM.
// The format code needs no unsafe; only the I/O engine's system calls and buffers do, in
// the modules that allow it, each block with its reason.
#![deny(unsafe_code)]

pub mod attachment;
pub mod disk;
pub mod error;
pub mod host_file;
pub mod io;
pub mod iso;
pub mod layer;
pub mod lock;
pub mod medium;
pub mod parallels;
pub mod probe;
pub mod raw;
pub mod vdi;
pub mod vhd;
pub mod vmdk;

pub use attachment::{open_attachment, Attachment, AttachmentSet, MediumType, Placement};
pub use disk::Disk;
pub use error::{Result, StorageError};
pub use host_file::{HostFile, LocalFile};
pub use layer::{
    Allocation, BlockTable, CreateOptions, CreateParent, FormatKind, ImageFormat, Layer,
    LowerLayers, NoLowerLayers, ParentRef, Variant,
};
pub use probe::{create_image, open_image, FORMATS};
pub use uuid::Uuid;
