//! The ATAPI CD/DVD drive (ATA8-APT, ACS-3 PACKET feature set): the ATA commands a packet
//! device answers itself, and PACKET, whose CDB runs on the shared SCSI target's CD/DVD
//! unit (MMC-6), so there is one implementation of MMC for every transport.

use super::identify;
use super::taskfile::{cmd, Taskfile};
use super::xfer::TransferMode;
use super::{
    error, signature_completion, AtaCompletion, AtaError, AtaIo, AtaResult, DataOut, IoFailure,
    Protocol, SIG_ATAPI_LBA, STATUS_ERROR, STATUS_GOOD,
};
use crate::scsi::{
    CdParams, CdUnit, Completion, LogicalUnit, MediumIo, ScsiResult, ScsiStatus, ScsiTarget,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtapiParams {
    pub model: String,
    pub serial: String,
    pub firmware: String,
}

/// The LUN of the CD/DVD unit: ATAPI has no LUNs, the device is the unit.
const LUN: u16 = 0;

/// Interrupt reason in the count register at the end of a packet command (ATA8-APT
/// 5.13.5): I/O (bit 1) and C/D (bit 0) both set: status to the host.
const INTERRUPT_REASON_STATUS: u16 = 0x03;

/// INQUIRY's vendor field holds 8 characters.
const VENDOR_LEN: usize = 8;
const DEFAULT_VENDOR: &str = "FERRY";

#[derive(Debug)]
pub struct AtapiDrive {
    target: ScsiTarget,
    model: String,
    serial: String,
    firmware: String,
    xfer: TransferMode,
}

/// INQUIRY's vendor and product from the ATA model string: "VENDOR PRODUCT" when the first
/// word fits the vendor field, as real drives name themselves in both; else ours.
fn vendor_product(model: &str) -> (&str, &str) {
    match model.trim().split_once(' ') {
        Some((v, p)) if !v.is_empty() && v.len() <= VENDOR_LEN => (v, p.trim()),
        _ => (DEFAULT_VENDOR, model.trim()),
    }
}

impl AtapiDrive {
    /// An empty drive with its POWER ON unit attention pending.
    pub fn new(p: AtapiParams) -> Self {
        let (vendor, product) = vendor_product(&p.model);
        let cd = CdUnit::new(CdParams {
            vendor,
            product,
            serial: p.serial.clone(),
            atapi: true,
        });
        let mut target = ScsiTarget::new();
        // A new target has every LUN free, so this cannot fail; log rather than panic.
        if let Err(e) = target.attach(LUN, LogicalUnit::Cd(cd)) {
            tracing::error!("ATAPI: {e}");
        }
        Self {
            target,
            model: p.model,
            serial: p.serial,
            firmware: p.firmware,
            xfer: TransferMode::default(),
        }
    }

    fn cd(&self) -> Option<&CdUnit> {
        self.target.unit(LUN).and_then(LogicalUnit::as_cd)
    }

    fn cd_mut(&mut self) -> Option<&mut CdUnit> {
        self.target.unit_mut(LUN).and_then(LogicalUnit::as_cd_mut)
    }

    /// Loads a medium of `size_bytes` (the guest sees NEW MEDIA and MEDIUM CHANGED).
    pub fn insert(&mut self, size_bytes: u64) {
        if let Some(cd) = self.cd_mut() {
            cd.insert(size_bytes);
        }
    }

    /// Removes the medium whatever the guest prevents.
    pub fn eject(&mut self) {
        if let Some(cd) = self.cd_mut() {
            cd.eject();
        }
    }

    /// Ejects unless the guest prevents removal (then it is told and this returns false).
    pub fn request_eject(&mut self) -> bool {
        self.cd_mut().is_some_and(|cd| cd.request_eject())
    }

    /// A medium is in the drive and the tray closed.
    pub fn is_loaded(&self) -> bool {
        self.cd().is_some_and(CdUnit::is_loaded)
    }

    pub fn tray_open(&self) -> bool {
        self.cd().is_some_and(CdUnit::tray_open)
    }

    /// Power-on, COMRESET or DEVICE RESET: the unit's POWER ON/RESET unit attention
    /// (ATA8-APT: the reset is reported as 06/29/00) and the default transfer mode.
    pub fn reset(&mut self) {
        self.target.reset();
        self.xfer = TransferMode::default();
    }

    pub(crate) fn protocol(&self, tf: &Taskfile) -> Protocol {
        match tf.command {
            // Features bit 0: the packet's data moves by DMA (ATA8-APT, PACKET command).
            cmd::PACKET => Protocol::Packet {
                dma: tf.features & 1 != 0,
            },
            cmd::IDENTIFY_PACKET_DEVICE => Protocol::PioIn,
            _ => Protocol::NonData,
        }
    }

    pub(crate) fn execute(
        &mut self,
        tf: &Taskfile,
        packet: &[u8],
        data_out: &mut dyn DataOut,
    ) -> AtaResult {
        let r = match tf.command {
            cmd::PACKET => Ok(self.packet(packet, data_out)),
            // ACS-3 IDENTIFY DEVICE (and ATA-4 8.27.5.2 for READ SECTORS (EXT), as QEMU does): a
            // packet device aborts these and puts its signature in the registers, which is
            // how a host that guessed wrong learns it is talking to ATAPI.
            cmd::IDENTIFY_DEVICE
            | cmd::READ_SECTORS
            | cmd::READ_SECTORS_NORETRY
            | cmd::READ_SECTORS_EXT => Ok(AtaResult::Complete(AtaCompletion {
                status: STATUS_ERROR,
                error: error::ABRT,
                ..signature_completion(SIG_ATAPI_LBA)
            })),
            cmd::IDENTIFY_PACKET_DEVICE => Ok(AtaResult::Complete(AtaCompletion::with_data(
                identify::packet(&self.serial, &self.firmware, &self.model, &self.xfer),
            ))),
            cmd::DEVICE_RESET => {
                self.reset();
                Ok(AtaResult::Complete(signature_completion(SIG_ATAPI_LBA)))
            }
            cmd::EXECUTE_DEVICE_DIAGNOSTIC => {
                Ok(AtaResult::Complete(signature_completion(SIG_ATAPI_LBA)))
            }
            cmd::SET_FEATURES => self.set_features(tf),
            cmd::CHECK_POWER_MODE => Ok(AtaResult::Complete(AtaCompletion {
                count: 0xff,
                ..AtaCompletion::good()
            })),
            // The power management feature set is mandatory for packet devices (IDENTIFY
            // PACKET word 82 bit 3); a virtual drive has no power state to change.
            cmd::IDLE
            | cmd::IDLE_IMMEDIATE
            | cmd::STANDBY
            | cmd::STANDBY_IMMEDIATE
            | cmd::SLEEP => Ok(AtaResult::Complete(AtaCompletion::good())),
            // NOP always aborts (ACS-3 NOP).
            other => {
                tracing::debug!(opcode = other, "ATAPI: unsupported ATA command");
                Err(AtaError::Aborted)
            }
        };
        r.unwrap_or_else(|e| AtaResult::Complete(e.completion()))
    }

    /// SET FEATURES for a packet device: the transfer mode and SATA features.
    fn set_features(&mut self, tf: &Taskfile) -> Result<AtaResult, AtaError> {
        match tf.feature() {
            0x03 if self.xfer.set(tf.count as u8) => {}
            0x10 | 0x90 => {}
            _ => return Err(AtaError::Aborted),
        }
        Ok(AtaResult::Complete(AtaCompletion::good()))
    }

    fn packet(&mut self, packet: &[u8], data_out: &mut dyn DataOut) -> AtaResult {
        match self.target.execute(LUN, packet, data_out) {
            ScsiResult::Io(m) => AtaResult::Io(AtaIo {
                kind: m.kind,
                offset: m.offset,
                len: m.len,
                fua: m.fua,
                ncq_tag: None,
            }),
            ScsiResult::Complete(c) => AtaResult::Complete(packet_completion(c)),
        }
    }

    pub(crate) fn io_done(&mut self, io: &AtaIo, result: Result<(), IoFailure>) -> AtaCompletion {
        let m = MediumIo {
            kind: io.kind.clone(),
            offset: io.offset,
            len: io.len,
            fua: io.fua,
        };
        packet_completion(self.target.io_done(LUN, &m, result))
    }
}

/// A packet command's end (ATA8-APT, PACKET command normal outputs): status with the interrupt reason "status" in
/// count; on CHECK CONDITION ERR, and the sense key in error bits 4..8 (QEMU's
/// ide_atapi_cmd_error does the same). The sense stays for the REQUEST SENSE that follows.
fn packet_completion(c: Completion) -> AtaCompletion {
    let (status, error) = match (c.status, c.sense) {
        (ScsiStatus::Good, _) => (STATUS_GOOD, 0),
        (_, Some(s)) => (STATUS_ERROR, (s.key & 0x0f) << 4),
        // A failure without sense (not produced by the target): plain ABRT.
        (_, None) => (STATUS_ERROR, error::ABRT),
    };
    AtaCompletion {
        status,
        error,
        count: INTERRUPT_REASON_STATUS,
        lba: 0,
        device: 0,
        data_in: c.data_in,
    }
}
