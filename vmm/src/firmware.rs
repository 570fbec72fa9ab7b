//! Booting through firmware (SeaBIOS, OVMF): the image mapped where a PC has its flash, the
//! firmware's debug port, and the watch that ends a run whose firmware finds nothing to boot
//! or never hands over to a boot loader.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use ferry_devices::debug_port::{DebugPort, LineAssembler};
use ferry_devices::pflash::{Pflash, PflashMapping};
use ferry_devices::Bus;
use ferry_firmware::image::{FirmwareImage, FirmwareKind};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::timerfd::TimerFd;

use crate::exit::{ExitState, Outcome};
use crate::hypervisor::{FlashMapping, Vm};
use crate::machine::FirmwareBoot;
use crate::VmmError;

/// A loaded firmware: its image and, for UEFI, the variable store mapped below it.
pub struct Firmware {
    pub image: FirmwareImage,
    pub vars: Option<VarStore>,
}

/// OVMF's variable store: the VM's own file, or the template's bytes for one run.
pub enum VarStore {
    File { path: PathBuf, len: u64 },
    ThisRun(Vec<u8>),
}

impl VarStore {
    pub fn size(&self) -> u64 {
        match self {
            VarStore::File { len, .. } => *len,
            VarStore::ThisRun(bytes) => bytes.len() as u64,
        }
    }
}

/// Finds and checks the firmware a boot asks for; a UEFI boot also gets its variable store,
/// copied from OVMF's template the first time.
pub fn load(boot: &FirmwareBoot) -> Result<Firmware, VmmError> {
    let files = boot.firmware.find()?;
    let image = FirmwareImage::load(&files.code)?;
    tracing::info!("firmware: {}", image.path.display());
    let vars = match (&files.vars, image.kind) {
        (Some(template), FirmwareKind::Efi) => Some(var_store(template, boot.efi_vars.as_deref())?),
        _ => None,
    };
    if let Some(v) = &vars {
        if image.bytes.len() as u64 + v.size() > MAX_FLASH {
            return Err(VmmError::Config(format!(
                "{} and its variable store are larger than the 16 MiB below 4 GiB that firmware may fill",
                image.path.display()
            )));
        }
    }
    Ok(Firmware { image, vars })
}

/// What firmware may fill below 4 GiB (the hypervisor's pages sit below that).
const MAX_FLASH: u64 = 16 << 20;

fn var_store(template: &Path, own: Option<&Path>) -> Result<VarStore, VmmError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| VmmError::Io {
            what: format!("cannot read the UEFI variable store {}", p.display()),
            source,
        })
    };
    let fresh = read(template)?;
    let Some(own) = own else {
        tracing::warn!(
            "UEFI variables are kept for this run only: give --efi-vars FILE (or run a VM.toml) to keep them"
        );
        return Ok(VarStore::ThisRun(fresh));
    };
    if !own.exists() {
        std::fs::write(own, &fresh).map_err(|source| VmmError::Io {
            what: format!("cannot create the UEFI variable store {}", own.display()),
            source,
        })?;
        tracing::info!(
            "new UEFI variable store {} (from {})",
            own.display(),
            template.display()
        );
    }
    // The flash device reads the file when the machine starts; here only its size matters.
    let len = std::fs::metadata(own)
        .map_err(|source| VmmError::Io {
            what: format!("cannot read the UEFI variable store {}", own.display()),
            source,
        })?
        .len();
    if len != fresh.len() as u64 {
        return Err(VmmError::Config(format!(
            "the UEFI variable store {} is {len} bytes, but this OVMF's template {} is {}: it belongs to another OVMF build; move it away to start afresh",
            own.display(),
            template.display(),
            fresh.len()
        )));
    }
    Ok(VarStore::File {
        path: own.to_path_buf(),
        len,
    })
}

/// Maps the image read-only so that it ends at 4 GiB (the reset vector is its last 16 bytes),
/// and copies its last 128 KiB into RAM below 1 MiB, where real-mode code runs it. That RAM
/// stays writable: SeaBIOS copies itself there again when it "shadows" through the PAM
/// registers, which ferry keeps for the guest to read back without remapping anything.
/// A UEFI variable store becomes a flash device right below the image (as QEMU's second
/// flash), on `mmio`.
pub fn map(
    vm: &Arc<dyn Vm>,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    fw: &Firmware,
) -> Result<(), VmmError> {
    let image = &fw.image;
    vm.map_rom(image.base(), &image.bytes)?;
    if let Some(vars) = &fw.vars {
        let len = vars.size();
        let gpa = image.base() - len;
        let mut flash = match vars {
            VarStore::File { path, len } => Pflash::open(path, *len),
            VarStore::ThisRun(bytes) => Pflash::new(bytes.clone()),
        }
        .map_err(|e| VmmError::Config(format!("UEFI variable store: {e}")))?;
        let mapping = vm.clone().map_flash(gpa, flash.bytes())?;
        flash.set_mapping(Box::new(FlashSlot(mapping)));
        mmio.insert(gpa, len, Arc::new(Mutex::new(flash)))
            .map_err(|e| VmmError::Device(format!("UEFI variable store: {e}")))?;
    }
    let (at, low) = image.low_bios();
    mem.write_slice(low, GuestAddress(at))
        .map_err(|e| VmmError::Config(format!("copying the firmware below 1 MiB: {e}")))?;
    Ok(())
}

/// The flash device's view of its memory slot.
struct FlashSlot(Arc<dyn FlashMapping>);

impl PflashMapping for FlashSlot {
    fn read_array(&mut self, active: bool) {
        self.0.set_mapped(active);
    }

    fn changed(&mut self, offset: u64, bytes: &[u8]) {
        self.0.update(offset, bytes);
    }
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

    /// One line of the firmware's log or console. SeaBIOS says "Booting from ..." when it
    /// jumps to a boot sector, and "No bootable device." when every entry failed; it would
    /// then wait and reset, over and over, so ferry ends the run instead. OVMF's boot manager
    /// says "BdsDxe: starting Boot0001 ..." for each option it starts; when nothing else
    /// boots it starts its own shell, or says no option or device was found.
    pub fn line(&self, line: &str) {
        let line = line.trim_start_matches(|c: char| c.is_control() || c == ' ');
        let nothing_to_boot = line.contains("No bootable device")
            || line.contains("No bootable option or device")
            || (line.starts_with("BdsDxe: starting ") && line.contains("EFI Internal Shell"));
        if nothing_to_boot {
            self.exit.set(Outcome::NoBootableDevice);
        } else if line.starts_with("Booting from ") || line.starts_with("BdsDxe: starting ") {
            self.handed_off.store(true, Ordering::Release);
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

/// The serial console's output on its way to the user, with its lines shown to the boot
/// watch until the firmware has handed over (after that it only passes bytes on).
pub struct ConsoleTap<W> {
    out: W,
    lines: LineAssembler,
    watch: Arc<BootWatch>,
}

impl<W> ConsoleTap<W> {
    pub fn new(out: W, watch: Arc<BootWatch>) -> Self {
        Self {
            out,
            lines: LineAssembler::default(),
            watch,
        }
    }
}

impl<W: Write> Write for ConsoleTap<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        if !self.watch.handed_off() {
            for &b in &buf[..n] {
                if let Some(line) = self.lines.push(b) {
                    self.watch.line(&line);
                }
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
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
    fn ovmf_console_lines() {
        let exit = Arc::new(ExitState::new().unwrap());
        let w = BootWatch::new(exit.clone());
        let mut tap = ConsoleTap::new(Vec::new(), w.clone());
        tap.write_all(b"\x1b[2J\x1b[01;01HBdsDxe: loading Boot0001 \"UEFI Misc Device\"\r\n")
            .unwrap();
        assert!(!w.handed_off());
        tap.write_all(b"BdsDxe: starting Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)\r\n")
            .unwrap();
        assert!(w.handed_off());
        assert_eq!(exit.outcome(), None);
        assert!(tap.out.starts_with(b"\x1b[2J"));
        let exit = Arc::new(ExitState::new().unwrap());
        let w = BootWatch::new(exit.clone());
        w.line("BdsDxe: starting Boot0003 \"EFI Internal Shell\" from Fv(7CB8BDC9)");
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
