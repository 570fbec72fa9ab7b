//! Status codes and sense data (SPC-4), and the per-unit record of what REQUEST SENSE
//! reports: the sense of the last failed command and the queued unit attentions.

use std::collections::VecDeque;

/// SCSI status byte (SAM-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ScsiStatus {
    Good = 0x00,
    CheckCondition = 0x02,
    ConditionMet = 0x04,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
    AcaActive = 0x30,
    TaskAborted = 0x40,
}

impl ScsiStatus {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Sense keys (SPC-4).
pub mod key {
    pub const NO_SENSE: u8 = 0x00;
    pub const NOT_READY: u8 = 0x02;
    pub const MEDIUM_ERROR: u8 = 0x03;
    pub const HARDWARE_ERROR: u8 = 0x04;
    pub const ILLEGAL_REQUEST: u8 = 0x05;
    pub const UNIT_ATTENTION: u8 = 0x06;
    pub const DATA_PROTECT: u8 = 0x07;
    pub const ABORTED_COMMAND: u8 = 0x0b;
}

/// One sense condition: key, additional sense code and qualifier, and the optional
/// INFORMATION field (the failing LBA for medium errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    pub info: Option<u64>,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Self {
            key,
            asc,
            ascq,
            info: None,
        }
    }

    pub const NO_SENSE: Sense = Sense::new(key::NO_SENSE, 0, 0);
    pub const MEDIUM_NOT_PRESENT: Sense = Sense::new(key::NOT_READY, 0x3a, 0x00);
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00);
    pub const INTERNAL_TARGET_FAILURE: Sense = Sense::new(key::HARDWARE_ERROR, 0x44, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    pub const MEDIUM_REMOVAL_PREVENTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x53, 0x02);
    pub const MEDIUM_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x28, 0x00);
    pub const POWER_ON_RESET: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x00);
    pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
    /// SBC-3 thin provisioning: a thin-provisioned unit that ran out of space.
    pub const SPACE_ALLOCATION_FAILED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x07);
    /// The Data-Out buffer is shorter than the CDB says (the transport owns the data phase).
    pub const DATA_PHASE_ERROR: Sense = Sense::new(key::ABORTED_COMMAND, 0x4b, 0x00);

    pub const fn with_info(self, info: u64) -> Self {
        Self {
            info: Some(info),
            ..self
        }
    }

    /// Fixed-format sense data (SPC-4), 18 bytes. The INFORMATION field is valid only
    /// when the value fits its 4 bytes.
    pub fn fixed_format(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = self.key & 0x0f;
        if let Some(info) = self.info.and_then(|i| u32::try_from(i).ok()) {
            b[0] |= 0x80;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[7] = 10; // additional sense length: bytes 8..18
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }

    /// Descriptor-format sense data (SPC-4), with an INFORMATION descriptor when set.
    pub fn descriptor_format(&self) -> Vec<u8> {
        let mut b = vec![0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0];
        if let Some(info) = self.info {
            b.extend_from_slice(&[0x00, 0x0a, 0x80, 0x00]);
            b.extend_from_slice(&info.to_be_bytes());
        }
        b[7] = (b.len() - 8) as u8;
        b
    }
}

/// What a logical unit remembers between commands for REQUEST SENSE and unit attentions.
#[derive(Debug, Default)]
pub(crate) struct SenseState {
    /// Unit attentions not yet reported, oldest first.
    attentions: VecDeque<Sense>,
    /// The sense of the last command if it ended in CHECK CONDITION (for initiators without
    /// autosense, e.g. ATAPI, which ask with REQUEST SENSE right after).
    last: Option<Sense>,
}

/// Enough for power-on plus a medium change or two; older ones add nothing a guest uses.
const MAX_ATTENTIONS: usize = 4;

impl SenseState {
    pub fn power_on() -> Self {
        let mut s = Self::default();
        s.raise(Sense::POWER_ON_RESET);
        s
    }

    pub fn raise(&mut self, ua: Sense) {
        // A pending reset already tells the initiator that anything may have changed
        // (a CD inserted at power-on reports 06/29/00 only, as a real drive does).
        if self.attentions.contains(&ua) || self.attentions.contains(&Sense::POWER_ON_RESET) {
            return;
        }
        if ua == Sense::POWER_ON_RESET {
            // A reset supersedes every other pending unit attention: it implies them all.
            self.attentions.clear();
        }
        if self.attentions.len() < MAX_ATTENTIONS {
            self.attentions.push_back(ua);
        }
    }

    pub fn take_attention(&mut self) -> Option<Sense> {
        self.attentions.pop_front()
    }

    pub fn set_last(&mut self, sense: Option<Sense>) {
        self.last = sense;
    }

    /// REQUEST SENSE: the last command's sense, else a unit attention (reporting it clears
    /// it, SPC-4 REQUEST SENSE), else None.
    pub fn take_for_request_sense(&mut self) -> Option<Sense> {
        self.last.take().or_else(|| self.attentions.pop_front())
    }
}
