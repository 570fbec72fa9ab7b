//! The shared SCSI target: logical units by LUN, a disk (SBC-3) and a CD/DVD (MMC-6)
//! unit, and the commands they answer. It is pure: no I/O, no guest memory, no KVM. The
//! controllers (virtio-scsi, LSI, BusLogic, USB mass storage and UAS, ATAPI for its packet
//! commands) own the data phase and the medium I/O; this module decides what a CDB means.
//!
//! # Interface for transports
//!
//! ```text
//! ScsiTarget::new() -> ScsiTarget
//! ScsiTarget::attach(&mut self, lun: u16, unit: LogicalUnit) -> Result<(), ScsiError>
//! ScsiTarget::detach(&mut self, lun: u16) -> Option<LogicalUnit>
//! ScsiTarget::luns(&self) -> Vec<u16>
//! ScsiTarget::unit(&self, lun: u16) -> Option<&LogicalUnit>
//! ScsiTarget::unit_mut(&mut self, lun: u16) -> Option<&mut LogicalUnit>
//! ScsiTarget::reset(&mut self)                          // bus/target reset: UA 29/00 again
//! ScsiTarget::execute(&mut self, lun, cdb: &[u8], data_out: &mut dyn DataOut) -> ScsiResult
//! ScsiTarget::io_done(&mut self, lun, io: &MediumIo, result: Result<(), IoFailure>) -> Completion
//!
//! DiskUnit::new(DiskParams { size_bytes, block_size, nonrotational, discard, read_only,
//!                            write_cache, vendor, product, serial, wwn })
//!     -> Result<DiskUnit, ScsiError>
//! DiskUnit::write_cache_enabled(&self) -> bool      // the guest's caching page WCE
//! CdUnit::new(CdParams { vendor, product, serial, atapi }) -> CdUnit   // empty drive
//! CdUnit::insert(&mut self, size_bytes) / eject() / request_eject() -> bool / is_loaded()
//! LogicalUnit::{Disk(DiskUnit), Cd(CdUnit)}, as_disk_mut(), as_cd(), as_cd_mut(), reset()
//! ```
//!
//! `execute` returns either a finished [`Completion`] (status, sense, Data-In already cut to
//! the CDB's allocation length) or a [`MediumIo`] the transport performs: for a `Read` it
//! moves `len` bytes from the medium at byte `offset` to the guest's Data-In buffer, for a
//! `Write` it moves them from the Data-Out buffer (the target never reads WRITE payloads), then
//! it calls `io_done`, whose completion carries no data. `data_out` is read only for commands
//! whose parameters travel in the Data-Out buffer (MODE SELECT, UNMAP, WRITE SAME's block).
//! A CHECK CONDITION completion carries its sense (autosense); the same sense stays available
//! to one following REQUEST SENSE for initiators without autosense (ATAPI).
//!
//! Every unit starts with a POWER ON/RESET unit attention (06/29/00), reported once; so does
//! `reset`. A CD unit adds MEDIUM CHANGED (06/28/00) when a medium is inserted or the guest
//! closes the tray on one, unless a POWER ON/RESET is still pending (it covers that).

mod cdb;
mod cdrom;
mod disk;
mod inquiry;
mod mode;
mod sense;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

pub use cdrom::{CdParams, CdUnit};
pub use disk::{DiskParams, DiskUnit};
pub use sense::{key as sense_key, ScsiStatus, Sense};

use cdb::{op, Cdb};
use sense::SenseState;

/// The highest LUN REPORT LUNS can describe with flat space addressing (SAM-5, LUN addressing).
pub const MAX_LUN: u16 = 0x3fff;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScsiError {
    #[error("LUN {0} is already attached")]
    LunInUse(u16),
    #[error("LUN {0} is out of range (the highest is {MAX_LUN})")]
    LunOutOfRange(u16),
    #[error("unsupported logical block size {0} (use 512 or 4096)")]
    BlockSize(u32),
}

/// The initiator's Data-Out buffer, read lazily and in order.
pub trait DataOut {
    /// Bytes not yet read.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies up to `buf.len()` bytes, returning how many.
    fn read(&mut self, buf: &mut [u8]) -> usize;
}

impl DataOut for &[u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn read(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(<[u8]>::len(self));
        let (head, tail) = self.split_at(n);
        buf[..n].copy_from_slice(head);
        *self = tail;
        n
    }
}

/// Reads exactly `n` bytes of parameters, or None if the Data-Out buffer is shorter.
fn read_params(data_out: &mut dyn DataOut, n: usize) -> Option<Vec<u8>> {
    if data_out.len() < n {
        return None;
    }
    let mut v = vec![0u8; n];
    (data_out.read(&mut v) == n).then_some(v)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub status: ScsiStatus,
    pub sense: Option<Sense>,
    /// Data-In, already cut to the CDB's allocation length.
    pub data_in: Vec<u8>,
}

impl Completion {
    pub fn good() -> Self {
        Self::with_data(Vec::new())
    }

    pub fn with_data(data_in: Vec<u8>) -> Self {
        Self {
            status: ScsiStatus::Good,
            sense: None,
            data_in,
        }
    }

    pub fn check(sense: Sense) -> Self {
        Self {
            status: ScsiStatus::CheckCondition,
            sense: Some(sense),
            data_in: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScsiResult {
    Complete(Completion),
    Io(MediumIo),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediumIoKind {
    Read,
    Write,
    Flush,
    /// Byte ranges (offset, length) the guest no longer needs; reads of them afterwards may
    /// return anything (LBPRZ is 0).
    Discard(Vec<(u64, u64)>),
    WriteZeroes,
}

/// One medium operation for the transport. `offset`/`len` are in bytes; for `Discard` they
/// span the lowest to the highest range, and the ranges are what counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediumIo {
    pub kind: MediumIoKind,
    pub offset: u64,
    pub len: u64,
    /// The write must be on stable storage before completion: the CDB's FUA bit, or the
    /// guest turned the write cache off (caching page WCE=0).
    pub fua: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoFailure {
    /// EIO: MEDIUM ERROR (03/11/00 on reads, 03/0C/00 otherwise).
    Medium,
    /// ENOSPC: DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT (07/27/07, SBC-3 thin
    /// provisioning).
    NoSpace,
    /// Anything else: HARDWARE ERROR / INTERNAL TARGET FAILURE (04/44/00).
    Other,
}

impl IoFailure {
    /// What an image-layer error becomes for the guest (the host's own words go to the log).
    pub fn from_storage(e: &ferry_storage::StorageError) -> Self {
        tracing::warn!("disk I/O: {e}");
        match e {
            ferry_storage::StorageError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::StorageFull =>
            {
                Self::no_space()
            }
            _ => Self::Medium,
        }
    }

    /// What an I/O engine's completion error becomes for the guest.
    pub fn from_engine(e: &ferry_storage::io::IoError) -> Self {
        if e.is_no_space() {
            return Self::no_space();
        }
        tracing::warn!("disk I/O: {e}");
        Self::Medium
    }

    fn no_space() -> Self {
        tracing::error!(
            "the host disk is full: free space on it; the guest sees write errors until then"
        );
        Self::NoSpace
    }
}

#[derive(Debug)]
pub enum LogicalUnit {
    Disk(DiskUnit),
    Cd(CdUnit),
}

type CmdResult = Result<ScsiResult, Sense>;

/// Cuts Data-In to the allocation length.
fn data_in(mut data: Vec<u8>, alloc: u64) -> CmdResult {
    data.truncate(usize::try_from(alloc).unwrap_or(usize::MAX));
    Ok(ScsiResult::Complete(Completion::with_data(data)))
}

fn good() -> CmdResult {
    Ok(ScsiResult::Complete(Completion::good()))
}

impl LogicalUnit {
    pub fn as_disk_mut(&mut self) -> Option<&mut DiskUnit> {
        match self {
            LogicalUnit::Disk(d) => Some(d),
            LogicalUnit::Cd(_) => None,
        }
    }

    pub fn as_cd(&self) -> Option<&CdUnit> {
        match self {
            LogicalUnit::Cd(c) => Some(c),
            LogicalUnit::Disk(_) => None,
        }
    }

    /// For the host's medium changes: `insert`, `eject`, `request_eject`.
    pub fn as_cd_mut(&mut self) -> Option<&mut CdUnit> {
        match self {
            LogicalUnit::Cd(c) => Some(c),
            LogicalUnit::Disk(_) => None,
        }
    }

    fn sense_state(&mut self) -> &mut SenseState {
        match self {
            LogicalUnit::Disk(d) => &mut d.sense,
            LogicalUnit::Cd(c) => &mut c.sense,
        }
    }

    fn block_size(&self) -> u64 {
        match self {
            LogicalUnit::Disk(d) => u64::from(d.block_size()),
            LogicalUnit::Cd(_) => cdrom::BLOCK_SIZE,
        }
    }

    /// Bus, target or LUN reset (SAM-5): a fresh POWER ON/RESET unit attention, and
    /// medium removal allowed again (SPC-4, PREVENT ALLOW MEDIUM REMOVAL).
    pub fn reset(&mut self) {
        self.sense_state().raise(Sense::POWER_ON_RESET);
        if let LogicalUnit::Cd(c) = self {
            c.allow_removal();
        }
    }

    fn execute(&mut self, raw: &[u8], data_out: &mut dyn DataOut) -> ScsiResult {
        let result = match Cdb::parse(raw) {
            Ok(cdb) => self.execute_cdb(&cdb, data_out),
            Err(sense) => Err(sense),
        };
        match result {
            Ok(r) => {
                self.sense_state().set_last(None);
                r
            }
            Err(sense) => {
                self.sense_state().set_last(Some(sense));
                ScsiResult::Complete(Completion::check(sense))
            }
        }
    }

    fn execute_cdb(&mut self, cdb: &Cdb, data_out: &mut dyn DataOut) -> CmdResult {
        let opcode = cdb.opcode();
        if opcode == op::REQUEST_SENSE {
            return self.request_sense(cdb);
        }
        // SPC-4 (unit attention condition): a pending unit attention fails the next command,
        // except INQUIRY, REPORT LUNS and REQUEST SENSE; a CD/DVD unit also lets GET
        // CONFIGURATION and GET EVENT STATUS NOTIFICATION through, as QEMU's ATAPI does
        // (ALLOW_UA), so a guest polling for media events sees NEW MEDIA first.
        let ua_exempt = match self {
            LogicalUnit::Disk(_) => matches!(opcode, op::INQUIRY | op::REPORT_LUNS),
            LogicalUnit::Cd(_) => matches!(
                opcode,
                op::INQUIRY
                    | op::REPORT_LUNS
                    | op::GET_CONFIGURATION
                    | op::GET_EVENT_STATUS_NOTIFICATION
            ),
        };
        if !ua_exempt {
            if let Some(ua) = self.sense_state().take_attention() {
                return Err(ua);
            }
        }
        match self {
            LogicalUnit::Disk(d) => d.execute(cdb, data_out),
            LogicalUnit::Cd(c) => c.execute(cdb),
        }
    }

    fn request_sense(&mut self, cdb: &Cdb) -> CmdResult {
        let descriptor = cdb.byte(1) & 1 != 0;
        let alloc = u64::from(cdb.byte(4));
        let not_ready = match self {
            LogicalUnit::Cd(c) if !c.is_loaded() => Some(c.not_ready()),
            _ => None,
        };
        let sense = self
            .sense_state()
            .take_for_request_sense()
            .or(not_ready)
            .unwrap_or(Sense::NO_SENSE);
        let data = if descriptor {
            sense.descriptor_format()
        } else {
            sense.fixed_format().to_vec()
        };
        data_in(data, alloc)
    }

    fn io_done(&mut self, io: &MediumIo, result: Result<(), IoFailure>) -> Completion {
        let sense = match result {
            Ok(()) => {
                self.sense_state().set_last(None);
                return Completion::good();
            }
            Err(IoFailure::Medium) => {
                let lba = io.offset / self.block_size();
                let s = match io.kind {
                    MediumIoKind::Read => Sense::UNRECOVERED_READ_ERROR,
                    _ => Sense::WRITE_ERROR,
                };
                s.with_info(lba)
            }
            Err(IoFailure::NoSpace) => Sense::SPACE_ALLOCATION_FAILED,
            Err(IoFailure::Other) => Sense::INTERNAL_TARGET_FAILURE,
        };
        self.sense_state().set_last(Some(sense));
        Completion::check(sense)
    }
}

/// Logical units by LUN, plus what the target answers itself (REPORT LUNS, commands to a
/// LUN nobody attached).
#[derive(Debug, Default)]
pub struct ScsiTarget {
    units: BTreeMap<u16, LogicalUnit>,
}

impl ScsiTarget {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn attach(&mut self, lun: u16, unit: LogicalUnit) -> Result<(), ScsiError> {
        if lun > MAX_LUN {
            return Err(ScsiError::LunOutOfRange(lun));
        }
        if self.units.contains_key(&lun) {
            return Err(ScsiError::LunInUse(lun));
        }
        self.units.insert(lun, unit);
        Ok(())
    }

    pub fn detach(&mut self, lun: u16) -> Option<LogicalUnit> {
        self.units.remove(&lun)
    }

    pub fn luns(&self) -> Vec<u16> {
        self.units.keys().copied().collect()
    }

    pub fn unit(&self, lun: u16) -> Option<&LogicalUnit> {
        self.units.get(&lun)
    }

    pub fn unit_mut(&mut self, lun: u16) -> Option<&mut LogicalUnit> {
        self.units.get_mut(&lun)
    }

    pub fn reset(&mut self) {
        self.units.values_mut().for_each(LogicalUnit::reset);
    }

    pub fn execute(&mut self, lun: u16, cdb: &[u8], data_out: &mut dyn DataOut) -> ScsiResult {
        // SPC-4, REPORT LUNS: it describes the whole target, whichever LUN it is sent to.
        if cdb.first() == Some(&op::REPORT_LUNS) {
            let result = Cdb::parse(cdb).and_then(|c| self.report_luns(&c));
            return result.unwrap_or_else(|s| ScsiResult::Complete(Completion::check(s)));
        }
        match self.units.get_mut(&lun) {
            Some(unit) => unit.execute(cdb, data_out),
            None => {
                let result = Cdb::parse(cdb).and_then(|c| missing_lun(&c));
                result.unwrap_or_else(|s| ScsiResult::Complete(Completion::check(s)))
            }
        }
    }

    pub fn io_done(
        &mut self,
        lun: u16,
        io: &MediumIo,
        result: Result<(), IoFailure>,
    ) -> Completion {
        match self.units.get_mut(&lun) {
            Some(unit) => unit.io_done(io, result),
            // Detached while the I/O ran.
            None => Completion::check(Sense::LUN_NOT_SUPPORTED),
        }
    }

    /// SPC-4, REPORT LUNS. LUNs below 256 use peripheral device addressing, the rest flat space
    /// addressing (SAM-5), as Linux's int_to_scsilun() expects.
    fn report_luns(&self, cdb: &Cdb) -> CmdResult {
        let alloc = cdb.be32(6);
        // SPC-4, REPORT LUNS: an allocation length below 4 cannot hold the list length.
        if alloc < 4 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let luns: Vec<u16> = match cdb.byte(2) {
            // All logical units (0x02 adds well-known LUNs, of which there are none).
            0x00 | 0x02 => self.luns(),
            // Well-known and administrative LUNs only: none.
            0x01 | 0x10 | 0x11 => Vec::new(),
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        };
        let mut data = Vec::with_capacity(8 + luns.len() * 8);
        data.extend_from_slice(&((luns.len() * 8) as u32).to_be_bytes());
        data.extend_from_slice(&[0; 4]);
        for lun in luns {
            let first = if lun < 256 {
                0
            } else {
                0x40 | (lun >> 8) as u8
            };
            data.extend_from_slice(&[first, lun as u8, 0, 0, 0, 0, 0, 0]);
        }
        data_in(data, alloc)
    }
}

/// A LUN with no unit: SPC-4 says INQUIRY answers with peripheral qualifier 3 (not
/// capable of supporting a device at this LUN), and REQUEST SENSE returns GOOD
/// with LOGICAL UNIT NOT SUPPORTED in its data; everything else fails with that sense.
fn missing_lun(cdb: &Cdb) -> CmdResult {
    match cdb.opcode() {
        op::INQUIRY => inquiry::missing_lun(cdb),
        op::REQUEST_SENSE => {
            let sense = Sense::LUN_NOT_SUPPORTED;
            let data = if cdb.byte(1) & 1 != 0 {
                sense.descriptor_format()
            } else {
                sense.fixed_format().to_vec()
            };
            data_in(data, u64::from(cdb.byte(4)))
        }
        _ => Err(Sense::LUN_NOT_SUPPORTED),
    }
}
