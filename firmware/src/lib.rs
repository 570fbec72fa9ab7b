//! What the guest finds at power-on: the memory map (e820), ACPI tables and direct Linux boot.
//! Firmware images (SeaBIOS, OVMF), fw_cfg and SMBIOS come with their own issue.
#![forbid(unsafe_code)]

pub mod acpi;
pub mod layout;
pub mod linux;

pub use layout::MemoryMap;
pub use linux::{load_linux, BootCpuState, LinuxBootSpec};

use std::path::PathBuf;

/// Errors while preparing what the guest boots.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("cannot open the kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the initrd {path}: {source}")]
    OpenInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Linux bzImage (no valid boot header); pass the kernel's vmlinuz/bzImage file")]
    NotBzImage { path: PathBuf },
    #[error("{path} is a bzImage without a 64-bit entry point; ferry boots x86-64 kernels")]
    NotX86_64 { path: PathBuf },
    #[error("the kernel {path} does not fit in guest memory: {detail}")]
    KernelTooBig { path: PathBuf, detail: String },
    #[error("the initrd {path} ({size} bytes) does not fit in the guest's low memory; give the guest more --memory")]
    InitrdTooBig { path: PathBuf, size: u64 },
    #[error("the kernel command line is too long ({len} bytes; this kernel takes at most {max})")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the kernel command line contains a NUL byte")]
    CmdlineInvalid,
    #[error("writing {what} into guest memory failed: {detail}")]
    GuestMemory { what: &'static str, detail: String },
    #[error("{0}")]
    Layout(String),
}
