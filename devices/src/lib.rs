//! Device models of the ferry machine: buses, the legacy PC chipset, PCI and (later) the
//! storage controllers. Nothing here touches the hypervisor: devices see guest memory and
//! interrupt lines only through small handles, so every model is testable with plain memory.
#![forbid(unsafe_code)]

pub mod acpi_pm;
pub mod ahci;
pub mod ata;
pub mod bus;
pub mod cmos;
pub mod debug_port;
pub mod fw_cfg;
pub mod i8042;
pub mod interrupt;
pub mod lifecycle;
pub mod pci;
pub mod pflash;
pub mod pvpanic;
pub mod scsi;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use interrupt::{EdgeInterrupt, LevelInterrupt, MsiSender};
pub use lifecycle::{ExitHandle, ExitRequest};
