//! The ATA disk (ACS-3 general feature set, 48-bit addressing, NCQ, TRIM, SMART, GPL):
//! decodes each command into an [`AtaIo`] for the HBA or a finished completion.

use super::geometry::Geometry;
use super::identify::{self, MAX_DSM_BLOCKS, MAX_MULTIPLE};
use super::log::{self, NcqErrorLog};
use super::taskfile::{cmd, Taskfile, DEVICE_FUA, LBA48_MASK};
use super::xfer::TransferMode;
use super::{
    complete, dsm, good, signature_completion, smart, AtaCompletion, AtaError, AtaIo, AtaResult,
    CmdResult, DataOut, IoFailure, MediumIoKind, Protocol, SECTOR_SIZE, SIG_ATA_LBA,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtaDiskParams {
    pub size_bytes: u64,
    pub nonrotational: bool,
    pub discard: bool,
    pub read_only: bool,
    pub model: String,
    pub serial: String,
    pub firmware: String,
    pub ncq: bool,
}

/// The largest 28-bit LBA plus one (ACS-3, 28-bit addressing): what 28-bit commands can address.
const LBA28_LIMIT: u64 = 1 << 28;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Addressing {
    Lba28,
    Lba48,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    /// READ VERIFY SECTORS: the range is checked, nothing moves.
    Verify,
}

/// One of the read/write/verify commands, as its opcode defines it.
#[derive(Debug, Clone, Copy)]
struct RwCommand {
    access: Access,
    addressing: Addressing,
    /// READ/WRITE MULTIPLE: needs SET MULTIPLE MODE first.
    multiple: bool,
    /// The FUA EXT writes (ACS-3 WRITE DMA FUA EXT, WRITE MULTIPLE FUA EXT).
    fua: bool,
    protocol: Protocol,
}

fn rw_command(opcode: u8) -> Option<RwCommand> {
    use Access::*;
    use Addressing::*;
    use Protocol::*;
    let (access, addressing, multiple, fua, protocol) = match opcode {
        cmd::READ_SECTORS | cmd::READ_SECTORS_NORETRY => (Read, Lba28, false, false, PioIn),
        cmd::READ_SECTORS_EXT => (Read, Lba48, false, false, PioIn),
        cmd::READ_MULTIPLE => (Read, Lba28, true, false, PioIn),
        cmd::READ_MULTIPLE_EXT => (Read, Lba48, true, false, PioIn),
        cmd::READ_DMA | cmd::READ_DMA_NORETRY => (Read, Lba28, false, false, Dma),
        cmd::READ_DMA_EXT => (Read, Lba48, false, false, Dma),
        cmd::WRITE_SECTORS | cmd::WRITE_SECTORS_NORETRY => (Write, Lba28, false, false, PioOut),
        cmd::WRITE_SECTORS_EXT => (Write, Lba48, false, false, PioOut),
        cmd::WRITE_MULTIPLE => (Write, Lba28, true, false, PioOut),
        cmd::WRITE_MULTIPLE_EXT => (Write, Lba48, true, false, PioOut),
        cmd::WRITE_MULTIPLE_FUA_EXT => (Write, Lba48, true, true, PioOut),
        cmd::WRITE_DMA | cmd::WRITE_DMA_NORETRY => (Write, Lba28, false, false, Dma),
        cmd::WRITE_DMA_EXT => (Write, Lba48, false, false, Dma),
        cmd::WRITE_DMA_FUA_EXT => (Write, Lba48, false, true, Dma),
        cmd::READ_VERIFY_SECTORS | cmd::READ_VERIFY_SECTORS_NORETRY => {
            (Verify, Lba28, false, false, NonData)
        }
        cmd::READ_VERIFY_SECTORS_EXT => (Verify, Lba48, false, false, NonData),
        _ => return None,
    };
    Some(RwCommand {
        access,
        addressing,
        multiple,
        fua,
        protocol,
    })
}

fn is_ncq(opcode: u8) -> bool {
    matches!(opcode, cmd::READ_FPDMA_QUEUED | cmd::WRITE_FPDMA_QUEUED)
}

/// The NCQ tag of READ/WRITE FPDMA QUEUED: count bits 3..8 (ACS-3 READ FPDMA QUEUED).
fn ncq_tag(tf: &Taskfile) -> u8 {
    ((tf.count >> 3) & 0x1f) as u8
}

#[derive(Debug)]
pub struct AtaDisk {
    model: String,
    serial: String,
    firmware: String,
    sectors: u64,
    nonrotational: bool,
    discard: bool,
    read_only: bool,
    ncq: bool,
    multiple: u16,
    write_cache: bool,
    lookahead: bool,
    smart: bool,
    xfer: TransferMode,
    geometry: Geometry,
    ncq_log: NcqErrorLog,
}

impl AtaDisk {
    pub fn new(p: AtaDiskParams) -> Self {
        let sectors = p.size_bytes / SECTOR_SIZE;
        let mut d = Self {
            model: p.model,
            serial: p.serial,
            firmware: p.firmware,
            sectors,
            nonrotational: p.nonrotational,
            discard: p.discard,
            read_only: p.read_only,
            ncq: p.ncq,
            multiple: MAX_MULTIPLE,
            write_cache: true,
            lookahead: true,
            smart: true,
            xfer: TransferMode::default(),
            geometry: Geometry::default_for(sectors),
            ncq_log: NcqErrorLog::default(),
        };
        d.reset();
        d
    }

    /// Power-on / COMRESET defaults (ACS-3 SET FEATURES, SET MULTIPLE MODE): write cache
    /// and look-ahead on, multiple mode at its largest (as QEMU), the default transfer mode
    /// and geometry. SMART's state is non-volatile and stays; so does an unread NCQ error
    /// log.
    pub fn reset(&mut self) {
        self.multiple = MAX_MULTIPLE;
        self.write_cache = true;
        self.lookahead = true;
        self.xfer = TransferMode::default();
        self.geometry = Geometry::default_for(self.sectors);
    }

    /// Logical sectors of the disk.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn firmware(&self) -> &str {
        &self.firmware
    }

    pub fn nonrotational(&self) -> bool {
        self.nonrotational
    }

    pub fn discard(&self) -> bool {
        self.discard
    }

    pub fn ncq(&self) -> bool {
        self.ncq
    }

    pub fn multiple_count(&self) -> u16 {
        self.multiple
    }

    pub fn write_cache_enabled(&self) -> bool {
        self.write_cache
    }

    pub fn lookahead_enabled(&self) -> bool {
        self.lookahead
    }

    pub fn smart_enabled(&self) -> bool {
        self.smart
    }

    pub(crate) fn transfer_mode(&self) -> &TransferMode {
        &self.xfer
    }

    pub(crate) fn default_geometry(&self) -> Geometry {
        Geometry::default_for(self.sectors)
    }

    pub(crate) fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub(crate) fn protocol(&self, tf: &Taskfile) -> Protocol {
        if let Some(rw) = rw_command(tf.command) {
            return rw.protocol;
        }
        match tf.command {
            cmd::IDENTIFY_DEVICE | cmd::READ_LOG_EXT => Protocol::PioIn,
            cmd::WRITE_LOG_EXT => Protocol::PioOut,
            cmd::READ_LOG_DMA_EXT => Protocol::Dma,
            // ACS-3: DATA SET MANAGEMENT moves its range entries by DMA.
            cmd::DATA_SET_MANAGEMENT => Protocol::Dma,
            cmd::READ_FPDMA_QUEUED | cmd::WRITE_FPDMA_QUEUED => Protocol::DmaQueued,
            cmd::SMART => match tf.feature() {
                smart::sub::READ_DATA | smart::sub::READ_LOG => Protocol::PioIn,
                smart::sub::WRITE_LOG => Protocol::PioOut,
                _ => Protocol::NonData,
            },
            _ => Protocol::NonData,
        }
    }

    pub(crate) fn parameter_len(&self, tf: &Taskfile) -> usize {
        if tf.command == cmd::DATA_SET_MANAGEMENT && (1..=MAX_DSM_BLOCKS).contains(&tf.count) {
            usize::from(tf.count) * SECTOR_SIZE as usize
        } else {
            0
        }
    }

    pub(crate) fn execute(&mut self, tf: &Taskfile, data_out: &mut dyn DataOut) -> AtaResult {
        match self.dispatch(tf, data_out) {
            Ok(r) => r,
            Err(e) => {
                let c = e.completion();
                if is_ncq(tf.command) && self.ncq {
                    self.ncq_log.record_queued(ncq_tag(tf), &c, tf.features);
                } else {
                    self.ncq_log.record_unqueued(&c);
                }
                AtaResult::Complete(c)
            }
        }
    }

    fn dispatch(&mut self, tf: &Taskfile, data_out: &mut dyn DataOut) -> CmdResult {
        if let Some(rw) = rw_command(tf.command) {
            return self.read_write(tf, rw);
        }
        match tf.command {
            cmd::READ_FPDMA_QUEUED => self.fpdma(tf, Access::Read),
            cmd::WRITE_FPDMA_QUEUED => self.fpdma(tf, Access::Write),
            cmd::IDENTIFY_DEVICE => complete(AtaCompletion::with_data(identify::disk(self))),
            cmd::FLUSH_CACHE | cmd::FLUSH_CACHE_EXT => Ok(AtaResult::Io(AtaIo {
                kind: MediumIoKind::Flush,
                offset: 0,
                len: 0,
                fua: false,
                ncq_tag: None,
            })),
            cmd::DATA_SET_MANAGEMENT => self.data_set_management(tf, data_out),
            cmd::SET_FEATURES => self.set_features(tf),
            cmd::SET_MULTIPLE_MODE => self.set_multiple(tf),
            // ACS-3 CHECK POWER MODE: the device is always active or idle (FFh); the power commands
            // below have no state to change in a virtual disk.
            cmd::CHECK_POWER_MODE => complete(AtaCompletion {
                count: 0xff,
                ..AtaCompletion::good()
            }),
            cmd::IDLE
            | cmd::IDLE_IMMEDIATE
            | cmd::STANDBY
            | cmd::STANDBY_IMMEDIATE
            | cmd::SLEEP => good(),
            cmd::SMART => smart::execute(tf, &mut self.smart),
            cmd::READ_NATIVE_MAX_ADDRESS => {
                let max = self.sectors.saturating_sub(1).min(LBA28_LIMIT - 1);
                complete(AtaCompletion::with_lba(max))
            }
            cmd::READ_NATIVE_MAX_ADDRESS_EXT => {
                let max = self.sectors.saturating_sub(1).min(LBA48_MASK);
                complete(AtaCompletion::with_lba(max))
            }
            cmd::INITIALIZE_DEVICE_PARAMETERS => {
                // ATA-5 INITIALIZE DEVICE PARAMETERS: sectors per track in count, heads - 1 in device bits 0..4.
                let heads = u64::from(tf.device & 0x0f) + 1;
                let spt = u64::from(tf.count & 0xff);
                self.geometry =
                    Geometry::with(self.sectors, heads, spt).ok_or(AtaError::Aborted)?;
                good()
            }
            op if op & 0xf0 == cmd::RECALIBRATE => good(),
            cmd::EXECUTE_DEVICE_DIAGNOSTIC => complete(signature_completion(SIG_ATA_LBA)),
            cmd::READ_LOG_EXT | cmd::READ_LOG_DMA_EXT => {
                let data = log::read_log(tf, &mut self.ncq_log)?;
                complete(AtaCompletion::with_data(data))
            }
            // NOP always aborts (ACS-3 NOP); DEVICE RESET and IDENTIFY PACKET DEVICE belong
            // to packet devices; everything else is not implemented.
            other => {
                tracing::debug!(opcode = other, "ATA disk: unsupported command");
                Err(AtaError::Aborted)
            }
        }
    }

    /// The first sector and sector count of a 28-bit (LBA or CHS) or 48-bit command.
    fn address(&self, tf: &Taskfile, addressing: Addressing) -> Result<(u64, u64), AtaError> {
        match addressing {
            Addressing::Lba48 => Ok((tf.lba48(), tf.count48())),
            Addressing::Lba28 if tf.is_lba_mode() => Ok((tf.lba28(), tf.count28())),
            Addressing::Lba28 => {
                let chs = tf.chs();
                match self.geometry.lba_of(chs) {
                    Some(lba) => Ok((lba, tf.count28())),
                    // An address outside the geometry names no sector (ACS-3, IDNF error bit).
                    None => {
                        let (c, h, s) = chs;
                        let g = self.geometry;
                        let lba = (c * g.heads + h) * g.sectors + s.saturating_sub(1);
                        Err(AtaError::IdNotFound { lba })
                    }
                }
            }
        }
    }

    /// IDNF with the first sector outside the disk when [lba, lba + count) is not inside it.
    fn check_range(&self, lba: u64, count: u64) -> Result<(), AtaError> {
        if lba >= self.sectors {
            return Err(AtaError::IdNotFound { lba });
        }
        if count > self.sectors - lba {
            return Err(AtaError::IdNotFound { lba: self.sectors });
        }
        Ok(())
    }

    fn medium_io(&self, access: Access, lba: u64, count: u64, fua: bool) -> CmdResult {
        let kind = match access {
            Access::Read => MediumIoKind::Read,
            Access::Write => MediumIoKind::Write,
            Access::Verify => return good(),
        };
        // With the write cache off every write is write-through (ACS-3 SET FEATURES 82h).
        let fua = fua || (access == Access::Write && !self.write_cache);
        Ok(AtaResult::Io(AtaIo {
            kind,
            offset: lba * SECTOR_SIZE,
            len: count * SECTOR_SIZE,
            fua,
            ncq_tag: None,
        }))
    }

    fn read_write(&mut self, tf: &Taskfile, rw: RwCommand) -> CmdResult {
        // ACS-3 READ/WRITE MULTIPLE: they abort while multiple mode is off.
        if rw.multiple && self.multiple == 0 {
            return Err(AtaError::Aborted);
        }
        // A read-only medium refuses writes with ABRT: ACS-3 has no write-protect error for
        // fixed disks (WP is for removable media status notification).
        if rw.access == Access::Write && self.read_only {
            return Err(AtaError::Aborted);
        }
        let (lba, count) = self.address(tf, rw.addressing)?;
        self.check_range(lba, count)?;
        self.medium_io(rw.access, lba, count, rw.fua)
    }

    /// READ/WRITE FPDMA QUEUED (ACS-3, SATA 3.x NCQ): sector count in features (0 = 65536),
    /// tag in count bits 3..8, FUA in device bit 7, 48-bit LBA.
    fn fpdma(&mut self, tf: &Taskfile, access: Access) -> CmdResult {
        if !self.ncq {
            return Err(AtaError::Aborted);
        }
        if access == Access::Write && self.read_only {
            return Err(AtaError::Aborted);
        }
        let count = match tf.features {
            0 => 65536,
            n => u64::from(n),
        };
        let lba = tf.lba48();
        self.check_range(lba, count)?;
        let fua = tf.device & DEVICE_FUA != 0;
        let mut r = self.medium_io(access, lba, count, fua)?;
        if let AtaResult::Io(io) = &mut r {
            io.ncq_tag = Some(ncq_tag(tf));
        }
        Ok(r)
    }

    fn data_set_management(&mut self, tf: &Taskfile, data_out: &mut dyn DataOut) -> CmdResult {
        // Features bit 0: TRIM, the only DSM function (IDENTIFY word 169); discarding
        // changes data, so a read-only disk refuses it as it refuses writes.
        if !self.discard || self.read_only || tf.features & 1 == 0 {
            return Err(AtaError::Aborted);
        }
        let ranges = dsm::trim_ranges(tf.count, self.sectors, data_out)?;
        let Some(offset) = ranges.iter().map(|r| r.0).min() else {
            return good();
        };
        let end = ranges.iter().map(|r| r.0 + r.1).max().unwrap_or(offset);
        Ok(AtaResult::Io(AtaIo {
            kind: MediumIoKind::Discard(ranges),
            offset,
            len: end - offset,
            fua: false,
            ncq_tag: None,
        }))
    }

    /// SET FEATURES (ACS-3 SET FEATURES): the subcommand in features.
    fn set_features(&mut self, tf: &Taskfile) -> CmdResult {
        match tf.feature() {
            0x02 => self.write_cache = true,
            0x82 => self.write_cache = false,
            0x03 => {
                if !self.xfer.set(tf.count as u8) {
                    return Err(AtaError::Aborted);
                }
            }
            0xaa => self.lookahead = true,
            0x55 => self.lookahead = false,
            // Enable/disable a SATA feature (count: which one, SATA 3.x SET FEATURES): the link has
            // nothing to tune, so every one is accepted.
            0x10 | 0x90 => {}
            _ => return Err(AtaError::Aborted),
        }
        good()
    }

    /// SET MULTIPLE MODE (ACS-3): a power of two up to word 47's maximum; 0 turns
    /// multiple mode off.
    fn set_multiple(&mut self, tf: &Taskfile) -> CmdResult {
        let n = tf.count & 0xff;
        if n != 0 && (!n.is_power_of_two() || n > MAX_MULTIPLE) {
            return Err(AtaError::Aborted);
        }
        self.multiple = n;
        good()
    }

    pub(crate) fn io_done(&mut self, io: &AtaIo, result: Result<(), IoFailure>) -> AtaCompletion {
        let lba = io.offset / SECTOR_SIZE;
        let e = match result {
            Ok(()) => return AtaCompletion::good(),
            // ACS-3: UNC is a read error (READ commands' error outputs); writes, flushes
            // and trims report ABRT with the failing LBA, as QEMU's ide_rw_error does.
            Err(IoFailure::Medium) if io.kind == MediumIoKind::Read => {
                AtaError::Uncorrectable { lba }
            }
            Err(_) => AtaError::AbortedAt { lba },
        };
        let c = e.completion();
        match io.ncq_tag {
            Some(tag) => {
                let count = (io.len / SECTOR_SIZE) as u16;
                self.ncq_log.record_queued(tag, &c, count);
            }
            None => self.ncq_log.record_unqueued(&c),
        }
        c
    }

    /// Whether log 10h holds an error the host has not read yet.
    pub fn ncq_error_pending(&self) -> bool {
        !self.ncq_log.is_empty()
    }
}
