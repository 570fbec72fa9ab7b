//! Interrupt handles. Devices never see an eventfd or a GSI: the vmm backs these with irqfds
//! into the in-kernel interrupt controllers (KVM) or with userspace models (HVF).

/// An edge-triggered line, as the ISA devices use: each call delivers one interrupt.
pub trait EdgeInterrupt: Send + Sync {
    fn trigger(&self);
}

/// A level-triggered line (PCI INTx): stays asserted until the device lowers it.
pub trait LevelInterrupt: Send + Sync {
    fn set_level(&self, asserted: bool);
}

/// Message-signalled interrupts (MSI, MSI-X): the device writes `data` at `address`, which
/// the interrupt controllers decode.
pub trait MsiSender: Send + Sync {
    fn send(&self, address: u64, data: u32);
}

#[cfg(test)]
pub(crate) mod testing {
    use super::{EdgeInterrupt, LevelInterrupt, MsiSender};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// A level-triggered line that remembers its level.
    #[derive(Default)]
    pub struct Line(pub AtomicBool);

    impl LevelInterrupt for Line {
        fn set_level(&self, a: bool) {
            self.0.store(a, Ordering::SeqCst);
        }
    }

    /// Records every message-signalled interrupt as (address, data).
    #[derive(Default)]
    pub struct Msis(pub Mutex<Vec<(u64, u32)>>);

    impl MsiSender for Msis {
        fn send(&self, a: u64, d: u32) {
            self.0.lock().unwrap().push((a, d));
        }
    }

    /// Counts the interrupts a device raised.
    #[derive(Default)]
    pub struct CountingIrq(pub AtomicUsize);

    impl CountingIrq {
        pub fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl EdgeInterrupt for CountingIrq {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}
