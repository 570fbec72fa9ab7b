//! A register mirror: host memory that the hypervisor maps read-only over a whole memory
//! BAR, so that guest reads of the registers there are served from memory without a VM exit
//! (writes still exit to the device). It suits registers whose reads have no side effects,
//! such as AHCI's, where a driver's interrupt handler reads three of them per interrupt.
//!
//! The device stores every register's current value into the mirror before anything that
//! lets the guest look (returning from a register write, raising an interrupt), under the
//! same lock that serialises its register accesses.

use std::sync::atomic::Ordering;

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, VolatileMemory};

/// The page size mirrors are mapped in (the hypervisor maps whole pages).
pub const MIRROR_PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MirrorError {
    #[error("a register mirror is a whole number of {MIRROR_PAGE}-byte pages, not {0} bytes")]
    Size(u64),
    #[error("cannot allocate a register mirror: {0}")]
    Map(String),
}

pub struct RegisterMirror {
    region: MmapRegion,
}

impl RegisterMirror {
    /// A zeroed mirror of `len` bytes (the BAR's size).
    pub fn new(len: u64) -> Result<Self, MirrorError> {
        if len == 0 || !len.is_multiple_of(MIRROR_PAGE) {
            return Err(MirrorError::Size(len));
        }
        let region = MmapRegion::new(len as usize).map_err(|e| MirrorError::Map(e.to_string()))?;
        Ok(Self { region })
    }

    pub fn len(&self) -> u64 {
        self.region.size() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.region.size() == 0
    }

    /// Where the mirror lives in this process, for the hypervisor's mapping.
    pub fn host_address(&self) -> *mut u8 {
        self.region.as_ptr()
    }

    /// Stores the dword register at `offset` (4-byte aligned; others are ignored). One atomic
    /// store, so a guest read never sees half of an old value and half of a new one.
    pub fn store(&self, offset: u64, value: u32) {
        if !offset.is_multiple_of(4) || offset > self.len().saturating_sub(4) {
            return;
        }
        // Bounds checked above: the store cannot fail.
        let _ = self.region.as_volatile_slice().store(
            value.to_le(),
            offset as usize,
            Ordering::Release,
        );
    }

    /// The dword at `offset` as a guest read would see it.
    pub fn load(&self, offset: u64) -> u32 {
        if !offset.is_multiple_of(4) || offset > self.len().saturating_sub(4) {
            return 0;
        }
        self.region
            .as_volatile_slice()
            .load::<u32>(offset as usize, Ordering::Acquire)
            .map(u32::from_le)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_dwords_in_bounds_only() {
        assert!(RegisterMirror::new(100).is_err());
        assert!(RegisterMirror::new(0).is_err());
        let m = RegisterMirror::new(MIRROR_PAGE).unwrap();
        m.store(8, 0xdead_beef);
        assert_eq!(m.load(8), 0xdead_beef);
        m.store(MIRROR_PAGE, 1);
        m.store(6, 1);
        assert_eq!(m.load(4), 0);
        assert_eq!(m.load(MIRROR_PAGE), 0);
    }
}
