//! The pvpanic ISA device (QEMU's, ACPI _HID "QEMU0001"): the guest kernel's panic notifier
//! writes here, so a guest crash ends `ferry run` with an error instead of hanging or rebooting.

use std::sync::Arc;

use crate::{BusDevice, ExitHandle, ExitRequest};

pub const PVPANIC_PORT: u64 = 0x505;
const PANICKED: u8 = 1 << 0;
const CRASH_LOADED: u8 = 1 << 1;

pub struct PvPanic {
    exit: Arc<dyn ExitHandle>,
}

impl PvPanic {
    pub fn new(exit: Arc<dyn ExitHandle>) -> Self {
        Self { exit }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // The driver reads the events it may report.
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PANICKED | CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let v = data.first().copied().unwrap_or(0);
        if v & PANICKED != 0 {
            self.exit.request_exit(ExitRequest::Panic);
        } else if v & CRASH_LOADED != 0 {
            // A crash kernel takes over; the guest keeps running.
            tracing::warn!("guest panicked and is loading its crash kernel");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::testing::RecordingExit;

    #[test]
    fn panic_write_requests_exit() {
        let exit = Arc::new(RecordingExit::default());
        let mut p = PvPanic::new(exit.clone());
        let mut b = [0u8];
        p.read(0, &mut b);
        assert_eq!(b[0], 3);
        p.write(0, &[2]);
        assert!(exit.requests().is_empty());
        p.write(0, &[1]);
        assert_eq!(exit.requests(), vec![ExitRequest::Panic]);
    }
}
