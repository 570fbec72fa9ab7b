//! How devices end the machine's run: the ACPI sleep register, the keyboard controller's reset
//! line, the PCI reset register and the panic device all ask through one handle.

/// Why the machine stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitRequest {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 pulse, ACPI reset register, port 0xCF9, triple fault).
    Reset,
    /// The guest kernel reported a panic through the pvpanic device.
    Panic,
}

/// Implemented by the vmm: the first request wins and wakes the event loop.
pub trait ExitHandle: Send + Sync {
    fn request_exit(&self, why: ExitRequest);
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct RecordingExit(pub Mutex<Vec<ExitRequest>>);

    impl RecordingExit {
        pub fn requests(&self) -> Vec<ExitRequest> {
            self.0.lock().unwrap().clone()
        }
    }

    impl ExitHandle for RecordingExit {
        fn request_exit(&self, why: ExitRequest) {
            self.0.lock().unwrap().push(why);
        }
    }
}
