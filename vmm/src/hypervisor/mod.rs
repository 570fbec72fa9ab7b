//! The hypervisor seam: `Hypervisor -> Vm -> Vcpu`, with `Vcpu::run() -> VcpuExit`. Nothing
//! here names KVM; the KVM backend lives in `kvm.rs` and an HVF backend can slot in beside it.

pub mod kvm;

use std::sync::Arc;

use ferry_devices::pci::FastPathHook;
use ferry_devices::{EdgeInterrupt, LevelInterrupt, MsiSender};
use ferry_firmware::BootCpuState;
use vm_memory::GuestMemoryMmap;

use crate::cpuid::CpuidEntry;

/// Why a vCPU stopped running guest code.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// A port read; `data` holds `data.len() / size` accesses of `size` bytes each (string
    /// I/O repeats the access).
    IoIn {
        port: u16,
        size: usize,
        data: &'a mut [u8],
    },
    IoOut {
        port: u16,
        size: usize,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    /// The vCPU halted and the hypervisor does not wait for interrupts itself.
    Halt,
    /// Triple fault: a PC resets.
    Shutdown,
    /// A signal interrupted the run (ferry kicks vCPUs this way to stop them).
    Interrupted,
    /// The hypervisor could not run or emulate the guest; the string says why.
    Failed(String),
    /// An exit this machine does not use; ignored.
    Ignored,
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("/dev/kvm does not exist: this host has no KVM (load the kvm-intel or kvm-amd module, and enable virtualization in the firmware setup)")]
    NoKvm,
    #[error("no permission to open /dev/kvm: run ferry as a member of the kvm group (sudo usermod -aG kvm $USER, then log in again)")]
    KvmPermission,
    #[error("cannot use /dev/kvm: {0}")]
    KvmOpen(String),
    #[error("the host's KVM lacks a capability ferry needs: {0}")]
    MissingCapability(&'static str),
    #[error("KVM refused to {what}: {detail}")]
    Call { what: &'static str, detail: String },
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// Opens this host's hypervisor: KVM on Linux (Hypervisor.framework on macOS comes later).
pub fn open() -> Result<Box<dyn Hypervisor>> {
    Ok(Box::new(kvm::KvmHypervisor::new()?))
}

/// One hypervisor on this host.
pub trait Hypervisor {
    /// The most vCPUs one VM may have.
    fn max_vcpus(&self) -> usize;
    /// CPUID leaves the hypervisor can present, before per-vCPU topology is filled in.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
    fn create_vm(&self) -> Result<Arc<dyn Vm>>;
}

/// A virtual machine: memory, interrupt controllers and vCPUs.
pub trait Vm: Send + Sync {
    /// Maps all of `mem` into the guest. The VM keeps the mappings alive as long as it lives.
    fn map_memory(&self, mem: &GuestMemoryMmap) -> Result<()>;
    /// Maps a copy of `bytes` read-only at `gpa` (firmware); guest writes there are dropped.
    fn map_rom(&self, gpa: u64, bytes: &[u8]) -> Result<()>;
    /// Maps a copy of `bytes` read-only at `gpa` for a flash device: reads hit memory while
    /// it is mapped, writes always exit as MMIO, and the device can take the mapping away
    /// (then reads exit too) and change its contents.
    fn map_flash(self: Arc<Self>, gpa: u64, bytes: &[u8]) -> Result<Arc<dyn FlashMapping>>;
    /// Creates the PC interrupt controllers (PIC, IOAPIC, a LAPIC per vCPU) and the PIT.
    fn create_pc_irqchip(&self) -> Result<()>;
    /// An edge-triggered line into the interrupt controllers at `gsi`.
    fn edge_interrupt(&self, gsi: u32) -> Result<Arc<dyn EdgeInterrupt>>;
    /// A level-triggered line at `gsi` (PCI INTx through the IOAPIC).
    fn level_interrupt(self: Arc<Self>, gsi: u32) -> Arc<dyn LevelInterrupt>;
    /// Delivers message-signalled interrupts (MSI, MSI-X) to the local APICs.
    fn msi_sender(self: Arc<Self>) -> Arc<dyn MsiSender>;
    /// Lets device doorbells be signalled, and register mirrors be read, without a VM exit.
    fn fast_path_hook(self: Arc<Self>) -> Arc<dyn FastPathHook>;
    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>>;
}

/// The memory side of a flash device (see [`Vm::map_flash`]).
pub trait FlashMapping: Send + Sync {
    /// Shows the contents to guest reads (true) or sends reads to the device (false).
    fn set_mapped(&self, mapped: bool);
    /// Replaces `data.len()` bytes of the contents at `offset`.
    fn update(&self, offset: u64, data: &[u8]);
}

/// One virtual CPU. Owned by its thread.
pub trait Vcpu: Send {
    /// Sets CPUID, the MSRs Linux needs, the FPU and the local APIC's LINT pins.
    fn configure(&mut self, cpuid: &[CpuidEntry], msrs: &[(u32, u64)]) -> Result<()>;
    /// Puts the vCPU at a 64-bit entry point (direct kernel boot).
    fn set_boot_state(&mut self, state: &BootCpuState) -> Result<()>;
    fn run(&mut self) -> Result<VcpuExit<'_>>;
}
