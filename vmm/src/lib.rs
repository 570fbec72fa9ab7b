//! ferry-vmm: hypervisor backends, machine assembly, vCPU threads and the event loop.

pub mod console;
pub mod cpuid;
pub mod exit;
pub mod firmware;
pub mod host;
pub mod hypervisor;
pub mod machine;
mod msr;
mod ram;
pub mod storage;
mod vcpu;

pub use console::SerialMode;
pub use exit::Outcome;
pub use ferry_firmware::image::FirmwareChoice;
pub use ferry_firmware::LinuxBootSpec;
pub use machine::{run, BootDevice, BootSpec, FirmwareBoot, VmConfig};
pub use storage::{ControllerConfig, ControllerKind, UnitConfig};

use hypervisor::HypervisorError;

/// Errors that stop ferry before or while it runs a guest.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Firmware(#[from] ferry_firmware::FirmwareError),
    #[error("{0}")]
    Config(String),
    #[error("cannot allocate {size} MiB of guest memory: {detail}")]
    GuestMemory { size: u64, detail: String },
    #[error("serial console: {0}")]
    Console(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error("device setup: {0}")]
    Device(String),
}
