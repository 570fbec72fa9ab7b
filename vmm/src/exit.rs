//! How a run ends: the first reason recorded wins and wakes the event loop.

use std::sync::Mutex;

use ferry_devices::{ExitHandle, ExitRequest};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why `ferry run` stopped the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    PowerOff,
    Reset,
    GuestPanic,
    /// A vCPU could not continue (the hypervisor failed or gave up on the guest).
    VcpuFailed(String),
    /// ferry received this signal and stopped the guest.
    Signal(i32),
    /// The firmware tried every boot device and found nothing to boot.
    NoBootableDevice,
    /// The firmware did not start a boot loader within this time (--boot-timeout).
    BootTimeout(std::time::Duration),
}

pub struct ExitState {
    outcome: Mutex<Option<Outcome>>,
    evt: EventFd,
}

impl ExitState {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            outcome: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn set(&self, o: Outcome) {
        let mut g = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            tracing::debug!("machine stops: {o:?}");
            *g = Some(o);
            let _ = self.evt.write(1);
        }
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl ExitHandle for ExitState {
    fn request_exit(&self, why: ExitRequest) {
        self.set(match why {
            ExitRequest::PowerOff => Outcome::PowerOff,
            ExitRequest::Reset => Outcome::Reset,
            ExitRequest::Panic => Outcome::GuestPanic,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitState::new().unwrap();
        assert_eq!(s.outcome(), None);
        s.request_exit(ExitRequest::Panic);
        s.set(Outcome::PowerOff);
        assert_eq!(s.outcome(), Some(Outcome::GuestPanic));
        assert_eq!(s.eventfd().read().unwrap(), 1);
    }
}
