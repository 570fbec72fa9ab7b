//! Port-I/O and MMIO buses: address ranges mapped to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus; `offset` is relative to the start of the range it was inserted at.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength { base: u64 },
    #[error("bus range {base:#x}+{len:#x} overflows the address space")]
    Overflow { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

struct Range {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping ranges. Lookups are lock-free with respect to each other (the map
/// is immutable once the machine runs); each device has its own lock.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base
            .checked_add(len - 1)
            .ok_or(BusError::Overflow { base, len })?;
        // The closest range starting at or below `end` is the only one that can overlap.
        if let Some((&other, r)) = self.ranges.range(..=end).next_back() {
            if other + (r.len - 1) >= base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (&base, r) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the range.
        if offset.checked_add(size as u64)? <= r.len {
            Some((offset, &r.device))
        } else {
            None
        }
    }

    /// Dispatches a read; returns false when no device claims the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device claims the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, ignoring poisoning: a device's state stays usable after another thread
/// panicked while holding it (with `panic = "abort"` this cannot happen in release builds).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(0x3f8, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(0, vec![7])]);
        assert!(!bus.read(0x3f7, &mut b));
        assert!(!bus.read(0x400, &mut b));
        // An access that straddles the end of the range is not claimed.
        let mut w = [0u8; 2];
        assert!(!bus.read(0x3ff, &mut w));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(0x60, 1, dev.clone()).unwrap();
        bus.insert(0x64, 1, dev.clone()).unwrap();
        assert_eq!(
            bus.insert(0x5f, 2, dev.clone()),
            Err(BusError::Overlap {
                base: 0x5f,
                len: 2,
                other: 0x60
            })
        );
        assert!(matches!(
            bus.insert(0x10, 0, dev.clone()),
            Err(BusError::ZeroLength { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev),
            Err(BusError::Overflow { .. })
        ));
    }
}
