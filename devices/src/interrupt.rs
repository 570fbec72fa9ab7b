//! Interrupt handles. Devices never see an eventfd or a GSI: the vmm backs these with irqfds
//! into the in-kernel interrupt controllers (KVM) or with userspace models (HVF).

/// An edge-triggered line, as the ISA devices use: each call delivers one interrupt.
pub trait EdgeInterrupt: Send + Sync {
    fn trigger(&self);
}

#[cfg(test)]
pub(crate) mod testing {
    use super::EdgeInterrupt;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
