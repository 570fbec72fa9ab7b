//! Booting through firmware (SeaBIOS, OVMF): the image mapped where a PC has its flash, the
//! firmware's debug port, and the watch that ends a run whose firmware finds nothing to boot
//! or never hands over to a boot loader.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use ferry_devices::debug_port::DebugPort;
use ferry_firmware::image::FirmwareImage;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::timerfd::TimerFd;

use crate::exit::{ExitState, Outcome};
use crate::hypervisor::Vm;
use crate::VmmError;

/// Maps the image read-only so that it ends at 4 GiB (the reset vector is its last 16 bytes),
/// and copies its last 128 KiB into RAM below 1 MiB, where real-mode code runs it. That RAM
/// stays writable: SeaBIOS copies itself there again when it "shadows" through the PAM
/// registers, which ferry keeps for the guest to read back without remapping anything.
pub fn map_image(
    vm: &dyn Vm,
    mem: &GuestMemoryMmap,
    image: &FirmwareImage,
) -> Result<(), VmmError> {
    vm.map_rom(image.base(), &image.bytes)?;
    let (at, low) = image.low_bios();
    mem.write_slice(low, GuestAddress(at))
        .map_err(|e| VmmError::Config(format!("copying the firmware below 1 MiB: {e}")))?;
    Ok(())
}

/// What the firmware has said about booting, from its debug port.
pub struct BootWatch {
    handed_off: AtomicBool,
    exit: Arc<ExitState>,
}

impl BootWatch {
    pub fn new(exit: Arc<ExitState>) -> Arc<Self> {
        Arc::new(Self {
            handed_off: AtomicBool::new(false),
            exit,
        })
    }

    /// One line of the firmware's log. SeaBIOS says "Booting from ..." when it jumps to a
    /// boot sector, and "No bootable device." when every entry failed; it would then wait
    /// and reset, over and over, so ferry ends the run instead.
    pub fn line(&self, line: &str) {
        if line.starts_with("Booting from ") {
            self.handed_off.store(true, Ordering::Release);
        } else if line.contains("No bootable device") {
            self.exit.set(Outcome::NoBootableDevice);
        }
    }

    pub fn handed_off(&self) -> bool {
        self.handed_off.load(Ordering::Acquire)
    }
}

/// The debug port device: each line goes to `log` (when given), to ferry's log at debug
/// level, and to the boot watch.
pub fn debug_port(log: Option<&Path>, watch: Arc<BootWatch>) -> Result<DebugPort, VmmError> {
    let mut file = log
        .map(|p| {
            File::create(p).map_err(|source| VmmError::Io {
                what: format!("cannot create the firmware log {}", p.display()),
                source,
            })
        })
        .transpose()?;
    Ok(DebugPort::new(Box::new(move |line| {
        tracing::debug!(target: "firmware", "{line}");
        if let Some(f) = file.as_mut() {
            if let Err(e) = writeln!(f, "{line}") {
                tracing::warn!("firmware log: {e}; no more lines are written to it");
                file = None;
            }
        }
        watch.line(line);
    })))
}

/// Ends the run when the firmware has not started a boot loader in time.
pub struct BootTimer {
    timer: TimerFd,
    limit: Duration,
    watch: Arc<BootWatch>,
    exit: Arc<ExitState>,
}

impl BootTimer {
    pub fn new(
        limit: Duration,
        watch: Arc<BootWatch>,
        exit: Arc<ExitState>,
    ) -> Result<Self, VmmError> {
        let io = |e: vmm_sys_util::errno::Error| VmmError::Io {
            what: "boot timer".into(),
            source: e.into(),
        };
        let mut timer = TimerFd::new().map_err(io)?;
        timer.reset(limit, None).map_err(io)?;
        Ok(Self {
            timer,
            limit,
            watch,
            exit,
        })
    }
}

impl MutEventSubscriber for BootTimer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data_raw(
            self.timer.as_raw_fd(),
            0,
            EventSet::IN,
        )) {
            tracing::error!("boot timer: {e}");
        }
    }

    fn process(&mut self, _: Events, ops: &mut EventOps) {
        let _ = self.timer.wait();
        let _ = ops.remove(Events::with_data_raw(
            self.timer.as_raw_fd(),
            0,
            EventSet::IN,
        ));
        if !self.watch.handed_off() {
            self.exit.set(Outcome::BootTimeout(self.limit));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::SubscriberOps;

    #[test]
    fn watch_ends_the_run_on_no_bootable_device_only() {
        let exit = Arc::new(ExitState::new().unwrap());
        let w = BootWatch::new(exit.clone());
        w.line("SeaBIOS (version 1.16.2-debian-1.16.2-1)");
        w.line("Booting from Hard Disk...");
        assert!(w.handed_off());
        assert_eq!(exit.outcome(), None);
        w.line("No bootable device.  Retrying in 5 seconds.");
        assert_eq!(exit.outcome(), Some(Outcome::NoBootableDevice));
    }

    #[test]
    fn debug_port_writes_the_log_file() {
        use ferry_devices::BusDevice;
        let dir = std::env::temp_dir().join(format!("ferry-fwlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("fw.log");
        let exit = Arc::new(ExitState::new().unwrap());
        let mut p = debug_port(Some(&log), BootWatch::new(exit)).unwrap();
        for b in b"one\ntwo\n" {
            p.write(0, &[*b]);
        }
        drop(p);
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "one\ntwo\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn timer_fires_only_before_hand_off() {
        let limit = Duration::from_millis(1);
        let mut em = event_manager::EventManager::<Box<dyn MutEventSubscriber>>::new().unwrap();
        // A firmware that handed over in time: the timer goes off and nothing happens.
        let exit = Arc::new(ExitState::new().unwrap());
        let w = BootWatch::new(exit.clone());
        w.line("Booting from DVD/CD...");
        em.add_subscriber(Box::new(BootTimer::new(limit, w, exit.clone()).unwrap()));
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(exit.outcome(), None);
        // One that did not: the run ends.
        let exit = Arc::new(ExitState::new().unwrap());
        let w = BootWatch::new(exit.clone());
        em.add_subscriber(Box::new(BootTimer::new(limit, w, exit.clone()).unwrap()));
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(exit.outcome(), Some(Outcome::BootTimeout(limit)));
    }
}
