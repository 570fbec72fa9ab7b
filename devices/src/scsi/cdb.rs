//! Command descriptor blocks: the opcodes this target knows, and a decoded CDB whose field
//! accessors never panic whatever the guest sent.

use super::sense::Sense;

pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const READ_TOC_PMA_ATIP: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS_NOTIFICATION: u8 = 0x4a;
    pub const READ_DISC_INFORMATION: u8 = 0x51;
    pub const READ_TRACK_INFORMATION: u8 = 0x52;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const READ_DISC_STRUCTURE: u8 = 0xad;
    pub const VERIFY_12: u8 = 0xaf;
    pub const SET_CD_SPEED: u8 = 0xbb;
    pub const MECHANISM_STATUS: u8 = 0xbd;
    pub const READ_CD: u8 = 0xbe;

    /// SERVICE ACTION IN (16) service action for READ CAPACITY (16).
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
}

/// A CDB copied into a fixed buffer after checking that the guest gave at least as many
/// bytes as its opcode's group needs (SPC-4 4.2, CDB formats); bytes past that read as zero.
#[derive(Debug, Clone, Copy)]
pub struct Cdb {
    bytes: [u8; 16],
}

impl Cdb {
    pub fn parse(raw: &[u8]) -> Result<Self, Sense> {
        let opcode = *raw.first().ok_or(Sense::INVALID_OPCODE)?;
        let len = match opcode >> 5 {
            0 => 6,
            1 | 2 => 10,
            4 => 16,
            5 => 12,
            // Group 3 (variable length, 0x7f) and the vendor-specific groups 6 and 7.
            _ => return Err(Sense::INVALID_OPCODE),
        };
        let given = raw.get(..len).ok_or(Sense::INVALID_FIELD_IN_CDB)?;
        let mut bytes = [0u8; 16];
        for (d, s) in bytes.iter_mut().zip(given) {
            *d = *s;
        }
        Ok(Self { bytes })
    }

    pub fn opcode(&self) -> u8 {
        self.bytes[0]
    }

    pub fn byte(&self, i: usize) -> u8 {
        self.bytes.get(i).copied().unwrap_or(0)
    }

    fn be(&self, i: usize, n: usize) -> u64 {
        (i..i + n).fold(0u64, |acc, j| (acc << 8) | u64::from(self.byte(j)))
    }

    pub fn be16(&self, i: usize) -> u64 {
        self.be(i, 2)
    }

    pub fn be24(&self, i: usize) -> u64 {
        self.be(i, 3)
    }

    pub fn be32(&self, i: usize) -> u64 {
        self.be(i, 4)
    }

    pub fn be64(&self, i: usize) -> u64 {
        self.be(i, 8)
    }

    /// LBA and transfer length (in blocks) of READ/WRITE 6/10/12/16, VERIFY-style layouts.
    pub fn lba_and_length(&self) -> Option<(u64, u64)> {
        match self.opcode() {
            // SBC-3, READ (6): a transfer length of 0 means 256 blocks.
            op::READ_6 | op::WRITE_6 => {
                let len = match self.byte(4) {
                    0 => 256,
                    n => u64::from(n),
                };
                Some((self.be24(1) & 0x1f_ffff, len))
            }
            op::READ_10 | op::WRITE_10 => Some((self.be32(2), self.be16(7))),
            op::READ_12 | op::WRITE_12 => Some((self.be32(2), self.be32(6))),
            op::READ_16 | op::WRITE_16 => Some((self.be64(2), self.be32(10))),
            _ => None,
        }
    }
}

/// Checks that `count` blocks from `lba` lie within a medium of `blocks` blocks.
pub fn check_range(lba: u64, count: u64, blocks: u64) -> Result<(), Sense> {
    match lba.checked_add(count) {
        Some(end) if end <= blocks && lba <= blocks => Ok(()),
        _ => Err(Sense::LBA_OUT_OF_RANGE),
    }
}
