//! What the guest finds at power-on: the memory map (e820), ACPI tables, SMBIOS, the firmware
//! images (SeaBIOS, OVMF) and what they read over fw_cfg, and direct Linux boot.
//!
//! This crate makes content only: the fw_cfg device that serves it lives in `devices`, and
//! the vmm maps the images and feeds the device.
#![forbid(unsafe_code)]

pub mod acpi;
pub mod boot_path;
pub mod fw_cfg;
pub mod image;
pub mod layout;
pub mod linux;
pub mod smbios;
pub mod table_loader;

pub use fw_cfg::{bios_config, BiosSpec, FwCfgKey};
pub use image::{FirmwareChoice, FirmwareFiles, FirmwareImage, FirmwareKind};
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
    #[error("the firmware table-loader script is invalid: {0}")]
    TableLoader(String),
    #[error("no {what} firmware found (looked for {looked}); install it with `apt-get install {package}` or pass --firmware PATH")]
    FirmwareMissing {
        what: &'static str,
        looked: String,
        package: &'static str,
    },
    #[error("cannot read the firmware image {path}: {source}")]
    OpenFirmware {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the firmware image {path} is {size} bytes; an image must be whole 4 KiB pages, between 64 KiB and 16 MiB")]
    FirmwareSize { path: PathBuf, size: u64 },
    #[error(
        "the firmware image {path} is corrupt or not a BIOS image (no jump at its reset vector)"
    )]
    NotBios { path: PathBuf },
}
