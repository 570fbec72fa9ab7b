//! The shared ATA/ATAPI device: what a disk or a CD/DVD drive behind IDE or AHCI answers to
//! each command (ACS-3, SATA 3.x, ATA8-APT). It is pure: no I/O, no guest memory, no KVM.
//! The HBA owns the FISes (or IDE's registers), the PRDT and the medium I/O; this module
//! decides what a command means, as [`crate::scsi`] does for CDBs.
//!
//! # Interface for HBAs
//!
//! ```text
//! AtaDevice::disk(AtaDiskParams) / AtaDevice::atapi(AtapiParams) -> AtaDevice
//! AtaDevice::signature(&self) -> u32                  // AHCI PxSIG
//! AtaDevice::signature_taskfile(&self) -> Taskfile    // the same as count/lba registers
//! AtaDevice::protocol(&self, &Taskfile) -> Protocol
//! AtaDevice::parameter_len(&self, &Taskfile) -> usize // bytes `execute` reads from data_out
//! AtaDevice::execute(&mut self, &Taskfile, packet, data_out) -> AtaResult
//! AtaDevice::io_done(&mut self, &AtaIo, Result<(), IoFailure>) -> AtaCompletion
//! AtaDevice::reset(&mut self)
//! AtaDevice::as_atapi_mut(&mut self) -> Option<&mut AtapiDrive>  // insert/eject/is_loaded
//! AtaDevice::multiple_count(&self) -> u16 / write_cache_enabled(&self) -> bool
//! ```
//!
//! `execute` returns either a finished [`AtaCompletion`] (result registers and any data for
//! the host) or an [`AtaIo`] the HBA performs: a `Read` moves `len` bytes from the medium at
//! byte `offset` to the host, a `Write` the other way (the device never reads write
//! payloads), then the HBA calls `io_done` for the completion to report. `data_out` is read
//! only by commands whose parameters travel in the data phase (DATA SET MANAGEMENT's range
//! entries, ATAPI MODE SELECT).
//!
//! Result registers the spec leaves undefined for a command are zero. Where a completion
//! reports an LBA (errors, READ NATIVE MAX ADDRESS) it fills both layouts: `lba` holds the
//! whole 48-bit value and `device` bits 0..4 repeat LBA bits 24..28 for 28-bit readers.

mod atapi;
mod disk;
mod dsm;
mod geometry;
mod identify;
mod log;
mod smart;
mod taskfile;
#[cfg(test)]
mod tests;
mod xfer;

pub use crate::scsi::{DataOut, IoFailure, MediumIoKind};
pub use atapi::{AtapiDrive, AtapiParams};
pub use disk::{AtaDisk, AtaDiskParams};
pub use taskfile::{cmd, Taskfile};

/// Status register bits (ACS-3, Status field).
pub mod status {
    pub const BSY: u8 = 0x80;
    pub const DRDY: u8 = 0x40;
    /// Device fault.
    pub const DF: u8 = 0x20;
    /// Device seek complete (obsolete in ACS-3, still set by every emulator; DOS-era
    /// drivers wait for it).
    pub const DSC: u8 = 0x10;
    pub const DRQ: u8 = 0x08;
    pub const ERR: u8 = 0x01;
}

/// Error register bits (ACS-3, Error field).
pub mod error {
    /// Interface CRC error.
    pub const ICRC: u8 = 0x80;
    /// Uncorrectable data error.
    pub const UNC: u8 = 0x40;
    /// ID not found: the address is outside the medium.
    pub const IDNF: u8 = 0x10;
    /// Command aborted.
    pub const ABRT: u8 = 0x04;
    /// EXECUTE DEVICE DIAGNOSTIC and reset's diagnostic code: device 0 passed (ACS-3 EXECUTE DEVICE DIAGNOSTIC, diagnostic codes).
    pub const DIAG_PASSED: u8 = 0x01;
}

/// Status of a successful command: DRDY | DSC.
pub const STATUS_GOOD: u8 = status::DRDY | status::DSC;
/// Status of a failed command: DRDY | DSC | ERR.
pub const STATUS_ERROR: u8 = STATUS_GOOD | status::ERR;

/// Bytes per logical sector: every ATA device here has 512 (IDENTIFY word 106).
pub const SECTOR_SIZE: u64 = 512;

/// How a command's data moves; the HBA picks the FIS it sends from this (a PIO Setup FIS
/// for PioIn/PioOut and for Packet without DMA, SDB FIS for DmaQueued).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    NonData,
    PioIn,
    PioOut,
    Dma,
    DmaQueued,
    Packet { dma: bool },
}

/// A finished command: the result registers for the D2H (or PIO Setup) FIS, and the data
/// to the host (IDENTIFY's 512 bytes, log pages, ATAPI data-in already cut to the CDB's
/// allocation length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtaCompletion {
    pub status: u8,
    pub error: u8,
    pub count: u16,
    pub lba: u64,
    pub device: u8,
    pub data_in: Vec<u8>,
}

impl AtaCompletion {
    /// DRDY | DSC, error 0, registers zero.
    pub fn good() -> Self {
        Self::with_data(Vec::new())
    }

    pub fn with_data(data_in: Vec<u8>) -> Self {
        Self {
            status: STATUS_GOOD,
            error: 0,
            count: 0,
            lba: 0,
            device: 0,
            data_in,
        }
    }

    /// A successful command that reports `lba` (READ NATIVE MAX ADDRESS).
    pub fn with_lba(lba: u64) -> Self {
        Self {
            lba: lba & taskfile::LBA48_MASK,
            device: lba_device(lba),
            ..Self::good()
        }
    }

    /// A failed command: ERR with `error`, and the LBA the error outputs name.
    pub fn failed(error: u8, lba: u64) -> Self {
        Self {
            status: STATUS_ERROR,
            error,
            ..Self::with_lba(lba)
        }
    }

    pub fn is_error(&self) -> bool {
        self.status & status::ERR != 0
    }
}

/// The device register of an output that reports `lba`: LBA bit (6) set, bits 0..4 the
/// LBA's bits 24..28 as 28-bit commands read them (ACS-3, 28-bit and 48-bit normal/error outputs).
fn lba_device(lba: u64) -> u8 {
    0x40 | ((lba >> 24) & 0x0f) as u8
}

/// One medium operation for the HBA, in bytes (512-byte sectors × n). For NCQ (READ/WRITE
/// FPDMA QUEUED) `ncq_tag` is the tag from count bits 3..8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtaIo {
    pub kind: MediumIoKind,
    pub offset: u64,
    pub len: u64,
    /// The write must be on stable storage before completion: a FUA command, or the host
    /// turned the write cache off (SET FEATURES 82h).
    pub fua: bool,
    pub ncq_tag: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AtaResult {
    Complete(AtaCompletion),
    Io(AtaIo),
}

/// Why a command fails; each maps to the error register bits ACS-3 gives for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AtaError {
    #[error("command aborted")]
    Aborted,
    #[error("command aborted at sector {lba}")]
    AbortedAt { lba: u64 },
    #[error("sector {lba} is outside the medium")]
    IdNotFound { lba: u64 },
    #[error("uncorrectable data at sector {lba}")]
    Uncorrectable { lba: u64 },
}

impl AtaError {
    pub fn completion(self) -> AtaCompletion {
        match self {
            AtaError::Aborted => AtaCompletion::failed(error::ABRT, 0),
            AtaError::AbortedAt { lba } => AtaCompletion::failed(error::ABRT, lba),
            AtaError::IdNotFound { lba } => AtaCompletion::failed(error::IDNF, lba),
            AtaError::Uncorrectable { lba } => AtaCompletion::failed(error::UNC, lba),
        }
    }
}

type CmdResult = Result<AtaResult, AtaError>;

fn complete(c: AtaCompletion) -> CmdResult {
    Ok(AtaResult::Complete(c))
}

fn good() -> CmdResult {
    complete(AtaCompletion::good())
}

/// The signature a device puts in count/LBA after reset and diagnostics (ACS-3,
/// Signature and persistence): count 01h, LBA low 01h, LBA mid/high 00h/00h for ATA, 14h/EBh for ATAPI.
const SIG_ATA_LBA: u64 = 0x00_0001;
const SIG_ATAPI_LBA: u64 = 0xeb_1401;

#[derive(Debug)]
pub enum AtaDevice {
    Disk(AtaDisk),
    Atapi(AtapiDrive),
}

impl AtaDevice {
    pub fn disk(p: AtaDiskParams) -> AtaDevice {
        AtaDevice::Disk(AtaDisk::new(p))
    }

    /// An empty CD/DVD drive.
    pub fn atapi(p: AtapiParams) -> AtaDevice {
        AtaDevice::Atapi(AtapiDrive::new(p))
    }

    fn signature_lba(&self) -> u64 {
        match self {
            AtaDevice::Disk(_) => SIG_ATA_LBA,
            AtaDevice::Atapi(_) => SIG_ATAPI_LBA,
        }
    }

    /// The signature the HBA reports after reset (AHCI 1.3 3.3.9 PxSIG: LBA high, mid,
    /// low, count from the first D2H FIS): disk 0x0000_0101, ATAPI 0xEB14_0101.
    pub fn signature(&self) -> u32 {
        ((self.signature_lba() as u32) << 8) | 0x01
    }

    /// The signature as the registers hold it: count 1, lba 0x000001 or 0xEB1401.
    pub fn signature_taskfile(&self) -> Taskfile {
        Taskfile {
            command: 0,
            features: 0,
            count: 1,
            lba: self.signature_lba(),
            device: 0,
        }
    }

    /// The registers after power-on, COMRESET, DEVICE RESET or EXECUTE DEVICE DIAGNOSTIC:
    /// the signature, error 01h (passed), status DRDY|DSC for a disk and 00h for a packet
    /// device (ATA8-APT: DRDY stays clear until IDENTIFY PACKET DEVICE; QEMU does the same).
    pub fn reset_registers(&self) -> AtaCompletion {
        signature_completion(self.signature_lba())
    }

    /// How the command's data moves: a pure function of the command (and for PACKET,
    /// features bit 0 = DMA).
    pub fn protocol(&self, tf: &Taskfile) -> Protocol {
        match self {
            AtaDevice::Disk(d) => d.protocol(tf),
            AtaDevice::Atapi(a) => a.protocol(tf),
        }
    }

    /// The bytes of parameters `execute` reads from `data_out` for this command (DATA SET
    /// MANAGEMENT: count × 512), so a DMA HBA knows to fetch them first; 0 for everything
    /// else, including PACKET (its data-out length lives in the CDB, up to the HBA's PRDT).
    pub fn parameter_len(&self, tf: &Taskfile) -> usize {
        match self {
            AtaDevice::Disk(d) => d.parameter_len(tf),
            AtaDevice::Atapi(_) => 0,
        }
    }

    /// Runs a command. `packet` is the 12/16-byte ATAPI CDB (AHCI's ACMD), used only for
    /// PACKET.
    pub fn execute(
        &mut self,
        tf: &Taskfile,
        packet: &[u8],
        data_out: &mut dyn DataOut,
    ) -> AtaResult {
        match self {
            AtaDevice::Disk(d) => d.execute(tf, data_out),
            AtaDevice::Atapi(a) => a.execute(tf, packet, data_out),
        }
    }

    /// The HBA finished an [`AtaIo`] (NCQ too); gives the completion to report.
    pub fn io_done(&mut self, io: &AtaIo, result: Result<(), IoFailure>) -> AtaCompletion {
        match self {
            AtaDevice::Disk(d) => d.io_done(io, result),
            AtaDevice::Atapi(a) => a.io_done(io, result),
        }
    }

    /// Power-on / COMRESET / DEVICE RESET defaults.
    pub fn reset(&mut self) {
        match self {
            AtaDevice::Disk(d) => d.reset(),
            AtaDevice::Atapi(a) => a.reset(),
        }
    }

    pub fn as_atapi_mut(&mut self) -> Option<&mut AtapiDrive> {
        match self {
            AtaDevice::Atapi(a) => Some(a),
            AtaDevice::Disk(_) => None,
        }
    }

    pub fn as_disk_mut(&mut self) -> Option<&mut AtaDisk> {
        match self {
            AtaDevice::Disk(d) => Some(d),
            AtaDevice::Atapi(_) => None,
        }
    }

    pub fn is_atapi(&self) -> bool {
        matches!(self, AtaDevice::Atapi(_))
    }

    /// Sectors per DRQ block of READ/WRITE MULTIPLE (0: multiple mode off); IDE uses it.
    pub fn multiple_count(&self) -> u16 {
        match self {
            AtaDevice::Disk(d) => d.multiple_count(),
            AtaDevice::Atapi(_) => 0,
        }
    }

    pub fn write_cache_enabled(&self) -> bool {
        match self {
            AtaDevice::Disk(d) => d.write_cache_enabled(),
            AtaDevice::Atapi(_) => false,
        }
    }
}

/// The reset/diagnostic registers for a device with this signature.
fn signature_completion(sig_lba: u64) -> AtaCompletion {
    AtaCompletion {
        status: if sig_lba == SIG_ATAPI_LBA {
            0
        } else {
            STATUS_GOOD
        },
        error: error::DIAG_PASSED,
        count: 1,
        lba: sig_lba,
        device: 0,
        data_in: Vec::new(),
    }
}
