//! virtio 1.x: the modern PCI transport and the devices on it. The transport owns feature
//! negotiation, the queues (virtio-queue) and interrupts; a device only handles its queues.

mod pci;
pub mod scsi;
#[cfg(test)]
pub(crate) mod testing;

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use pci::{VirtioPci, VirtioPciParams};
pub use virtio_queue::{Queue, QueueT};

/// Feature bits every device on this transport offers.
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const F_RING_EVENT_IDX: u64 = 1 << 29;

/// The device-specific half of a virtio device.
pub trait VirtioDevice: Send {
    /// The virtio device ID (8 = SCSI host).
    fn device_type(&self) -> u16;
    /// Device-specific feature bits (the transport adds its own).
    fn device_features(&self) -> u64;
    /// The largest size of each queue; their count is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads the device configuration structure.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration structure (most fields are read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// The driver set DRIVER_OK with these negotiated features.
    fn activate(&mut self, features: u64) {
        let _ = features;
    }
    /// The driver reset the device: forget requests in flight and negotiated state.
    fn reset(&mut self);
    /// The concrete device, for the machine to reach its own controls (media change, ...).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
    /// Queue `index` has new buffers. Returns the queues that got used buffers, so the
    /// transport can interrupt the driver for them.
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Vec<usize>;
    /// Event sources besides the doorbells (I/O completions), for the vmm to poll.
    fn event_sources(&self) -> Vec<Arc<EventFd>> {
        Vec::new()
    }
    /// Event source `index` fired. Returns the queues that got used buffers.
    fn process_event(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Vec<usize> {
        let _ = (index, queues, mem);
        Vec::new()
    }
}
