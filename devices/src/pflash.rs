//! The parallel flash that holds OVMF's UEFI variable store: QEMU's pflash1 (an Intel/Sharp
//! CFI flash, hw/block/pflash_cfi01.c) as OVMF's QemuFlashFvbServicesRuntimeDxe drives it.
//!
//! The guest reads the store like memory while the flash is in read-array mode, and talks to
//! it with byte-wide command writes: READ_STATUS (0x70), CLEAR_STATUS (0x50), WRITE_BYTE
//! (0x10 or 0x40, then the data), BLOCK_ERASE (0x20, then CONFIRM 0xd0), READ_DEVID (0x90) and
//! READ_ARRAY (0xff; 0x00 and 0xf0 too, as in QEMU). Where the guest does something odd this
//! follows QEMU, because OVMF was written against it:
//!
//! - After a program or an erase the flash stays in status mode (reads return the status
//!   register, 0x80 = ready) until the next command; OVMF ends a run of programs with 0xff.
//! - Programming stores the written value as it is (QEMU does; real NOR flash could only
//!   clear bits). The data write programs at its own offset, 1, 2 or 4 bytes little-endian.
//! - A status read puts the status in byte lanes 0 and 2 of each 4 bytes and zero elsewhere
//!   (QEMU's pflash1 on a PC has width 1 and no device width, so it answers "two x16 devices").
//! - READ_DEVID reads zeros (the PC's pflash has no ids set).
//! - Any other command, and anything but CONFIRM or READ_ARRAY after BLOCK_ERASE, returns to
//!   read-array mode. CFI queries (0x98), lock commands (0x60) and buffered writes (0xe8) are
//!   not modelled: OVMF uses none of them.
//!
//! One deliberate difference: QEMU erases when BLOCK_ERASE arrives; this erases the block
//! BLOCK_ERASE named only on CONFIRM, as the hardware does, so an aborted erase keeps the data.
//!
//! # How OVMF detects the flash (QemuFlashDetected)
//!
//! It reads block 0 for the first byte that is not 0x00, 0x50 or 0x70 (in OVMF_VARS that is
//! offset 16, the first byte of the firmware volume's GUID), writes CLEAR_STATUS there and
//! reads it back: a flash is still in read-array mode and gives the original byte (RAM would
//! give 0x50). It then writes READ_STATUS and reads: a flash gives the cleared status, 0x00
//! (ROM would give the original byte, RAM 0x70), and OVMF writes READ_ARRAY and uses it.
//!
//! # The owner's side: mapping and persistence
//!
//! For speed the vmm maps the store as read-only guest memory while the flash is in
//! read-array mode, so reads never exit; writes always exit to [`Pflash::write`]. In any other
//! mode reads must reach [`Pflash::read`], so the mapping has to go. [`PflashMapping`] tells
//! the owner when, and hands it every change to copy into the mapped memory. Every change
//! also goes to the persistence sink (the VM's own copy of OVMF_VARS when built with
//! [`Pflash::open`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ferry_storage::lock::{ImageLock, LockMode};
use ferry_storage::StorageError;

use crate::BusDevice;

/// The erase block, OVMF's QEMU_FLASH_BLOCK_SIZE (and QEMU's sector length for pflash on a PC).
pub const PFLASH_BLOCK_SIZE: usize = 4096;

const CMD_READ_ARRAY_QEMU: u8 = 0x00;
const CMD_WRITE_BYTE: u8 = 0x10;
const CMD_BLOCK_ERASE: u8 = 0x20;
const CMD_WRITE_BYTE_ALT: u8 = 0x40;
const CMD_CLEAR_STATUS: u8 = 0x50;
const CMD_READ_STATUS: u8 = 0x70;
const CMD_READ_DEVID: u8 = 0x90;
const CMD_ERASE_CONFIRM: u8 = 0xd0;
const CMD_AMD_PROBE: u8 = 0xf0;
const CMD_READ_ARRAY: u8 = 0xff;

/// Status register bits (the write state machine's).
const STATUS_READY: u8 = 0x80;
const STATUS_ERASE_ERROR: u8 = 0x20;
const STATUS_PROGRAM_ERROR: u8 = 0x10;

/// What the owner of a [`Pflash`] does for it, called from inside [`BusDevice::write`] and
/// [`Pflash::reset`] (so with the device's lock held: do not lock the device again here).
pub trait PflashMapping: Send {
    /// Read-array mode starts (`true`: map the store read-only again) or ends (`false`: unmap
    /// it, reads must exit to the device). Called only on a change; the device starts in
    /// read-array mode, so the owner maps it from [`Pflash::bytes`] before the guest runs.
    fn read_array(&mut self, active: bool);

    /// `bytes` now sit at `offset` of the store (after a program or an erase). Programs and
    /// erases happen only outside read-array mode, so this always comes between
    /// `read_array(false)` and the next `read_array(true)`: copy them into the unmapped memory.
    fn changed(&mut self, offset: u64, bytes: &[u8]);
}

/// Where changed bytes go to last beyond this run: called with (offset, bytes) after every
/// program and erase. An error is logged and sets the status register's error bit.
pub type PflashPersist = Box<dyn FnMut(u64, &[u8]) -> io::Result<()> + Send>;

#[derive(Debug, thiserror::Error)]
pub enum PflashError {
    #[error("a flash of {0} bytes is not possible: it must be a non-zero multiple of {PFLASH_BLOCK_SIZE} bytes")]
    BadSize(u64),
    #[error("{path}: cannot open the UEFI variable store for reading and writing: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot read the UEFI variable store: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is {found} bytes, but the firmware's variable store is {expected}: use the VARS file that came with the firmware's CODE file")]
    SizeMismatch {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("{path} is in use by {holder}: a VM's UEFI variables cannot be shared; stop that first, or give this VM its own copy of the VARS file")]
    InUse { path: PathBuf, holder: String },
    #[error(transparent)]
    Lock(StorageError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    ReadArray,
    /// Reads return the status register (after READ_STATUS, a program or an erase).
    Status,
    /// WRITE_BYTE came; the next write is the data.
    ProgramSetup,
    /// BLOCK_ERASE came for the block at this offset; the next write must confirm.
    EraseSetup(usize),
    DevId,
}

pub struct Pflash {
    bytes: Vec<u8>,
    mode: Mode,
    status: u8,
    mapping: Option<Box<dyn PflashMapping>>,
    persist: Option<PflashPersist>,
    // Held for the device's life: another VM (or QEMU) writing the same store would corrupt it.
    _lock: Option<ImageLock>,
}

impl Pflash {
    /// A flash over `bytes`, in read-array mode, with nothing mapped and nothing persisted.
    pub fn new(bytes: Vec<u8>) -> Result<Self, PflashError> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(PFLASH_BLOCK_SIZE) {
            return Err(PflashError::BadSize(bytes.len() as u64));
        }
        Ok(Self {
            bytes,
            mode: Mode::ReadArray,
            // QEMU's reset value: the write state machine is ready.
            status: STATUS_READY,
            mapping: None,
            persist: None,
            _lock: None,
        })
    }

    /// Opens the VM's own copy of OVMF_VARS at `path` for reading and writing, takes the host
    /// file lock a writable disk takes (QEMU's protocol), checks that it is `expected_len`
    /// bytes, and persists every program and erase to it.
    pub fn open(path: &Path, expected_len: u64) -> Result<Self, PflashError> {
        let open_err = |source| PflashError::Open {
            path: path.to_path_buf(),
            source,
        };
        let read_err = |source| PflashError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        let lock = ImageLock::acquire(path, LockMode::Exclusive).map_err(|e| match e {
            StorageError::Locked { holder, .. } => PflashError::InUse {
                path: path.to_path_buf(),
                holder: if holder.is_empty() {
                    "another program".to_string()
                } else {
                    holder
                },
            },
            e => PflashError::Lock(e),
        })?;
        let found = file.metadata().map_err(read_err)?.len();
        if found != expected_len {
            return Err(PflashError::SizeMismatch {
                path: path.to_path_buf(),
                found,
                expected: expected_len,
            });
        }
        let mut bytes = Vec::with_capacity(found as usize);
        file.read_to_end(&mut bytes).map_err(read_err)?;
        if bytes.len() as u64 != found {
            // The file changed under us between the size check and the read.
            return Err(PflashError::SizeMismatch {
                path: path.to_path_buf(),
                found: bytes.len() as u64,
                expected: expected_len,
            });
        }
        let mut flash = Self::new(bytes)?;
        flash.set_persist(Box::new(move |offset, data| {
            write_at(&mut file, offset, data)
        }));
        flash._lock = Some(lock);
        Ok(flash)
    }

    /// Installs the owner's mapping hooks (replacing any earlier ones).
    pub fn set_mapping(&mut self, mapping: Box<dyn PflashMapping>) {
        self.mapping = Some(mapping);
    }

    /// Installs where changes persist (replacing any earlier sink, such as `open`'s file).
    pub fn set_persist(&mut self, persist: PflashPersist) {
        self.persist = Some(persist);
    }

    /// The store as it is now: what the read-only mapping shows in read-array mode.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The store's size in bytes (the length of its guest-physical window).
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Never true (`new` refuses an empty store); here because clippy pairs it with `len`.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Whether reads see the store (true) or a register (false): whether the owner's
    /// read-only mapping should be in place now.
    pub fn in_read_array(&self) -> bool {
        self.mode == Mode::ReadArray
    }

    /// Machine reset: read-array mode and a ready status, as QEMU's reset leaves it.
    pub fn reset(&mut self) {
        self.status = STATUS_READY;
        self.set_mode(Mode::ReadArray);
    }

    fn set_mode(&mut self, mode: Mode) {
        let was = self.in_read_array();
        self.mode = mode;
        let now = self.in_read_array();
        if was != now {
            tracing::trace!("pflash: read-array mode {}", if now { "on" } else { "off" });
            if let Some(m) = self.mapping.as_mut() {
                m.read_array(now);
            }
        }
    }

    /// Stores `data` at `offset` (in range, checked by the caller) and passes it on to the
    /// sink and the mapping; returns false when the sink failed.
    fn store(&mut self, offset: usize, data: &[u8]) -> bool {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
        let stored = &self.bytes[offset..offset + data.len()];
        let mut ok = true;
        if let Some(persist) = self.persist.as_mut() {
            if let Err(e) = persist(offset as u64, stored) {
                tracing::warn!(
                    "pflash: cannot save {} bytes at {offset:#x} of the UEFI variable store: {e}",
                    stored.len()
                );
                ok = false;
            }
        }
        if let Some(m) = self.mapping.as_mut() {
            m.changed(offset as u64, stored);
        }
        ok
    }

    fn command(&mut self, offset: usize, cmd: u8) {
        let mode = match cmd {
            CMD_READ_ARRAY | CMD_READ_ARRAY_QEMU | CMD_AMD_PROBE => Mode::ReadArray,
            CMD_WRITE_BYTE | CMD_WRITE_BYTE_ALT => Mode::ProgramSetup,
            CMD_BLOCK_ERASE => Mode::EraseSetup(offset & !(PFLASH_BLOCK_SIZE - 1)),
            CMD_CLEAR_STATUS => {
                // QEMU clears and goes back to read-array mode: what OVMF's probe relies on.
                self.status = 0;
                Mode::ReadArray
            }
            CMD_READ_STATUS => Mode::Status,
            CMD_READ_DEVID => Mode::DevId,
            _ => {
                tracing::debug!("pflash: unsupported command {cmd:#04x} at {offset:#x}");
                Mode::ReadArray
            }
        };
        self.set_mode(mode);
    }
}

fn write_at(file: &mut File, offset: u64, data: &[u8]) -> io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(data)
}

/// The status register as a read of `len` bytes sees it: lanes 0 and 2 of each 4 bytes
/// (QEMU, width 1 without a device width; wider accesses are split into 4-byte ones).
fn status_lanes(status: u8, data: &mut [u8]) {
    let len = data.len();
    for (i, b) in data.iter_mut().enumerate() {
        *b = if i % 2 == 0 && (i == 0 || len > 2) {
            status
        } else {
            0
        };
    }
}

impl BusDevice for Pflash {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(start) = in_range(offset, data.len(), self.bytes.len()) else {
            tracing::debug!(
                "pflash: read of {} bytes at {offset:#x} is outside the flash",
                data.len()
            );
            data.fill(0xff);
            return;
        };
        match self.mode {
            Mode::ReadArray => data.copy_from_slice(&self.bytes[start..start + data.len()]),
            Mode::Status | Mode::ProgramSetup | Mode::EraseSetup(_) => {
                status_lanes(self.status, data)
            }
            Mode::DevId => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 1 | 2 | 4) {
            // QEMU's pflash takes at most 4 bytes at once; OVMF writes single bytes.
            tracing::debug!(
                "pflash: ignoring a {}-byte write at {offset:#x}",
                data.len()
            );
            return;
        }
        let Some(start) = in_range(offset, data.len(), self.bytes.len()) else {
            tracing::debug!(
                "pflash: write of {} bytes at {offset:#x} is outside the flash",
                data.len()
            );
            return;
        };
        // Commands are the low byte of whatever width came (little-endian guest).
        let cmd = data[0];
        match self.mode {
            Mode::ProgramSetup => {
                if !self.store(start, data) {
                    self.status |= STATUS_PROGRAM_ERROR;
                }
                self.status |= STATUS_READY;
                self.set_mode(Mode::Status);
            }
            Mode::EraseSetup(block) => match cmd {
                CMD_ERASE_CONFIRM => {
                    let erased = [0xff; PFLASH_BLOCK_SIZE];
                    if !self.store(block, &erased) {
                        self.status |= STATUS_ERASE_ERROR;
                    }
                    self.status |= STATUS_READY;
                    self.set_mode(Mode::Status);
                }
                CMD_READ_ARRAY => self.set_mode(Mode::ReadArray),
                _ => {
                    tracing::debug!(
                        "pflash: block erase at {block:#x} not confirmed ({cmd:#04x}); aborted"
                    );
                    self.set_mode(Mode::ReadArray);
                }
            },
            Mode::ReadArray | Mode::Status | Mode::DevId => self.command(start, cmd),
        }
    }
}

/// `offset` as an index when `len` bytes there fit in a store of `size` bytes.
fn in_range(offset: u64, len: usize, size: usize) -> Option<usize> {
    let start = usize::try_from(offset).ok()?;
    (start.checked_add(len)? <= size).then_some(start)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    const LEN: usize = 4 * PFLASH_BLOCK_SIZE;

    /// A store that starts like OVMF_VARS: a firmware volume header whose 16 zero bytes come
    /// before the file system GUID (8d2bf1ff-9676-8b4c-...).
    fn vars() -> Vec<u8> {
        let mut v = vec![0xff; LEN];
        v[..16].fill(0);
        v[16..32].copy_from_slice(&[
            0x8d, 0x2b, 0xf1, 0xff, 0x96, 0x76, 0x8b, 0x4c, 0xa9, 0x85, 0x27, 0x47, 0x07, 0x5b,
            0x4f, 0x50,
        ]);
        v
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Event {
        ReadArray(bool),
        Changed(u64, Vec<u8>),
    }

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<Event>>>);

    impl Log {
        fn take(&self) -> Vec<Event> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl PflashMapping for Log {
        fn read_array(&mut self, active: bool) {
            self.0.lock().unwrap().push(Event::ReadArray(active));
        }
        fn changed(&mut self, offset: u64, bytes: &[u8]) {
            self.0
                .lock()
                .unwrap()
                .push(Event::Changed(offset, bytes.to_vec()));
        }
    }

    fn flash() -> (Pflash, Log) {
        let mut f = Pflash::new(vars()).unwrap();
        let log = Log::default();
        f.set_mapping(Box::new(log.clone()));
        (f, log)
    }

    fn rb(f: &mut Pflash, offset: u64) -> u8 {
        let mut b = [0u8];
        f.read(offset, &mut b);
        b[0]
    }

    /// OVMF's QemuFlashDetected, step by step: which way it decides.
    fn detect(f: &mut Pflash) -> &'static str {
        let Some(probe) = (0..PFLASH_BLOCK_SIZE as u64)
            .find(|&o| !matches!(rb(f, o), CMD_CLEAR_STATUS | CMD_READ_STATUS | 0x00))
        else {
            return "no probe location";
        };
        let original = rb(f, probe);
        f.write(probe, &[CMD_CLEAR_STATUS]);
        let p = rb(f, probe);
        if original != CMD_CLEAR_STATUS && p == CMD_CLEAR_STATUS {
            f.write(probe, &[original]);
            return "RAM";
        }
        f.write(probe, &[CMD_READ_STATUS]);
        let p = rb(f, probe);
        if p == original {
            "ROM"
        } else if p == CMD_READ_STATUS {
            f.write(probe, &[original]);
            "RAM"
        } else if p == 0x00 {
            f.write(probe, &[CMD_READ_ARRAY]);
            "FLASH"
        } else {
            "nothing"
        }
    }

    /// OVMF's QemuFlashWrite.
    fn program(f: &mut Pflash, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            f.write(offset + i as u64, &[CMD_WRITE_BYTE]);
            f.write(offset + i as u64, &[b]);
        }
        if !data.is_empty() {
            f.write(offset + data.len() as u64 - 1, &[CMD_READ_ARRAY]);
        }
    }

    /// OVMF's QemuFlashEraseBlock.
    fn erase(f: &mut Pflash, lba: u64) {
        f.write(lba * PFLASH_BLOCK_SIZE as u64, &[CMD_BLOCK_ERASE]);
        f.write(lba * PFLASH_BLOCK_SIZE as u64, &[CMD_ERASE_CONFIRM]);
    }

    #[test]
    fn ovmf_detects_flash() {
        let (mut f, log) = flash();
        assert_eq!(detect(&mut f), "FLASH");
        assert!(f.in_read_array());
        // CLEAR_STATUS keeps read-array mode; READ_STATUS leaves it; READ_ARRAY returns.
        assert_eq!(
            log.take(),
            vec![Event::ReadArray(false), Event::ReadArray(true)]
        );
        assert_eq!(
            f.bytes(),
            &vars()[..],
            "detection must not change the store"
        );
        // A second boot's probe (status now 0, before a reset) decides the same way.
        assert_eq!(detect(&mut f), "FLASH");
        f.reset();
        assert_eq!(detect(&mut f), "FLASH");
    }

    #[test]
    fn program_reads_back_in_array_mode() {
        let (mut f, log) = flash();
        program(&mut f, 0x1234, b"ferry");
        assert!(f.in_read_array());
        let mut got = [0u8; 5];
        f.read(0x1234, &mut got);
        assert_eq!(&got, b"ferry");
        assert_eq!(&f.bytes()[0x1234..0x1239], b"ferry");
        let events = log.take();
        assert_eq!(events.first(), Some(&Event::ReadArray(false)));
        assert_eq!(events.last(), Some(&Event::ReadArray(true)));
        let changed: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Changed(o, b) => Some((*o, b.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            changed,
            b"ferry"
                .iter()
                .enumerate()
                .map(|(i, &b)| (0x1234 + i as u64, vec![b]))
                .collect::<Vec<_>>()
        );
        // One transition out and one back, however many bytes were programmed.
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::ReadArray(_)))
                .count(),
            2
        );
    }

    #[test]
    fn program_stores_the_value_as_qemu_does() {
        let (mut f, _) = flash();
        program(&mut f, 0x2000, &[0x0f]);
        // Real NOR flash would give 0x0f & 0xf0 = 0; QEMU (and OVMF on it) sees 0xf0.
        program(&mut f, 0x2000, &[0xf0]);
        assert_eq!(rb(&mut f, 0x2000), 0xf0);
    }

    #[test]
    fn wide_program_writes_all_its_bytes() {
        let (mut f, _) = flash();
        f.write(0x1000, &[CMD_WRITE_BYTE]);
        f.write(0x1000, &0x1122_3344u32.to_le_bytes());
        f.write(0x1000, &[CMD_READ_ARRAY]);
        let mut got = [0u8; 4];
        f.read(0x1000, &mut got);
        assert_eq!(u32::from_le_bytes(got), 0x1122_3344);
    }

    #[test]
    fn erase_block() {
        let (mut f, log) = flash();
        program(&mut f, 0x1000, &[1, 2, 3]);
        program(&mut f, 0x2000, &[4]);
        log.take();
        erase(&mut f, 1);
        // OVMF does not send READ_ARRAY after an erase: status until the next command.
        assert!(!f.in_read_array());
        assert_eq!(rb(&mut f, 0x1000), STATUS_READY);
        assert_eq!(
            log.take(),
            vec![
                Event::ReadArray(false),
                Event::Changed(0x1000, vec![0xff; PFLASH_BLOCK_SIZE])
            ]
        );
        f.write(0, &[CMD_READ_ARRAY]);
        assert_eq!(log.take(), vec![Event::ReadArray(true)]);
        assert!(f.bytes()[0x1000..0x2000].iter().all(|&b| b == 0xff));
        assert_eq!(rb(&mut f, 0x2000), 4, "the next block is untouched");
        assert_eq!(&f.bytes()[..32], &vars()[..32], "the block before too");
    }

    #[test]
    fn erase_of_an_unaligned_offset_erases_its_block() {
        let (mut f, _) = flash();
        program(&mut f, 0x3004, &[7]);
        f.write(0x3abc, &[CMD_BLOCK_ERASE]);
        f.write(0x3abc, &[CMD_ERASE_CONFIRM]);
        f.write(0, &[CMD_READ_ARRAY]);
        assert!(f.bytes()[0x3000..0x4000].iter().all(|&b| b == 0xff));
    }

    #[test]
    fn erase_without_confirm_aborts() {
        let (mut f, log) = flash();
        program(&mut f, 0x1000, &[9]);
        log.take();
        f.write(0x1000, &[CMD_BLOCK_ERASE]);
        f.write(0x1000, &[0x42]);
        assert!(f.in_read_array());
        assert_eq!(rb(&mut f, 0x1000), 9);
        f.write(0x1000, &[CMD_BLOCK_ERASE]);
        f.write(0x1000, &[CMD_READ_ARRAY]);
        assert_eq!(rb(&mut f, 0x1000), 9);
        assert_eq!(
            log.take(),
            vec![
                Event::ReadArray(false),
                Event::ReadArray(true),
                Event::ReadArray(false),
                Event::ReadArray(true)
            ]
        );
    }

    #[test]
    fn status_reads() {
        let (mut f, _) = flash();
        f.write(0x10, &[CMD_READ_STATUS]);
        // Every offset shows the status; lanes as QEMU's width-1 pflash gives them.
        assert_eq!(rb(&mut f, 0x3fff), STATUS_READY);
        let mut w2 = [0xaa; 2];
        f.read(0, &mut w2);
        assert_eq!(w2, [0x80, 0]);
        let mut w4 = [0xaa; 4];
        f.read(0, &mut w4);
        assert_eq!(w4, [0x80, 0, 0x80, 0]);
        let mut w8 = [0xaa; 8];
        f.read(8, &mut w8);
        assert_eq!(w8, [0x80, 0, 0x80, 0, 0x80, 0, 0x80, 0]);

        // CLEAR_STATUS clears it and returns to read-array mode.
        f.write(0, &[CMD_CLEAR_STATUS]);
        assert!(f.in_read_array());
        assert_eq!(rb(&mut f, 16), 0x8d);
        f.write(0, &[CMD_READ_STATUS]);
        assert_eq!(rb(&mut f, 16), 0);

        // A program sets ready again, and reads stay on the status until READ_ARRAY.
        f.write(0x100, &[CMD_WRITE_BYTE]);
        assert_eq!(rb(&mut f, 0x100), 0, "waiting for data: status");
        f.write(0x100, &[0x55]);
        assert_eq!(rb(&mut f, 0x100), STATUS_READY);
        f.write(0x100, &[CMD_READ_ARRAY]);
        assert_eq!(rb(&mut f, 0x100), 0x55);
    }

    #[test]
    fn devid_reads_zero() {
        let (mut f, _) = flash();
        f.write(0, &[CMD_READ_DEVID]);
        assert!(!f.in_read_array());
        let mut b = [0xaa; 4];
        f.read(0, &mut b);
        assert_eq!(b, [0; 4]);
        f.write(0, &[CMD_READ_ARRAY]);
        assert_eq!(rb(&mut f, 16), 0x8d);
    }

    #[test]
    fn romd_transitions_only_on_change() {
        let (mut f, log) = flash();
        f.write(0, &[CMD_READ_ARRAY]);
        f.write(0, &[0x00]);
        f.write(0, &[CMD_CLEAR_STATUS]);
        assert_eq!(
            log.take(),
            vec![],
            "read-array to read-array is no transition"
        );
        f.write(0, &[CMD_READ_STATUS]);
        f.write(0, &[CMD_READ_DEVID]);
        f.write(0, &[CMD_READ_STATUS]);
        assert_eq!(log.take(), vec![Event::ReadArray(false)]);
        f.reset();
        assert_eq!(log.take(), vec![Event::ReadArray(true)]);
        assert!(f.in_read_array());
        f.reset();
        assert_eq!(log.take(), vec![]);
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ferry-pflash-{}-{name}.fd", std::process::id()))
    }

    #[test]
    fn persistence_reaches_the_file() {
        let path = temp_path("persist");
        std::fs::write(&path, vars()).unwrap();
        {
            let mut f = Pflash::open(&path, LEN as u64).unwrap();
            assert_eq!(f.bytes(), &vars()[..]);
            assert_eq!(detect(&mut f), "FLASH");
            program(&mut f, 0x2010, b"var");
            erase(&mut f, 3);
            f.write(0, &[CMD_READ_STATUS]);
            assert_eq!(rb(&mut f, 0), STATUS_READY, "no error bits");
            f.write(0, &[CMD_READ_ARRAY]);
        }
        let on_disk = std::fs::read(&path).unwrap();
        let mut want = vars();
        want[0x2010..0x2013].copy_from_slice(b"var");
        want[0x3000..].fill(0xff);
        assert_eq!(on_disk.len(), LEN);
        assert!(on_disk == want);
        // And a new device sees it.
        let f = Pflash::open(&path, LEN as u64).unwrap();
        assert!(f.bytes() == &want[..]);
        drop(f);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn open_checks_size_and_existence() {
        let path = temp_path("size");
        std::fs::write(&path, vec![0u8; 1000]).unwrap();
        let e = Pflash::open(&path, LEN as u64).err().unwrap();
        assert!(
            matches!(e, PflashError::SizeMismatch { found: 1000, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("1000 bytes"), "{e}");
        std::fs::remove_file(&path).unwrap();
        let e = Pflash::open(&path, LEN as u64).err().unwrap();
        assert!(matches!(e, PflashError::Open { .. }), "{e}");
        assert!(matches!(
            Pflash::new(vec![0; 100]),
            Err(PflashError::BadSize(100))
        ));
        assert!(matches!(
            Pflash::new(Vec::new()),
            Err(PflashError::BadSize(0))
        ));
    }

    #[test]
    fn open_refuses_a_store_in_use() {
        let path = temp_path("locked");
        std::fs::write(&path, vars()).unwrap();
        let first = Pflash::open(&path, LEN as u64).unwrap();
        let e = Pflash::open(&path, LEN as u64).err().unwrap();
        assert!(matches!(e, PflashError::InUse { .. }), "{e}");
        drop(first);
        Pflash::open(&path, LEN as u64).unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn persist_failure_sets_error_bits() {
        let (mut f, _) = flash();
        f.set_persist(Box::new(|_, _| Err(io::Error::other("disk full"))));
        program(&mut f, 0x1000, &[1]);
        f.write(0, &[CMD_READ_STATUS]);
        assert_eq!(rb(&mut f, 0), STATUS_READY | STATUS_PROGRAM_ERROR);
        erase(&mut f, 1);
        assert_eq!(
            rb(&mut f, 0),
            STATUS_READY | STATUS_PROGRAM_ERROR | STATUS_ERASE_ERROR
        );
        f.write(0, &[CMD_CLEAR_STATUS]);
        f.write(0, &[CMD_READ_STATUS]);
        assert_eq!(rb(&mut f, 0), 0);
        // This run still sees the data; only the file missed it.
        f.write(0, &[CMD_READ_ARRAY]);
        assert_eq!(rb(&mut f, 0x1000), 0xff);
    }

    #[test]
    fn guest_mistakes_are_harmless() {
        let (mut f, log) = flash();
        // Odd widths are ignored, whatever the mode.
        f.write(0, &[CMD_WRITE_BYTE; 3]);
        f.write(0, &[CMD_READ_STATUS; 8]);
        f.write(0, &[]);
        assert!(f.in_read_array());
        f.write(0x100, &[CMD_WRITE_BYTE]);
        f.write(0x100, &[1, 2, 3, 4, 5, 6, 7, 8]);
        f.write(0x100, &[1, 2, 3]);
        // Still waiting for its data.
        f.write(0x100, &[0x77]);
        f.write(0x100, &[CMD_READ_ARRAY]);
        assert_eq!(rb(&mut f, 0x100), 0x77);
        // Unknown commands return to read-array mode.
        for cmd in [0x01, 0x60, 0x98, 0xe8, 0xd0, 0x42] {
            f.write(0, &[CMD_READ_STATUS]);
            f.write(0, &[cmd]);
            assert!(f.in_read_array(), "{cmd:#x}");
        }
        // Out-of-range offsets: reads give 0xff, writes do nothing.
        let mut b = [0u8; 4];
        f.read(LEN as u64 - 2, &mut b);
        assert_eq!(b, [0xff; 4]);
        f.read(u64::MAX, &mut b);
        f.write(LEN as u64, &[CMD_READ_STATUS]);
        f.write(u64::MAX - 1, &[CMD_WRITE_BYTE, 0]);
        assert!(f.in_read_array());
        f.write(0, &[CMD_WRITE_BYTE]);
        f.write(LEN as u64 - 1, &[1, 2]);
        // Still waiting for its data: program the byte that is already there.
        assert!(!f.in_read_array());
        f.write(0, &[0x00]);
        f.write(0, &[CMD_READ_ARRAY]);
        let mut want = vars();
        want[0x100] = 0x77;
        assert!(f.bytes() == &want[..]);
        // Mapping calls stayed balanced.
        let flips: Vec<_> = log
            .take()
            .into_iter()
            .filter_map(|e| match e {
                Event::ReadArray(a) => Some(a),
                _ => None,
            })
            .collect();
        assert!(flips.chunks(2).all(|c| c == [false, true]), "{flips:?}");
    }
}
